"""Shared geometry and rendering helpers for procedural synthetic slides.

Everything is described in physical units (um) and rendered tile by tile, so a slide of
any size is drawn with memory bounded by the tile size:

- deterministic integer hashing (`hash_uniform`) replaces stored random numbers: any
  tile can be rendered on its own, in any process, and gives the same pixels;
- smooth value noise at any point (`value_noise`) or on a whole tile (`tile_noise`);
- `coarse_fields`: evaluate slowly varying "macro" fields (tissue boundary, lobules,
  cortex/medulla) on a coarse grid and upsample them bilinearly to the tile;
- a grid-hash `SpatialIndex` for explicit objects (ducts, foci, glomeruli, ...);
- `stamp_ellipses`: vectorised soft elliptical stamps (nuclei, red cells, dust);
- stains: `StainModel` (two optical-density vectors, perturbed per slide) and
  `beer_lambert` (OD -> RGB through a lookup table, glass tint and sensor noise);
- artefacts shared by all tasks: pen strokes, tissue folds, dust.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

# ----------------------------------------------------------------------------- hashing

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)
_KEY_MULTS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1)


def _mix32(h: np.ndarray) -> np.ndarray:
    """Avalanche a uint32 array in place (lowbias32 finaliser) and return it."""
    h ^= h >> np.uint32(16)
    h *= _M1
    h ^= h >> np.uint32(15)
    h *= _M2
    h ^= h >> np.uint32(16)
    return h


def _mix_int(h: int) -> int:
    """Python-int version of `_mix32` (for scalars)."""
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def hash_u32(seed: int, *keys) -> np.ndarray:
    """uint32 hash of a seed and integer keys (arrays broadcast against each other)."""
    h0 = _mix_int((int(seed) * 0x9E3779B9 + 0x632BE5AB) & 0xFFFFFFFF)
    h = np.atleast_1d(np.uint32(h0))
    shape = np.broadcast_shapes(*(np.shape(k) for k in keys)) if keys else ()
    for n, key in enumerate(keys):
        k = np.atleast_1d(np.asarray(key)).astype(np.int64).astype(np.uint32)
        h = _mix32(h ^ (k * np.uint32(_KEY_MULTS[n % len(_KEY_MULTS)])))
    return h.reshape(shape) if shape != h.shape else h


def hash_uniform(seed: int, *keys) -> np.ndarray:
    """float32 uniform in [0, 1) from a seed and integer keys (broadcast)."""
    return (hash_u32(seed, *keys) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def object_rng(seed: int, *keys: int) -> np.random.Generator:
    """A Generator private to one object, so every tile that draws it draws it alike."""
    return np.random.default_rng(int(hash_u32(seed, *keys).reshape(-1)[0]))


def tile_seed(seed: int, *keys: int) -> int:
    """A Python int seed for a tile-local numpy Generator."""
    return int(hash_u32(seed, *keys).reshape(-1)[0])


# ----------------------------------------------------------------------------- noise


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at `e0` to 1 at `e1` (float32)."""
    t = np.clip((x - np.float32(e0)) * np.float32(1.0 / (e1 - e0)), 0.0, 1.0)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def value_noise(seed: int, x_um: np.ndarray, y_um: np.ndarray, scale_um: float) -> np.ndarray:
    """Smooth value noise in [-1, 1] at arbitrary points; lattice spacing `scale_um`."""
    gx = np.asarray(x_um, dtype=np.float64) / scale_um
    gy = np.asarray(y_um, dtype=np.float64) / scale_um
    ix, iy = np.floor(gx), np.floor(gy)
    fx = (gx - ix).astype(np.float32)
    fy = (gy - iy).astype(np.float32)
    fx = fx * fx * (3 - 2 * fx)
    fy = fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    v00 = hash_uniform(seed, ix, iy)
    v10 = hash_uniform(seed, ix + 1, iy)
    v01 = hash_uniform(seed, ix, iy + 1)
    v11 = hash_uniform(seed, ix + 1, iy + 1)
    top = v00 + (v10 - v00) * fx
    bot = v01 + (v11 - v01) * fx
    return (top + (bot - top) * fy) * 2.0 - 1.0


def _interp_matrix(n_out: int, step: float, n_in: int, offset: float) -> np.ndarray:
    """(n_out, n_in) bilinear weights: output pixel j sits at input index offset+(j+.5)/step."""
    pos = offset + (np.arange(n_out) + 0.5) / step
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    f = np.clip(pos - i0, 0.0, 1.0)
    w = np.zeros((n_out, n_in), np.float32)
    w[np.arange(n_out), i0] = 1.0 - f
    w[np.arange(n_out), i0 + 1] += f
    return w


def _smooth_matrix(n_out: int, cell: int) -> np.ndarray:
    """(n_out, n_out//cell + 1) smoothstep weights from lattice nodes to pixel centres."""
    pos = (np.arange(n_out) + 0.5) / cell
    i0 = np.floor(pos).astype(np.int64)
    f = pos - i0
    f = f * f * (3 - 2 * f)
    w = np.zeros((n_out, n_out // cell + 2), np.float32)
    w[np.arange(n_out), i0] = 1.0 - f
    w[np.arange(n_out), i0 + 1] = f
    return w


_MATRIX_CACHE: dict[tuple, np.ndarray] = {}


def _cached(key: tuple, make) -> np.ndarray:
    m = _MATRIX_CACHE.get(key)
    if m is None:
        m = _MATRIX_CACHE[key] = make()
    return m


def pow2_cell(scale_um: float, px_um: float, size: int) -> int:
    """Power-of-two lattice spacing in pixels closest to `scale_um`, within [2, size]."""
    cell = 2 ** int(round(np.log2(max(scale_um / px_um, 2.0))))
    return int(min(max(cell, 2), size))


def tile_noise(seed: int, x0_px: int, y0_px: int, size: int, cell_px: int,
               cell_y_px: int | None = None) -> np.ndarray:
    """Smooth value noise in [-1, 1] over a `size`^2 tile; lattice spacing `cell_px`.

    `cell_y_px` (default: `cell_px`) gives an anisotropic lattice (streaky noise). The
    lattice is anchored to the global pixel grid, so neighbouring tiles join without a
    seam as long as tile origins are multiples of the cells (true for power-of-two tiles).
    """
    cy = cell_y_px or cell_px
    ix = x0_px // cell_px + np.arange(size // cell_px + 2)
    iy = y0_px // cy + np.arange(size // cy + 2)
    lat = hash_uniform(seed, ix[None, :], iy[:, None]) * 2.0 - 1.0
    wx = _cached(("smooth", size, cell_px), lambda: _smooth_matrix(size, cell_px))
    wy = _cached(("smooth", size, cy), lambda: _smooth_matrix(size, cy))
    return wy @ lat @ wx.T


def coarse_fields(fn, x0_um: float, y0_um: float, px_um: float, size: int, step: int):
    """Evaluate `fn(x_um, y_um) -> dict of float32 arrays` on a coarse grid, upsample.

    The grid has one sample every `step` pixels (+1 sample margin on each side); fields are
    bilinearly interpolated to the `size` x `size` pixel centres. With step 1 the fields are
    evaluated at the pixel centres directly.
    """
    if step <= 1:
        xs = x0_um + (np.arange(size) + 0.5) * px_um
        ys = y0_um + (np.arange(size) + 0.5) * px_um
        gx, gy = np.meshgrid(xs, ys)
        return {k: np.asarray(v, np.float32) for k, v in fn(gx, gy).items()}
    n = size // step + 2
    pos = (np.arange(n) - 1) * step + step / 2.0
    gx, gy = np.meshgrid(x0_um + pos * px_um, y0_um + pos * px_um)
    w = _cached(("lin", size, step), lambda: _interp_matrix(size, step, n, 0.5))
    out = {}
    for k, v in fn(gx, gy).items():
        out[k] = w @ np.asarray(v, np.float32) @ w.T
    return out


# ----------------------------------------------------------------------------- objects


class SpatialIndex:
    """Grid hash of axis-aligned bounding boxes (um) -> object ids."""

    def __init__(self, cell_um: float):
        self.cell_um = float(cell_um)
        self.cells: dict[tuple[int, int], list[int]] = {}

    def _range(self, x0: float, y0: float, x1: float, y1: float):
        c = self.cell_um
        return (
            range(int(np.floor(x0 / c)), int(np.floor(x1 / c)) + 1),
            range(int(np.floor(y0 / c)), int(np.floor(y1 / c)) + 1),
        )

    def insert(self, obj_id: int, x0: float, y0: float, x1: float, y1: float) -> None:
        xr, yr = self._range(x0, y0, x1, y1)
        for i in xr:
            for j in yr:
                self.cells.setdefault((i, j), []).append(int(obj_id))

    def query(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Ids of objects whose boxes may overlap the box (sorted, unique)."""
        xr, yr = self._range(x0, y0, x1, y1)
        found: list[int] = []
        for i in xr:
            for j in yr:
                found.extend(self.cells.get((i, j), ()))
        return np.unique(np.asarray(found, dtype=np.int64))


class PointIndex:
    """Compact grid index of many points (um): sorted cell keys + searchsorted queries."""

    _NCOL = 1 << 22

    def __init__(self, x_um: np.ndarray, y_um: np.ndarray, cell_um: float):
        self.cell_um = float(cell_um)
        key = self._key(np.floor(np.asarray(x_um) / cell_um), np.floor(np.asarray(y_um) / cell_um))
        self.order = np.argsort(key, kind="stable").astype(np.int64)
        self.keys = key[self.order]

    def _key(self, ci, cj):
        return (np.asarray(cj, np.int64) + (1 << 20)) * self._NCOL + (
            np.asarray(ci, np.int64) + (1 << 20))

    def query(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of points in cells overlapping the box (a superset of the box)."""
        c = self.cell_um
        i0, i1 = int(np.floor(x0 / c)), int(np.floor(x1 / c))
        parts = []
        for j in range(int(np.floor(y0 / c)), int(np.floor(y1 / c)) + 1):
            lo = np.searchsorted(self.keys, self._key(i0, j))
            hi = np.searchsorted(self.keys, self._key(i1, j), side="right")
            if hi > lo:
                parts.append(self.order[lo:hi])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def build_index(x_um, y_um, radius_um, cell_um: float) -> SpatialIndex:
    """Spatial index of discs (centre, radius in um)."""
    idx = SpatialIndex(cell_um)
    for i, (x, y, r) in enumerate(zip(x_um, y_um, radius_um, strict=True)):
        idx.insert(i, x - r, y - r, x + r, y + r)
    return idx


@dataclass
class Blob:
    """An irregular closed shape: a rotated ellipse whose radius is modulated by harmonics.

    Boundary in the ellipse-normalised frame: q(theta) = 1 + sum_k amp_k cos(k theta + phase_k).
    """

    x_um: float
    y_um: float
    a_um: float  # semi-axis along `angle`
    b_um: float
    angle: float  # radians
    amps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    phases: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @property
    def radius_um(self) -> float:
        """Radius of a disc that contains the blob."""
        return float(max(self.a_um, self.b_um) * (1.0 + np.abs(self.amps).sum()))

    def sdf(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Approximate signed distance (um) to the boundary, positive inside."""
        dx = x_um - self.x_um
        dy = y_um - self.y_um
        c, s = np.cos(self.angle), np.sin(self.angle)
        u = (dx * c + dy * s) / self.a_um
        v = (-dx * s + dy * c) / self.b_um
        q = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        bound = np.ones_like(q)
        for k, (amp, ph) in enumerate(zip(self.amps, self.phases, strict=True), start=2):
            bound = bound + amp * np.cos(k * theta + ph)
        return ((bound - q) * np.sqrt(self.a_um * self.b_um)).astype(np.float32)


def random_blob(rng: np.random.Generator, x_um: float, y_um: float, r_um: float,
                aspect: float, roughness: float = 0.08) -> Blob:
    """A lobulated blob of mean radius `r_um` and elongation `aspect` (>= 1)."""
    amps = (rng.normal(0.0, roughness, 5) / np.arange(1, 6) ** 0.6).astype(np.float32)
    return Blob(
        x_um, y_um, r_um * np.sqrt(aspect), r_um / np.sqrt(aspect),
        float(rng.uniform(0, np.pi)), amps,
        rng.uniform(0, 2 * np.pi, 5).astype(np.float32),
    )


def polyline_bbox(pts: np.ndarray, r: float) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1) um around a polyline (K, 2) um, padded by `r` um."""
    return (float(pts[:, 0].min() - r), float(pts[:, 1].min() - r),
            float(pts[:, 0].max() + r), float(pts[:, 1].max() + r))


def polyline_distance(x_um, y_um, pts: np.ndarray):
    """Distance (um) from points to a polyline `pts` (K, 2); also arc length and side.

    Returns (dist, s_um, side): s_um = arc length of the closest point, side = signed
    perpendicular offset (positive to the left of the direction of travel).
    """
    x_um = np.asarray(x_um, np.float32)
    y_um = np.asarray(y_um, np.float32)
    best = np.full(np.broadcast(x_um, y_um).shape, np.inf, np.float32)
    s_best = np.zeros_like(best)
    side = np.zeros_like(best)
    s0 = 0.0
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:], strict=True):
        ex, ey = bx - ax, by - ay
        seg = float(np.hypot(ex, ey)) or 1e-6
        t = np.clip(((x_um - ax) * ex + (y_um - ay) * ey) / (seg * seg), 0.0, 1.0)
        px, py = x_um - (ax + t * ex), y_um - (ay + t * ey)
        d = np.sqrt(px * px + py * py)
        closer = d < best
        best = np.where(closer, d, best)
        s_best = np.where(closer, s0 + t * seg, s_best)
        side = np.where(closer, (ex * (y_um - ay) - ey * (x_um - ax)) / seg, side)
        s0 += seg
    return best, s_best, side


def smooth_path(rng: np.random.Generator, start, end, n: int = 7, wiggle: float = 0.08):
    """A gently curving polyline (n points, um) from `start` to `end`."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    t = np.linspace(0, 1, n)[:, None]
    pts = start + t * (end - start)
    normal = np.array([-(end - start)[1], (end - start)[0]])
    bend = rng.normal(0, wiggle, 2)
    offs = bend[0] * np.sin(np.pi * t[:, 0]) + bend[1] * np.sin(2 * np.pi * t[:, 0])
    return (pts + offs[:, None] * normal[None, :]).astype(np.float32)


# ----------------------------------------------------------------------------- stamps


@dataclass(frozen=True)
class NuclearVariation:
    """Per-slide variability of nuclei, applied by `stamp_ellipses(..., nuclear=True)`.

    size: slide-wide size factor; size_sd: relative sd of each nucleus's size; elongation:
    largest extra aspect ratio (a nucleus gets 1 + elongation * u); chromatin: contrast of
    per-pixel chromatin grain (0 = none); density_sd: relative sd of each nucleus's
    staining. Per-nucleus draws hash the nucleus centre in slide pixels, so every tile a
    nucleus touches draws it alike. origin_px: level-0 pixel of the tile being painted.
    """

    seed: int
    size: float = 1.0
    size_sd: float = 0.0
    elongation: float = 0.0
    chromatin: float = 0.0
    density_sd: float = 0.0
    origin_px: tuple[int, int] = (0, 0)


_NUCLEI: ContextVar[NuclearVariation | None] = ContextVar("nuclear_variation", default=None)


@contextmanager
def nuclear_variation(variation: NuclearVariation | None) -> Iterator[None]:
    """Within this block nuclei stamped with ``nuclear=True`` vary as `variation` says;
    None (the default everywhere else): nuclei exactly as the task draws them."""
    token = _NUCLEI.set(variation)
    try:
        yield
    finally:
        _NUCLEI.reset(token)


def _vary_nuclei(v: NuclearVariation, cx, cy, ra, rb, amp):
    """Semi-axes and peak values of nuclei at tile centres cx, cy (px) varied by `v`."""
    kx = np.round((cx.astype(np.float64) + v.origin_px[0]) * 2).astype(np.int64)
    ky = np.round((cy.astype(np.float64) + v.origin_px[1]) * 2).astype(np.int64)
    u = [hash_uniform(v.seed, kx, ky, k) for k in range(3)]
    size = np.float32(v.size) * (1 + np.float32(v.size_sd * np.sqrt(3.0)) * (2 * u[0] - 1))
    elong = np.sqrt(1 + np.float32(v.elongation) * u[1])
    dens = 1 + np.float32(v.density_sd * np.sqrt(3.0)) * (2 * u[2] - 1)
    return ra * size * elong, rb * size / elong, amp * dens


def stamp_ellipses(target: np.ndarray, cx_px, cy_px, ra_px, rb_px, angle, amp,
                   edge_px: float = 0.7, texture: np.ndarray | None = None,
                   nuclear: bool = False) -> None:
    """Draw soft filled ellipses into `target` (H, W) with max-compositing.

    cx_px/cy_px: centres in tile pixels (float arrays, N); ra/rb: semi-axes (px);
    angle (rad); amp: peak value. `texture` (H, W) optionally modulates the stamps.
    nuclear: these are cell nuclei, varied by the active `nuclear_variation` if any.
    """
    n = len(cx_px)
    if n == 0:
        return
    h, w = target.shape
    cx = np.asarray(cx_px, np.float32)
    cy = np.asarray(cy_px, np.float32)
    ra = np.broadcast_to(np.asarray(ra_px, np.float32), (n,))
    rb = np.broadcast_to(np.asarray(rb_px, np.float32), (n,))
    ang = np.broadcast_to(np.asarray(angle, np.float32), (n,))
    amp = np.broadcast_to(np.asarray(amp, np.float32), (n,))
    vary = _NUCLEI.get() if nuclear else None
    if vary is not None:
        ra, rb, amp = _vary_nuclei(vary, cx, cy, ra, rb, amp)
    half = int(np.ceil(max(ra.max(), rb.max()) + edge_px + 1))
    off = np.arange(-half, half + 1)
    ix0 = np.floor(cx).astype(np.int64)
    iy0 = np.floor(cy).astype(np.int64)
    xs = ix0[:, None] + off[None, :]  # (N, w)
    ys = iy0[:, None] + off[None, :]
    dx = (xs + 0.5 - cx[:, None]).astype(np.float32)[:, None, :]
    dy = (ys + 0.5 - cy[:, None]).astype(np.float32)[:, :, None]
    c, s = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
    u = (dx * c + dy * s) / ra[:, None, None]
    v = (dy * c - dx * s) / rb[:, None, None]
    rr = np.sqrt(u * u + v * v)
    rmin = np.minimum(ra, rb)[:, None, None]
    val = np.clip((1.0 - rr) * rmin / edge_px + 0.5, 0.0, 1.0) * amp[:, None, None]
    yy = np.broadcast_to(ys[:, :, None], val.shape)
    xx = np.broadcast_to(xs[:, None, :], val.shape)
    ok = (val > 0) & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    flat = (yy[ok] * w + xx[ok]).astype(np.int64)
    vals = val[ok]
    if texture is not None:
        vals = vals * texture.reshape(-1)[flat]
    if vary is not None and vary.chromatin > 0:  # chromatin grain fixed to slide pixels
        grain = hash_uniform(vary.seed + 1, xx[ok] + vary.origin_px[0],
                             yy[ok] + vary.origin_px[1])
        vals = vals * (1 + np.float32(vary.chromatin) * (2 * grain - 1))
    np.maximum.at(target.reshape(-1), flat, vals.astype(target.dtype))


def jittered_points(seed: int, x0_um: float, y0_um: float, x1_um: float, y1_um: float,
                    spacing_um: float, keep: float = 1.0):
    """Deterministic jittered-grid points in a box: (x_um, y_um, u) arrays.

    One candidate per grid cell of `spacing_um`, kept with probability `keep`; `u` is an
    extra per-point uniform number for the caller (size, orientation, type...).
    """
    i = np.arange(int(np.floor(x0_um / spacing_um)), int(np.floor(x1_um / spacing_um)) + 1)
    j = np.arange(int(np.floor(y0_um / spacing_um)), int(np.floor(y1_um / spacing_um)) + 1)
    ii, jj = np.meshgrid(i, j)
    ii, jj = ii.ravel(), jj.ravel()
    px = (ii + hash_uniform(seed, ii, jj, 1)) * spacing_um
    py = (jj + hash_uniform(seed, ii, jj, 2)) * spacing_um
    u = hash_uniform(seed, ii, jj, 3)
    sel = hash_uniform(seed, ii, jj, 4) < keep
    return px[sel], py[sel], u[sel]


@dataclass
class CellTable:
    """Jittered feature points of the grid cells covering a tile (cell units).

    px, py: (n,) point positions in cell units; i_lo, j_lo, ni: cell numbering;
    u: (k, n) extra per-cell uniforms for the caller.
    """

    px: np.ndarray
    py: np.ndarray
    i_lo: int
    j_lo: int
    ni: int
    nj: int
    u: np.ndarray


def cell_table(seed: int, fx: np.ndarray, fy: np.ndarray, jitter: float, n_extra: int = 4,
               margin: int = 1) -> CellTable:
    """Feature points for all cells touched by coordinates fx, fy (cell units) +margin."""
    i_lo, j_lo = int(np.floor(fx.min())) - margin, int(np.floor(fy.min())) - margin
    ni = int(np.floor(fx.max())) - i_lo + 1 + margin
    nj = int(np.floor(fy.max())) - j_lo + 1 + margin
    ci, cj = np.meshgrid(np.arange(i_lo, i_lo + ni), np.arange(j_lo, j_lo + nj))
    px = (ci + 0.5 + jitter * (2 * hash_uniform(seed, ci, cj, 101) - 1)).ravel()
    py = (cj + 0.5 + jitter * (2 * hash_uniform(seed, ci, cj, 102) - 1)).ravel()
    u = np.stack([hash_uniform(seed, ci, cj, 103 + k).ravel() for k in range(n_extra)])
    return CellTable(px.astype(np.float32), py.astype(np.float32), i_lo, j_lo, ni, nj, u)


def neighbour_distance(seed: int, t: CellTable, sel: np.ndarray, jitter: float) -> np.ndarray:
    """Distance (cell units) from each selected cell's point to its nearest neighbour's."""
    ci = t.i_lo + sel % t.ni
    cj = t.j_lo + sel // t.ni
    best = np.full(len(sel), 2.0, np.float32)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            if ox or oy:
                qx = ci + ox + 0.5 + jitter * (2 * hash_uniform(seed, ci + ox, cj + oy, 101) - 1)
                qy = cj + oy + 0.5 + jitter * (2 * hash_uniform(seed, ci + ox, cj + oy, 102) - 1)
                best = np.minimum(best, np.hypot(t.px[sel] - qx, t.py[sel] - qy))
    return best


def cell_uniforms(seed: int, t: CellTable, sel: np.ndarray, n: int, key: int) -> np.ndarray:
    """(len(sel), n) uniforms per selected cell and slot: the same in every tile."""
    ci = (t.i_lo + sel % t.ni)[:, None]
    cj = (t.j_lo + sel // t.ni)[:, None]
    return hash_uniform(seed, ci, cj, np.arange(n)[None, :], key)


def worley(t: CellTable, fx: np.ndarray, fy: np.ndarray, search: int = 2):
    """Nearest and second-nearest squared distances (cell units) and nearest cell id.

    search=2 looks at the 2x2 cells around each point (exact enough for jitter <= 0.25),
    search=3 at the 3x3 block (any jitter).
    """
    if search == 2:
        bx = np.floor(fx - 0.5).astype(np.int32) - t.i_lo
        by = np.floor(fy - 0.5).astype(np.int32) - t.j_lo
        offs = ((0, 0), (1, 0), (0, 1), (1, 1))
    else:
        bx = np.floor(fx).astype(np.int32) - t.i_lo - 1
        by = np.floor(fy).astype(np.int32) - t.j_lo - 1
        offs = tuple((a, b) for b in range(3) for a in range(3))
    base = by * t.ni + bx
    d1 = np.full(base.shape, np.inf, np.float32)
    d2 = d1.copy()
    id1 = np.zeros(base.shape, np.int32)
    for ox, oy in offs:
        flat = base + (oy * t.ni + ox)
        dx = fx - t.px[flat]
        dy = fy - t.py[flat]
        d = dx * dx + dy * dy
        closer = d < d1
        d2 = np.minimum(d2, np.maximum(d1, d))
        id1 = np.where(closer, flat, id1)
        d1 = np.minimum(d1, d)
    return d1, d2, id1


def ring_points(rng: np.random.Generator, cx: float, cy: float, a: float, b: float,
                angle: float, rho: float, spacing_um: float, jitter: float = 0.15,
                drop: float = 0.0):
    """Points spaced ~`spacing_um` on a scaled ellipse (rho * (a, b)), jittered.

    Returns (x, y, tangent_angle) arrays in um.
    """
    per = np.pi * rho * (a + b)
    n = max(int(per / spacing_um), 3)
    th = (np.arange(n) + rng.uniform(-jitter, jitter, n)) * (2 * np.pi / n) + rng.uniform(
        0, 2 * np.pi)
    keep = rng.random(n) >= drop
    th = th[keep]
    ex, ey = rho * a * np.cos(th), rho * b * np.sin(th)
    c, s = np.cos(angle), np.sin(angle)
    x = cx + ex * c - ey * s
    y = cy + ex * s + ey * c
    tang = np.arctan2(rho * b * np.cos(th), -rho * a * np.sin(th)) + angle
    return x, y, tang


# ----------------------------------------------------------------------------- stains


@dataclass
class StainModel:
    """Two stains as unit optical-density vectors (rows: stain, columns: R, G, B)."""

    names: tuple[str, str]
    matrix: np.ndarray  # (2, 3) float32, rows unit length
    glass_od: np.ndarray  # (3,) OD of empty glass (tint)
    noise_od: float  # sd of sensor noise in OD units
    intensity: np.ndarray  # (2,) per-slide stain strength multipliers


HE_VECTORS = np.array([[0.62, 0.72, 0.31], [0.10, 0.86, 0.50]], np.float32)
"""Base haematoxylin and eosin OD vectors (close to Macenko estimates on real H&E scans)."""
PAS_VECTORS = np.array([[0.64, 0.67, 0.37], [0.18, 0.88, 0.44]], np.float32)
"""Base haematoxylin and PAS-magenta OD vectors (close to estimates on real PAS tiles)."""


def perturbed_stains(rng: np.random.Generator, base: np.ndarray, names: tuple[str, str],
                     sd: float = 0.04) -> StainModel:
    """Per-slide stain model: base vectors jittered (sd per component), renormalised."""
    m = np.clip(base + rng.normal(0, sd, base.shape), 0.02, None)
    m = (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
    glass = np.clip(np.array([0.040, 0.047, 0.046]) + rng.normal(0, 0.005, 3), 0.015, 0.07)
    return StainModel(
        names=names, matrix=m, glass_od=glass.astype(np.float32),
        noise_od=float(rng.uniform(0.016, 0.022)),
        intensity=rng.uniform(0.88, 1.12, 2).astype(np.float32),
    )


_OD_STEPS = 512  # LUT resolution per unit OD
_OD_MAX = 6.0
_LUT = np.round(
    255.0 * np.exp(-np.arange(int(_OD_MAX * _OD_STEPS) + 1) / _OD_STEPS)
).astype(np.uint8)


_BANK: dict[str, np.ndarray] = {}


def noise_bank() -> np.ndarray:
    """A fixed (1024, 1024) standard-normal float32 field; tiles take random windows of it."""
    bank = _BANK.get("normal")
    if bank is None:
        bank = _BANK["normal"] = np.random.default_rng(20240611).standard_normal(
            (1024, 1024), dtype=np.float32)
    return bank


def bank_window(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A random (view) window of the noise bank of `shape` (<= 512 x 512)."""
    bank = noise_bank()
    oy = int(rng.integers(0, bank.shape[0] - shape[0] + 1))
    ox = int(rng.integers(0, bank.shape[1] - shape[1] + 1))
    return bank[oy:oy + shape[0], ox:ox + shape[1]]


def beer_lambert(stains: StainModel, c1: np.ndarray, c2: np.ndarray, rng: np.random.Generator,
                 extra_od: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) = 255 exp(-(c1 v1 + c2 v2 + glass + noise + extras)).

    c1, c2: stain concentrations (H, W) float32 (already including any thickness factor);
    extra_od: list of (alpha (H, W), od_rgb (3,)) additive absorbers (pen ink, dust).
    """
    h, w = c1.shape
    out = np.empty((h, w, 3), np.uint8)
    m = stains.matrix * stains.intensity[:, None]
    scale = np.float32(_OD_STEPS)
    for ch in range(3):
        od = c1 * (m[0, ch] * scale) + c2 * (m[1, ch] * scale)
        od += bank_window(rng, (h, w)) * np.float32(stains.noise_od * scale)
        od += np.float32((stains.glass_od[ch]) * scale + 0.5)
        for alpha, rgb_od in extra_od or ():
            od += alpha * np.float32(rgb_od[ch] * scale)
        np.clip(od, 0, len(_LUT) - 1, out=od)
        out[:, :, ch] = _LUT[od.astype(np.int32)]
    return out


def glass_tile(stains: StainModel, size: int, rng: np.random.Generator) -> np.ndarray:
    """An empty-glass RGB tile (near white, faint tint, sensor noise)."""
    z = np.zeros((size, size), np.float32)
    return beer_lambert(stains, z, z, rng)


# ----------------------------------------------------------------------------- artefacts

PEN_INKS = {
    "blue": np.array([1.55, 0.85, 0.18], np.float32),
    "green": np.array([1.45, 0.45, 0.95], np.float32),
    "black": np.array([1.6, 1.55, 1.45], np.float32),
    # red marker: absorbs green and blue, passes red (the real red-pen fixture of
    # ../shared/data/tissue: OD ~0.2, 1.3, 1.1 at its median, up to ~0.4, 2.4, 2.1)
    "red": np.array([0.2, 1.5, 1.2], np.float32),
}
"""Marker-ink optical densities per channel (R, G, B) at full coverage."""

SEEDED_INKS = ("blue", "green", "black")
"""Inks a plain ``pen`` draws from the seed (red came later: the draw, and so every seeded
slide, stays as it was)."""

_PEN_INK: ContextVar[str | None] = ContextVar("pen_ink", default=None)


@contextmanager
def pen_ink(colour: str | None) -> Iterator[None]:
    """Within this block `random_pen` draws its strokes in ink ``colour`` (a key of
    `PEN_INKS`), the stroke's path unchanged; None: the ink drawn from the seed.

    >>> with pen_ink("red"):                                   # doctest: +SKIP
    ...     write_slide("fls", "red.svs", pen=True)
    """
    if colour is not None and colour not in PEN_INKS:
        raise ValueError(f"unknown pen colour {colour!r}; choose one of {', '.join(PEN_INKS)}")
    token = _PEN_INK.set(colour)
    try:
        yield
    finally:
        _PEN_INK.reset(token)


@dataclass
class PenStroke:
    """A marker stroke: polyline (K, 2) um, width (um) and ink OD (3,)."""

    pts: np.ndarray
    width_um: float
    ink: str

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return polyline_bbox(self.pts, self.width_um)

    def fields(self, seed: int, x_um: np.ndarray, y_um: np.ndarray) -> dict:
        """Smooth fields: `edge` (um outside the stroke edge, < 0 inside), `streak` (0-1)."""
        d, s, side = polyline_distance(x_um, y_um, self.pts)
        half = self.width_um / 2 * (1 + 0.1 * value_noise(seed, s, s * 0, 150.0))
        taper = np.clip(np.minimum(s, self.length_um - s) / (self.width_um * 1.5), 0.2, 1.0)
        streak = 0.72 + 0.22 * value_noise(seed + 7, s / 12.0, side, 6.0) + 0.06 * taper
        return {"edge": d - half * np.sqrt(taper), "streak": streak}

    @property
    def length_um(self) -> float:
        return float(np.hypot(*np.diff(self.pts, axis=0).T).sum())

    def coverage(self, seed: int, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Ink coverage in [0, 1] at points (streaky along the stroke, soft edges)."""
        f = self.fields(seed, x_um, y_um)
        return (smoothstep(1.5, -1.5, f["edge"]) * f["streak"]).astype(np.float32)


def random_pen(rng: np.random.Generator, width_um: float, height_um: float,
               near_xy: tuple[float, float], outward: float) -> PenStroke:
    """A curved stroke on the glass that runs along and over a tissue edge at `near_xy`.

    outward: direction (rad) from the tissue towards the glass at that point.
    """
    along = outward + np.pi / 2 + rng.uniform(-0.35, 0.35)
    length = rng.uniform(0.3, 0.55) * min(width_um, height_um)
    nx = near_xy[0] + np.cos(outward) * 60
    ny = near_xy[1] + np.sin(outward) * 60
    start = (nx - np.cos(along) * length / 2, ny - np.sin(along) * length / 2)
    end = (nx + np.cos(along) * length / 2, ny + np.sin(along) * length / 2)
    pts = smooth_path(rng, start, end, 12, 0.12)
    pts[:, 0] = np.clip(pts[:, 0], 0, width_um)
    pts[:, 1] = np.clip(pts[:, 1], 0, height_um)
    # The seeded ink is drawn even when `pen_ink` forces the colour: the random stream, and
    # so the rest of the slide, stays the same.
    ink = str(rng.choice(SEEDED_INKS))
    return PenStroke(pts, float(rng.uniform(100, 220)), _PEN_INK.get() or ink)


@dataclass
class Fold:
    """A tissue fold: a band (polyline, width um) where the section lies double."""

    pts: np.ndarray
    width_um: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return polyline_bbox(self.pts, self.width_um)

    def fields(self, x_um: np.ndarray, y_um: np.ndarray) -> dict:
        """Smooth field `edge`: um outside the fold band (< 0 inside)."""
        d, _, _ = polyline_distance(x_um, y_um, self.pts)
        return {"edge": d - self.width_um / 2}

    @staticmethod
    def thickness_from(edge: np.ndarray) -> np.ndarray:
        """Section thickness factor: 1 outside, ~2 inside the fold, darker at its crease."""
        inside = smoothstep(1.0, -1.0, edge)
        crease = smoothstep(5.0, 0.0, np.abs(edge))
        return (1.0 + 0.9 * inside + 0.45 * crease).astype(np.float32)


def random_fold(rng: np.random.Generator, blob: Blob) -> Fold:
    """A fold band across part of a tissue fragment."""
    ang = blob.angle + rng.uniform(-0.6, 0.6) + np.pi / 2
    r = min(blob.a_um, blob.b_um) * rng.uniform(0.6, 1.0)
    off = rng.uniform(-0.4, 0.4, 2) * min(blob.a_um, blob.b_um)
    cx, cy = blob.x_um + off[0], blob.y_um + off[1]
    start = (cx - np.cos(ang) * r, cy - np.sin(ang) * r)
    end = (cx + np.cos(ang) * r, cy + np.sin(ang) * r)
    return Fold(smooth_path(rng, start, end, 6, 0.05), float(rng.uniform(50, 160)))


@dataclass
class Dust:
    """Specks of dust/debris on the glass (centres, radii um, grey OD)."""

    x_um: np.ndarray
    y_um: np.ndarray
    r_um: np.ndarray
    od: np.ndarray


def random_dust(rng: np.random.Generator, width_um: float, height_um: float) -> Dust:
    """A little dust: about 6 specks per 10 mm^2 of glass (2-12 um across)."""
    n = int(rng.poisson(max(width_um * height_um / 1e6 * 0.6, 1.0)))
    return Dust(
        rng.uniform(0, width_um, n).astype(np.float32),
        rng.uniform(0, height_um, n).astype(np.float32),
        (rng.uniform(1.0, 6.0, n) ** 1.0).astype(np.float32),
        rng.uniform(0.4, 1.4, n).astype(np.float32),
    )


def dust_in_box(dust: Dust, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Indices of dust specks touching a box (um)."""
    r = dust.r_um
    return np.nonzero((dust.x_um + r > x0) & (dust.x_um - r < x1)
                      & (dust.y_um + r > y0) & (dust.y_um - r < y1))[0]
