"""Synthetic H&E minor salivary gland (labial biopsy) for the `fls` task.

Scene (all sizes in um, sizes from standard histology):
- tissue fragments (lobulated blobs), each divided into lobules (Voronoi cells of lobule
  centres, ~0.3-1 mm) separated by fibrous septa; a lobule is glandular (acini), adipose
  (fat) or loose fibrous stroma;
- acini: clusters of pyramidal cells (basal round nuclei, purple-pink granular cytoplasm)
  around a small lumen, ~25-45 um across; some mucous acini (pale, flattened nuclei);
- intralobular (striated) ducts: a ring of eosinophilic cuboidal cells round a lumen
  (~25-50 um); interlobular excretory ducts in the septa (70-160 um, two cell layers);
- small vessels with red cells; fibroblast nuclei in the stroma; fat: large empty
  adipocytes with thin pink membranes;
- lymphocytes: small round dark nuclei, 7 um across. Foci = dense aggregates of >= 50
  lymphocytes, mostly periductal; sub-threshold aggregates of 15-40 that do not count;
  scattered single lymphocytes;
- optional pen stroke, fold; a little dust.

Label legend (truth zarr `labels`): see `LEGEND`. Tissue = label not in {0, 7}.
Glandular area (the focus-score denominator) = tissue minus adipose tissue, i.e. labels
{stroma, acinus, duct, focus, aggregate}: the whole glandular surface, septa included, as
in the 2017 consensus guidance ("total glandular surface area"), with fat excluded.
Focus score FS = 4 * foci / glandular_mm2; positive if FS >= 1; adequate if glandular
area >= 8 mm2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import scene as sc
from .common import (
    SlideBase,
    SynthSpec,
    choose_counts_for_rate,
    coarse_step,
    pen_label,
    render_tissue_tile,
    window,
)

LEGEND = {0: "background", 1: "stroma", 2: "acinus", 3: "duct", 4: "fat", 5: "focus",
          6: "aggregate", 7: "pen"}
GLANDULAR = (1, 2, 3, 5, 6)
FOCUS_MIN_LYMPHOCYTES = 50
LYMPHOCYTE_RADIUS_UM = 3.5
GLAND, FAT, STROMA = 0, 1, 2


@dataclass
class Objects:
    """Discs/ellipses of one kind: centre (um), semi-axes a, b (um), angle, extra columns."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray
    extra: dict
    index: sc.SpatialIndex

    @classmethod
    def make(cls, rows: list[dict], cell_um: float) -> Objects:
        cols = {k: np.array([r[k] for r in rows], np.float32) for k in
                (rows[0] if rows else {"x": 0, "y": 0, "a": 0, "b": 0, "angle": 0})}
        x, y, a, b, ang = (cols.pop(k, np.zeros(0, np.float32))
                           for k in ("x", "y", "a", "b", "angle"))
        r = np.maximum(a, b) if len(a) else a
        extra_r = cols.get("reach", r)
        return cls(x, y, a, b, ang, cols, sc.build_index(x, y, np.maximum(r, extra_r), cell_um))

    def __len__(self) -> int:
        return len(self.x)

    def in_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        return self.index.query(x0, y0, x1, y1) if len(self.x) else np.zeros(0, np.int64)


@dataclass
class FlsScene(SlideBase):
    fragments: list | None = None
    frag_index: sc.SpatialIndex | None = None
    lob_x: np.ndarray | None = None
    lob_y: np.ndarray | None = None
    lob_kind: np.ndarray | None = None
    lob_sep_um: np.ndarray | None = None
    lob_spacing_um: float = 600.0
    lob_index: sc.SpatialIndex | None = None
    ducts: Objects | None = None
    vessels: Objects | None = None
    foci: Objects | None = None  # foci and sub-threshold aggregates
    lym_x: np.ndarray | None = None
    lym_y: np.ndarray | None = None
    lym_group: np.ndarray | None = None  # index into foci, -1 scattered
    lym_index: sc.PointIndex | None = None
    target_fs: float = 0.0
    gland_mm2_estimate: float = 0.0
    stroma_stretch: int = 0  # 0: fibres along x, 1: along y


# ----------------------------------------------------------------------------- macro fields


def macro_fields(s: FlsScene, X: np.ndarray, Y: np.ndarray) -> dict:
    """Slowly varying fields at points (um): tissue signed distance, lobule kind, septa.

    tissue: um, > 0 inside a fragment; fat, strlob: 0/1 lobule-kind indicators;
    sep: um from the septum edge (< 0 inside a septum).
    """
    X = np.asarray(X, np.float32)
    Y = np.asarray(Y, np.float32)
    x0, x1, y0, y1 = float(X.min()), float(X.max()), float(Y.min()), float(Y.max())
    tissue = np.full(X.shape, -1e4, np.float32)
    for i in s.frag_index.query(x0, y0, x1, y1):
        tissue = np.maximum(tissue, s.fragments[i].sdf(X, Y))
    if tissue.max() > -200:
        tissue = tissue + 14.0 * sc.value_noise(s.seed + 1, X, Y, 90.0) \
            + 5.0 * sc.value_noise(s.seed + 2, X, Y, 22.0)
    fat = np.zeros(X.shape, np.float32)
    strlob = np.zeros(X.shape, np.float32)
    sep = np.full(X.shape, 1e4, np.float32)
    reach = 1.6 * s.lob_spacing_um
    ids = s.lob_index.query(x0 - reach, y0 - reach, x1 + reach, y1 + reach)
    if len(ids) and tissue.max() > -50:
        d1 = np.full(X.shape, np.inf, np.float32)
        d2 = np.full(X.shape, np.inf, np.float32)
        i1 = np.zeros(X.shape, np.int64)
        i2 = np.zeros(X.shape, np.int64)
        wx = X + 70.0 * sc.value_noise(s.seed + 3, X, Y, 330.0) \
            + 15.0 * sc.value_noise(s.seed + 6, X, Y, 90.0)
        wy = Y + 70.0 * sc.value_noise(s.seed + 4, X, Y, 330.0) \
            + 15.0 * sc.value_noise(s.seed + 7, X, Y, 90.0)
        for i in ids:
            d = (wx - s.lob_x[i]) ** 2 + (wy - s.lob_y[i]) ** 2
            first = d < d1
            second = ~first & (d < d2)
            d2 = np.where(first, d1, np.where(second, d, d2))
            i2 = np.where(first, i1, np.where(second, i, i2))
            d1 = np.where(first, d, d1)
            i1 = np.where(first, i, i1)
        if len(ids) > 1:
            cd = np.hypot(s.lob_x[i1] - s.lob_x[i2], s.lob_y[i1] - s.lob_y[i2]) + 1e-3
            bis = (d2 - d1) / (2 * cd)
            half = 0.5 * (s.lob_sep_um[i1] + s.lob_sep_um[i2])
            sep = bis - half * (1 + 0.5 * sc.value_noise(s.seed + 5, X, Y, 70.0))
        kind = s.lob_kind[i1]
        fat = (kind == FAT).astype(np.float32)
        strlob = (kind == STROMA).astype(np.float32)
    return {"tissue": tissue, "fat": fat, "strlob": strlob, "sep": sep.astype(np.float32)}


def _region_masks(F: dict):
    tissue = F["tissue"] > 0
    septum = F["sep"] < 0
    fat = (F["fat"] > 0.5) & ~septum
    stroma = (F["strlob"] > 0.5) | septum
    gland = ~fat & ~stroma
    return tissue, gland, fat, stroma


# ----------------------------------------------------------------------------- labels


def label_tile(s: FlsScene, x0_um: float, y0_um: float, px_um: float, size: int) -> np.ndarray:
    """Label map (size, size) uint8 at `px_um` um/px with top-left corner (x0_um, y0_um)."""
    lab = np.zeros((size, size), np.uint8)
    X = (x0_um + (np.arange(size, dtype=np.float32) + 0.5) * px_um)[None, :]
    Y = (y0_um + (np.arange(size, dtype=np.float32) + 0.5) * px_um)[:, None]
    x1, y1 = x0_um + size * px_um, y0_um + size * px_um
    if len(s.frag_index.query(x0_um, y0_um, x1, y1)):
        F = sc.coarse_fields(lambda gx, gy: macro_fields(s, gx, gy), x0_um, y0_um, px_um,
                             size, coarse_step(px_um, size))
        tissue, gland, fat, stroma = _region_masks(F)
        lab[tissue & gland] = 2
        lab[tissue & stroma] = 1
        lab[tissue & fat] = 4
        if tissue.any():
            for objs, value, scale in ((s.vessels, 1, 1.0), (s.ducts, 3, 1.0),
                                       (s.foci, None, 1.0)):
                for i in objs.in_box(x0_um, y0_um, x1, y1):
                    r = max(objs.a[i], objs.b[i]) * scale
                    win = window((objs.x[i] - r, objs.y[i] - r, objs.x[i] + r, objs.y[i] + r),
                                 x0_um, y0_um, px_um, size)
                    if win is None:
                        continue
                    rs, cs = win
                    rho = _ellipse_rho(objs, i, X[:, cs], Y[rs, :])
                    v = value if value is not None else (
                        5 if objs.extra["n"][i] >= FOCUS_MIN_LYMPHOCYTES else 6)
                    sub = lab[rs, cs]
                    sub[(rho <= scale) & tissue[rs, cs]] = v
    pen_label(s, lab, x0_um, y0_um, px_um, 7)
    return lab


def _ellipse_rho(objs: Objects, i: int, X, Y):
    """Elliptical radius (1 on the boundary) of object i at points X, Y."""
    dx, dy = X - objs.x[i], Y - objs.y[i]
    c, s_ = np.cos(objs.angle[i]), np.sin(objs.angle[i])
    u = (dx * c + dy * s_) / objs.a[i]
    v = (dy * c - dx * s_) / objs.b[i]
    return np.sqrt(u * u + v * v)


# ----------------------------------------------------------------------------- rendering

# stain concentrations (OD units at the reference intensity); H = haematoxylin, E = eosin
C_STROMA_E, C_STROMA_H = 1.00, 0.08
C_INTERSTITIUM_E, C_INTERSTITIUM_H = 0.32, 0.07
C_SEROUS_E, C_SEROUS_H = 0.62, 0.46
C_MUCOUS_E, C_MUCOUS_H = 0.24, 0.32
C_DUCT_E, C_DUCT_H = 0.95, 0.16
C_NUCLEUS_H = 1.75
C_LYMPHOCYTE_H = 2.20
C_RBC_E = 1.10
ACINUS_SPACING_UM = 34.0


def _tile_px(x_um, y_um, x0, y0, mpp):
    return (np.asarray(x_um) - x0) / mpp, (np.asarray(y_um) - y0) / mpp


def _acini(s: FlsScene, x0_px, y0_px, size, X, Y, rng, nuc):
    """Acinar parenchyma: polygonal acini (Worley cells) with basal nuclei (stamps).

    Returns (cH, cE) for the whole tile; nuclei are max-composited into `nuc`.
    """
    mpp = s.mpp
    g = ACINUS_SPACING_UM
    cw = sc.pow2_cell(60.0, mpp, size)
    wx = 8.0 * sc.tile_noise(s.seed + 21, x0_px, y0_px, size, cw)
    wy = 8.0 * sc.tile_noise(s.seed + 22, x0_px, y0_px, size, cw)
    fx = (X + wx) * np.float32(1 / g)
    fy = (Y + wy) * np.float32(1 / g)
    t = sc.cell_table(s.seed + 23, fx, fy, 0.24, n_extra=5)
    d1, d2, id1 = sc.worley(t, fx, fy, 2)
    r1 = np.sqrt(d1)
    b = (np.sqrt(d2) - r1) * 0.5  # cell units to the acinus border
    rho = r1 / (r1 + b + np.float32(1e-6))
    p_muc = 0.15 + 0.15 * sc.value_noise(s.seed + 24, t.px * g, t.py * g, 500.0)
    mucous = (t.u[0] < p_muc).astype(np.float32)
    muc = mucous[id1]
    lumen_r = 0.10 + 0.12 * muc
    lumen = sc.smoothstep(lumen_r + 0.05, lumen_r, rho)
    border = sc.smoothstep(np.float32(1.3 / g), np.float32(0.2 / g), b)
    gran = 1.0 + 0.2 * sc.bank_window(rng, (size, size))
    cyto_e = (C_SEROUS_E + (C_MUCOUS_E - C_SEROUS_E) * muc) * gran
    cyto_h = (C_SEROUS_H + (C_MUCOUS_H - C_SEROUS_H) * muc) * gran
    # darker basal cytoplasm (serous), foamy mucous cytoplasm
    cyto_h = cyto_h * (1.0 + 0.35 * sc.smoothstep(0.45, 0.9, rho) * (1 - muc))
    keep = 1.0 - lumen
    cE = cyto_e * keep + 0.05 * lumen
    cH = cyto_h * keep
    cE += (C_INTERSTITIUM_E + 0.15 - cE) * border
    cH += (C_INTERSTITIUM_H - cH) * border

    # basal nuclei: n per acinus on a ring at ~0.65 (serous) / 0.85 (mucous) of its radius
    x0, y0 = x0_px * mpp, y0_px * mpp
    cxu, cyu = t.px * g, t.py * g
    span = size * mpp
    sel = np.nonzero((cxu > x0 - g) & (cxu < x0 + span + g) & (cyu > y0 - g)
                     & (cyu < y0 + span + g))[0]
    if not len(sel):
        return cH, cE
    half = (sc.neighbour_distance(s.seed + 23, t, sel, 0.24) * 0.5 * g).astype(np.float32)
    m = mucous[sel]
    nmax = 10
    n = np.where(m > 0, 5 + np.floor(t.u[1, sel] * 4), 6 + np.floor(t.u[1, sel] * 5))
    j = np.arange(nmax)[None, :]
    def cu(key):
        return sc.cell_uniforms(s.seed + 25, t, sel, nmax, key)

    ok = (j < n[:, None]) & (cu(1) > 0.15)
    th = (j + 0.36 * (cu(2) - 0.5)) * (2 * np.pi / n[:, None]) \
        + t.u[2, sel][:, None] * 6.283
    rad = half[:, None] * np.where(m > 0, 0.84, 0.64)[:, None] * (0.92 + 0.16 * cu(3))
    nx = cxu[sel][:, None] + np.cos(th) * rad
    ny = cyu[sel][:, None] + np.sin(th) * rad
    px, py = _tile_px(nx[ok], ny[ok], x0, y0, mpp)
    # undo the domain warp approximately (nucleus positions are in warped space); the
    # warp is evaluated at the points themselves, so neighbouring tiles agree
    gxp, gyp = px + x0_px, py + y0_px
    px = px - 8.0 * sc.value_noise(s.seed + 21, gxp, gyp, cw) / mpp
    py = py - 8.0 * sc.value_noise(s.seed + 22, gxp, gyp, cw) / mpp
    mm = np.broadcast_to(m[:, None], ok.shape)[ok]
    k4 = cu(4)[ok]
    ra = np.where(mm > 0, 3.6, 3.0) / mpp * (0.9 + 0.2 * k4)
    rb = np.where(mm > 0, 1.5, 2.7) / mpp * (0.9 + 0.2 * k4)
    ang = th[ok] + np.pi / 2
    tex = 0.8 + 0.25 * np.clip(sc.bank_window(rng, (size, size)), -1.5, 1.5)
    sc.stamp_ellipses(nuc, px, py, ra, rb, ang, C_NUCLEUS_H * (0.9 + 0.2 * cu(5)[ok]),
                      texture=tex, nuclear=True)
    return cH.astype(np.float32), cE.astype(np.float32)


def _stroma(s: FlsScene, x0_px, y0_px, size, rng):
    """Fibrous stroma: pink collagen bundles with thin white clefts. Returns (cH, cE)."""
    mpp = s.mpp
    fine = sc.pow2_cell(6.0, mpp, size)
    long_ = sc.pow2_cell(36.0, mpp, size)
    cx, cy = (long_, fine) if s.stroma_stretch == 0 else (fine, long_)
    n = sc.tile_noise(s.seed + 31, x0_px, y0_px, size, cx, cy) \
        + 0.5 * sc.tile_noise(s.seed + 32, x0_px, y0_px, size, max(cx // 2, 2), max(cy // 2, 2))
    clefts = sc.smoothstep(0.2, 0.0, np.abs(n))
    bundles = 0.8 + 0.3 * sc.tile_noise(s.seed + 33, x0_px, y0_px, size,
                                        sc.pow2_cell(90.0, mpp, size))
    grain = 1.0 + 0.12 * sc.bank_window(rng, (size, size))
    cE = C_STROMA_E * bundles * (1.0 - 0.8 * clefts) * grain
    cH = C_STROMA_H * grain
    return cH.astype(np.float32), cE.astype(np.float32)


def _fat(s: FlsScene, x0_px, y0_px, size, X, Y):
    """Adipocytes: warped Worley cells ~70 um with thin membranes. Returns (cH, cE)."""
    g = 70.0
    cw = sc.pow2_cell(50.0, s.mpp, size)
    fx = (X + 9.0 * sc.tile_noise(s.seed + 42, x0_px, y0_px, size, cw)) * np.float32(1 / g)
    fy = (Y + 9.0 * sc.tile_noise(s.seed + 43, x0_px, y0_px, size, cw)) * np.float32(1 / g)
    t = sc.cell_table(s.seed + 41, fx, fy, 0.4, n_extra=1)
    d1, d2, _ = sc.worley(t, fx, fy, 3)
    edge = (np.sqrt(d2) - np.sqrt(d1)) * (g * 0.5)  # um to the membrane
    membrane = sc.smoothstep(1.3, 0.3, edge)
    cE = 0.01 + 0.55 * membrane
    cH = 0.06 * membrane
    return cH.astype(np.float32), cE.astype(np.float32)


def _ring_object(objs: Objects, i: int, X, Y, kind: str, seed: int):
    """Duct or vessel on its window: (coverage, cH, cE, lumen weight, nuclei list).

    nuclei list: tuples of arrays (x_um, y_um, ra_um, rb_um, angle, relative strength).
    """
    dx, dy = X - objs.x[i], Y - objs.y[i]
    c, s_ = np.cos(objs.angle[i]), np.sin(objs.angle[i])
    u = (dx * c + dy * s_) / objs.a[i]
    v = (dy * c - dx * s_) / objs.b[i]
    rho = np.sqrt(u * u + v * v)
    R = float(np.sqrt(objs.a[i] * objs.b[i]))
    a, b, ang = float(objs.a[i]), float(objs.b[i]), float(objs.angle[i])
    lum = float(objs.extra["lumen"][i])
    cuff = float(objs.extra["cuff"][i])
    cover = sc.smoothstep(1.0 + cuff + 0.06, 1.0 + cuff - 0.02, rho)
    epi = sc.smoothstep(lum - 0.03, lum + 0.03, rho) * sc.smoothstep(1.02, 0.97, rho)
    lumen = sc.smoothstep(lum + 0.02, lum - 0.02, rho)
    cuffm = sc.smoothstep(0.97, 1.02, rho)
    nuclei = []
    cx, cy = float(objs.x[i]), float(objs.y[i])
    rng = sc.object_rng(seed, 3 if kind == "duct" else 4, i)
    if kind == "duct":
        layers = 2 if objs.extra["big"][i] > 0 else 1
        cE = C_DUCT_E * epi + 0.7 * cuffm + 0.14 * lumen
        cH = C_DUCT_H * epi + 0.05 * cuffm
        for layer in range(layers):
            rn = lum + (1.0 - lum) * ((layer + 0.5) / layers) * (0.9 if layers == 1 else 1.0)
            x, y, tang = sc.ring_points(rng, cx, cy, a, b, ang, rn, 6.8, 0.2, 0.1)
            nuclei.append((x, y, np.full(len(x), 2.6), np.full(len(x), 2.3), tang + np.pi / 2,
                           rng.uniform(0.9, 1.1, len(x))))
        lumen_w = None
    else:  # vessel: endothelium + media, red cells in the lumen
        endo_w = 1.3 / R
        endo = sc.smoothstep(lum - 0.02, lum + 0.02, rho) * sc.smoothstep(
            lum + endo_w + 0.02, lum + endo_w, rho)
        cE = 0.72 * epi + 0.3 * endo + 0.62 * cuffm
        cH = 0.06 * epi
        x, y, tang = sc.ring_points(rng, cx, cy, a, b, ang, lum + 0.6 / R, 16.0, 0.3, 0.3)
        nuclei.append((x, y, np.full(len(x), 3.4), np.full(len(x), 1.1), tang,
                       rng.uniform(0.9, 1.1, len(x))))
        if (1.0 - lum) * R > 6:
            x, y, tang = sc.ring_points(rng, cx, cy, a, b, ang, (1 + lum) / 2, 9.0, 0.3, 0.2)
            nuclei.append((x, y, np.full(len(x), 4.0), np.full(len(x), 1.2), tang,
                           rng.uniform(0.8, 1.0, len(x))))
        lumen_w = lumen * float(objs.extra["fill"][i])
    return cover, cH.astype(np.float32), cE.astype(np.float32), lumen_w, nuclei


def render_tile(s: FlsScene, x0_px: int, y0_px: int, size: int) -> np.ndarray | None:
    """RGB uint8 (size, size, 3) of the tile at level-0 pixel (x0_px, y0_px); None = glass."""
    return render_tissue_tile(s, s.frag_index, 1, macro_fields, _paint_tissue, x0_px, y0_px,
                              size)


def _paint_tissue(s: FlsScene, F, x0_px, y0_px, size, X, Y, rng, cH, cE):
    """Fill stain concentrations of all tissue compartments into cH, cE (in place)."""
    mpp = s.mpp
    x0, y0 = x0_px * mpp, y0_px * mpp
    x1, y1 = x0 + size * mpp, y0 + size * mpp
    _, gland, fat, stroma = _region_masks(F)
    nuc = np.zeros((size, size), np.float32)
    if gland.any():
        h, e = _acini(s, x0_px, y0_px, size, X, Y, rng, nuc)
        nuc *= gland
        cH[gland] = h[gland]
        cE[gland] = e[gland]
    if stroma.any():
        h, e = _stroma(s, x0_px, y0_px, size, rng)
        cH[stroma] = h[stroma]
        cE[stroma] = e[stroma]
        _fibroblasts(s, x0, y0, x1, y1, size, stroma, nuc)
    if fat.any():
        h, e = _fat(s, x0_px, y0_px, size, X, Y)
        cH[fat] = h[fat]
        cE[fat] = e[fat]
    rbc = np.zeros((size, size), np.float32)
    stamps = []
    for objs, kind in ((s.vessels, "vessel"), (s.ducts, "duct")):
        for i in objs.in_box(x0, y0, x1, y1):
            r = max(objs.a[i], objs.b[i]) * (1.0 + float(objs.extra["cuff"][i]) + 0.1)
            win = window((objs.x[i] - r, objs.y[i] - r, objs.x[i] + r, objs.y[i] + r),
                         x0, y0, mpp, size)
            if win is None:
                continue
            rs, cs = win
            cover, h, e, lumen_w, nuclei = _ring_object(objs, i, X[:, cs], Y[rs, :], kind,
                                                        s.seed)
            cH[rs, cs] += (h - cH[rs, cs]) * cover
            cE[rs, cs] += (e - cE[rs, cs]) * cover
            nuc[rs, cs] *= 1 - cover
            stamps.extend(nuclei)
            if lumen_w is not None and lumen_w.max() > 0:
                _red_cells(s, i, objs, x0, y0, size, rs, cs, lumen_w, rbc)
    for x, y, ra, rb, ang, amp in stamps:
        px, py = _tile_px(x, y, x0, y0, mpp)
        sc.stamp_ellipses(nuc, px, py, ra / mpp, rb / mpp, ang, C_NUCLEUS_H * amp,
                          nuclear=True)
    # lymphocytic foci / aggregates: interstitial background inside their ellipse
    for i in s.foci.in_box(x0, y0, x1, y1):
        r = max(s.foci.a[i], s.foci.b[i]) * 1.15
        win = window((s.foci.x[i] - r, s.foci.y[i] - r, s.foci.x[i] + r, s.foci.y[i] + r),
                     x0, y0, mpp, size)
        if win is None:
            continue
        rs, cs = win
        rho = _ellipse_rho(s.foci, i, X[:, cs], Y[rs, :])
        focus = s.foci.extra["n"][i] >= FOCUS_MIN_LYMPHOCYTES
        w = sc.smoothstep(1.0, 0.75, rho) * (0.95 if focus else 0.6)
        cH[rs, cs] += (C_INTERSTITIUM_H * 2.5 - cH[rs, cs]) * w
        cE[rs, cs] += (C_INTERSTITIUM_E * 1.2 - cE[rs, cs]) * w
        nuc[rs, cs] *= 1 - w
    # lymphocyte nuclei (explicit, counted)
    ids = s.lym_index.query(x0 - 5, y0 - 5, x1 + 5, y1 + 5)
    if len(ids):
        k = sc.hash_uniform(s.seed + 77, ids)
        rad = (LYMPHOCYTE_RADIUS_UM * (0.88 + 0.22 * k)) / mpp
        tex = 0.82 + 0.22 * np.clip(sc.bank_window(rng, (size, size)), -1.5, 1.5)
        px, py = _tile_px(s.lym_x[ids], s.lym_y[ids], x0, y0, mpp)
        sc.stamp_ellipses(nuc, px, py, rad, rad * (0.86 + 0.12 * k), k * 3.1,
                          C_LYMPHOCYTE_H * (0.88 + 0.24 * k), edge_px=0.9, texture=tex,
                          nuclear=True)
    # nuclei replace cytoplasm colour
    cE *= 1.0 - 0.35 * np.clip(nuc, 0, 1)
    np.maximum(cH, nuc, out=cH)
    if rbc.any():
        cE += (C_RBC_E - cE) * rbc
        cH *= 1 - 0.8 * rbc


def _fibroblasts(s: FlsScene, x0, y0, x1, y1, size, stroma, nuc):
    """Spindle fibroblast nuclei scattered in the stroma (procedural, not counted)."""
    mpp = s.mpp
    px, py, u = sc.jittered_points(s.seed + 51, x0 - 8, y0 - 8, x1 + 8, y1 + 8, 20.0, 0.6)
    if not len(px):
        return
    cx, cy = _tile_px(px, py, x0, y0, mpp)
    ii = np.clip(cy.astype(np.int64), 0, size - 1)
    jj = np.clip(cx.astype(np.int64), 0, size - 1)
    keep = stroma[ii, jj]
    if not keep.any():
        return
    ang = (0.0 if s.stroma_stretch == 0 else np.pi / 2) + (u[keep] - 0.5) * 0.8
    sc.stamp_ellipses(nuc, cx[keep], cy[keep], (3.6 + 2.4 * u[keep]) / mpp,
                      (1.1 + 0.4 * u[keep]) / mpp, ang, C_NUCLEUS_H * (0.85 + 0.2 * u[keep]),
                      nuclear=True)


def _red_cells(s, i, objs, x0, y0, size, rs, cs, lumen_w, rbc):
    """Red cells (eosin-dense discs, 7.5 um) packed in a vessel lumen."""
    mpp = s.mpp
    r = float(max(objs.a[i], objs.b[i]))
    px, py, u = sc.jittered_points(s.seed + 61 + i, objs.x[i] - r, objs.y[i] - r,
                                   objs.x[i] + r, objs.y[i] + r, 6.0, 0.9)
    if not len(px):
        return
    tmp = np.zeros((size, size), np.float32)
    cx, cy = _tile_px(px, py, x0, y0, mpp)
    sc.stamp_ellipses(tmp, cx, cy, 3.6 / mpp, 3.2 / mpp, u * 3.0, 1.0)
    np.maximum(rbc[rs, cs], tmp[rs, cs] * lumen_w, out=rbc[rs, cs])



# ----------------------------------------------------------------------------- scene build


def _place_fragments(rng, W, H, target_mm2) -> list[sc.Blob]:
    """Tissue fragments (blobs) of total area ~`target_mm2`, inside the slide.

    Greedy packing on a coarse occupancy grid: each fragment goes where a random free spot
    leaves room for it (distance transform), shrunk to the largest free circle if needed.
    """
    from scipy.ndimage import distance_transform_edt

    margin = 0.03 * min(W, H)
    cell = max(W, H) / 400.0
    nx, ny = int(np.ceil(W / cell)), int(np.ceil(H / cell))
    gx = ((np.arange(nx) + 0.5) * cell).astype(np.float32)[None, :]
    gy = ((np.arange(ny) + 0.5) * cell).astype(np.float32)[:, None]
    occ = np.zeros((ny, nx), bool)
    occ[((gy < margin) | (gy > H - margin))[:, 0], :] = True
    occ[:, ((gx < margin) | (gx > W - margin))[0]] = True
    n = int(np.clip(max(round(target_mm2 / 8.0), 3 if target_mm2 > 3 else 1), 1, 60))
    areas = list(target_mm2 * 1e6 / n * rng.uniform(0.6, 1.4, n))
    areas = sorted(np.array(areas) * target_mm2 * 1e6 / sum(areas), reverse=True)
    blobs: list[sc.Blob] = []
    remaining = target_mm2 * 1e6
    gap = 60.0
    while areas and len(blobs) < 60 and remaining > 0.05 * target_mm2 * 1e6:
        area = areas.pop(0)
        free = distance_transform_edt(~occ) * cell
        want = np.sqrt(min(area, remaining) / np.pi)
        room = free >= want * 1.15 + gap
        if room.any():
            ys, xs = np.nonzero(room)
            k = int(rng.integers(len(xs)))
            r = want
        else:
            ys, xs = np.unravel_index(np.argmax(free), free.shape)
            ys, xs, k = np.array([ys]), np.array([xs]), 0
            r = (free[ys[0], xs[0]] - gap) / 1.15
            if r < max(0.25 * want, 60.0):
                break
            areas.append(area - np.pi * r * r)  # offer the rest again later
        asp = rng.uniform(1.0, 1.5)
        b = sc.random_blob(rng, float(gx[0, xs[k]]), float(gy[ys[k], 0]), r, asp, 0.06)
        # keep the blob inside its free circle
        fit = (free[ys[k], xs[k]] - gap / 2) / (b.radius_um + 1e-6)
        if fit < 1.0:
            b.a_um *= fit
            b.b_um *= fit
        blobs.append(b)
        remaining -= np.pi * b.a_um * b.b_um
        occ |= b.sdf(gx, gy) > -gap
        areas.sort(reverse=True)
    return blobs


def _sdf_all(blobs, X, Y):
    out = np.full(np.shape(X), -1e4, np.float32)
    for b in blobs:
        out = np.maximum(out, b.sdf(X, Y))
    return out


def build(task: str, seed: int, width_px: int, height_px: int, mpp: float,
          label: str | None, pen: bool, fold: bool) -> FlsScene:
    """Build an fls scene. `label`: 'positive', 'negative' or None (drawn from the seed)."""
    rng = np.random.default_rng([seed, 1101])
    stains = sc.perturbed_stains(rng, sc.HE_VECTORS, ("hematoxylin", "eosin"))
    W, H = width_px * mpp, height_px * mpp
    if label is None:
        label = "positive" if rng.random() < 0.5 else "negative"
    target_fs = rng.uniform(1.5, 3.0) if label == "positive" else rng.uniform(0.0, 0.6)
    s = FlsScene(task=task, seed=int(seed), width_px=int(width_px), height_px=int(height_px),
                 mpp=float(mpp), stains=stains, label=label, target_fs=float(target_fs),
                 stroma_stretch=int(rng.integers(0, 2)))
    slide_mm2 = W * H / 1e6
    frac = float(np.clip(0.5 * (30.0 / max(slide_mm2, 1e-3)) ** 0.3, 0.22, 0.55))
    blobs = _place_fragments(rng, W, H, slide_mm2 * frac)
    s.fragments = blobs
    s.frag_index = sc.SpatialIndex(2000.0)
    for i, b in enumerate(blobs):
        r = b.radius_um * 1.05 + 60
        s.frag_index.insert(i, b.x_um - r, b.y_um - r, b.x_um + r, b.y_um + r)

    # lobules per fragment (jittered grid of centres)
    lx, ly, lk, lw = [], [], [], []
    spacing = float(np.clip(np.sqrt(slide_mm2 * frac * 1e6 / max(len(blobs), 1)) / 2.6,
                            280.0, 950.0))
    s.lob_spacing_um = spacing
    for b in blobs:
        r = b.radius_um
        px, py, _ = sc.jittered_points(int(rng.integers(1 << 30)), b.x_um - r, b.y_um - r,
                                       b.x_um + r, b.y_um + r, spacing)
        d = b.sdf(px, py)
        keep = d > -0.35 * spacing
        px, py, d = px[keep], py[keep], d[keep]
        kinds = np.full(len(px), GLAND)
        u = rng.random(len(px))
        p_fat = np.where(d < 0.5 * spacing, 0.30, 0.10)
        kinds[u < p_fat] = FAT
        kinds[(u >= p_fat) & (u < p_fat + 0.10)] = STROMA
        if len(kinds) and not (kinds == GLAND).any():
            kinds[np.argmax(d)] = GLAND
        lx.append(px)
        ly.append(py)
        lk.append(kinds)
        lw.append(rng.uniform(5.0, 14.0, len(px)))
    s.lob_x = np.concatenate(lx).astype(np.float32) if lx else np.zeros(0, np.float32)
    s.lob_y = np.concatenate(ly).astype(np.float32) if ly else np.zeros(0, np.float32)
    s.lob_kind = np.concatenate(lk).astype(np.int8) if lk else np.zeros(0, np.int8)
    s.lob_sep_um = np.concatenate(lw).astype(np.float32) if lw else np.zeros(0, np.float32)
    s.lob_index = sc.build_index(s.lob_x, s.lob_y, np.zeros(len(s.lob_x)), 2000.0)
    empty = Objects.make([], 500.0)
    s.ducts = s.vessels = s.foci = empty
    s.lym_x = s.lym_y = np.zeros(0, np.float32)

    def fields_at(px, py):
        return macro_fields(s, np.asarray(px, np.float32), np.asarray(py, np.float32))

    def gland_ok(px, py, clearance=0.0):
        F = fields_at(px, py)
        return (F["tissue"] > clearance) & (F["fat"] < 0.5) & (F["strlob"] < 0.5) & (
            F["sep"] > clearance * 0.5)

    # ducts: intralobular (in glandular lobules) and excretory (on septa between lobules)
    occupied = _Occupancy(250.0)

    def free(x, y, r, pad=8.0):
        return occupied.free(x, y, r + pad)

    ducts: list[dict] = []
    gland_lobs = np.nonzero(s.lob_kind == GLAND)[0]
    for li in gland_lobs:
        n = max(1, rng.poisson(spacing * spacing / 1e6 * 7.0))
        for _ in range(n):
            for _try in range(12):
                ang = rng.uniform(0, 2 * np.pi)
                dist = rng.uniform(0, 0.4) * spacing
                x = s.lob_x[li] + np.cos(ang) * dist
                y = s.lob_y[li] + np.sin(ang) * dist
                r = rng.uniform(12.0, 24.0)
                if gland_ok([x], [y], r + 15)[0] and free(x, y, r):
                    asp = rng.uniform(1.0, 1.5)
                    d = dict(x=x, y=y, a=r * np.sqrt(asp), b=r / np.sqrt(asp),
                             angle=rng.uniform(0, np.pi), lumen=rng.uniform(0.28, 0.45),
                             cuff=rng.uniform(0.05, 0.15), big=0.0, fill=0.0)
                    d["reach"] = r * np.sqrt(asp) * (1 + d["cuff"]) + 2
                    ducts.append(d)
                    occupied.add(x, y, r * (1 + d["cuff"]))
                    break
    # excretory ducts and vessels on septa: midpoints between neighbouring lobules
    vessels: list[dict] = []
    if len(s.lob_x) > 1:
        for li in range(len(s.lob_x)):
            dd = np.hypot(s.lob_x - s.lob_x[li], s.lob_y - s.lob_y[li])
            for lj in np.nonzero((dd > 0) & (dd < 1.5 * spacing))[0]:
                if lj < li:
                    continue
                mx = 0.5 * (s.lob_x[li] + s.lob_x[lj])
                my = 0.5 * (s.lob_y[li] + s.lob_y[lj])
                tx, ty = -(s.lob_y[lj] - s.lob_y[li]), s.lob_x[lj] - s.lob_x[li]
                tn = np.hypot(tx, ty) + 1e-6
                for kind in ("duct", "vessel", "vessel"):
                    t = rng.uniform(-0.4, 0.4) * spacing
                    x, y = mx + tx / tn * t, my + ty / tn * t
                    is_duct = kind == "duct"
                    if is_duct and (s.lob_kind[li] != GLAND or rng.random() > 0.35):
                        continue
                    r = rng.uniform(35.0, 80.0) if is_duct else rng.uniform(8.0, 28.0)
                    F = fields_at([x], [y])
                    if F["tissue"][0] < r + 10 or not free(x, y, r):
                        continue
                    asp = rng.uniform(1.0, 1.4)
                    d = dict(x=x, y=y, a=r * np.sqrt(asp), b=r / np.sqrt(asp),
                             angle=rng.uniform(0, np.pi),
                             lumen=rng.uniform(0.45, 0.6) if is_duct else rng.uniform(0.55, 0.8),
                             cuff=rng.uniform(0.25, 0.45) if is_duct else rng.uniform(0.1, 0.3),
                             big=1.0 if is_duct else 0.0,
                             fill=0.0 if is_duct else rng.uniform(0.2, 0.9))
                    d["reach"] = r * np.sqrt(asp) * (1 + d["cuff"]) + 2
                    (ducts if is_duct else vessels).append(d)
                    occupied.add(x, y, r * (1 + d["cuff"]))
    s.ducts = Objects.make(ducts, 500.0)
    s.vessels = Objects.make(vessels, 500.0)

    # artefacts (before the area estimate: pen ink hides tissue)
    if pen and blobs:
        b = blobs[int(rng.integers(len(blobs)))]
        ang = rng.uniform(0, 2 * np.pi)
        for _ in range(64):  # walk out from the centre to the fragment edge
            ex, ey = b.x_um + np.cos(ang) * b.radius_um, b.y_um + np.sin(ang) * b.radius_um
            for t in np.linspace(0, 1, 60):
                px_ = b.x_um + (ex - b.x_um) * t
                py_ = b.y_um + (ey - b.y_um) * t
                if b.sdf(np.float32(px_), np.float32(py_)) < 0:
                    break
            if 0 < px_ < W and 0 < py_ < H:
                break
            ang = rng.uniform(0, 2 * np.pi)
        s.pen = sc.random_pen(rng, W, H, (px_, py_), ang)
    if fold and blobs:
        s.fold = sc.random_fold(rng, blobs[0])
    s.dust = sc.random_dust(rng, W, H)

    # glandular area estimate on a 10 um grid (the exact value comes from the label mask)
    gland_mm2 = 0.0
    step = float(np.clip(np.sqrt(slide_mm2 * frac) * 1e3 / 1500.0, 5.0, 20.0))
    for b in blobs:
        r = b.radius_um + 30
        xs = np.arange(b.x_um - r, b.x_um + r, step, dtype=np.float32)
        for y_ in np.arange(b.y_um - r, b.y_um + r, step * 64):
            ys = np.arange(y_, min(y_ + step * 64, b.y_um + r), step, dtype=np.float32)
            gx, gy = np.meshgrid(xs, ys)
            F = fields_at(gx, gy)
            t = (F["tissue"] > 0) & (_sdf_all([b], gx, gy) >= _sdf_all(blobs, gx, gy) - 1e-3)
            g = t & ~((F["fat"] > 0.5) & (F["sep"] >= 0))
            if s.pen is not None:
                g &= s.pen.coverage(s.seed, gx, gy) <= 0.5
            gland_mm2 += float(g.sum()) * step * step / 1e6
    s.gland_mm2_estimate = gland_mm2

    # foci (>= 50 lymphocytes) and sub-threshold aggregates, mostly periductal
    if label == "positive":
        n_foci = max(1, choose_counts_for_rate(target_fs, gland_mm2, 4.0, 1.2, 3.5))
    else:
        n_foci = choose_counts_for_rate(target_fs, gland_mm2, 4.0, 0.0, 0.6)
    n_aggr = int(rng.integers(1, 3) + rng.poisson(gland_mm2 / 6.0))
    sizes = [int(np.clip(rng.lognormal(np.log(110), 0.45), 55, 450)) for _ in range(n_foci)]
    sizes += [int(rng.integers(15, 41)) for _ in range(n_aggr)]
    foci: list[dict] = []
    foci_occ = _Occupancy(500.0)
    duct_xy = np.array([(d["x"], d["y"], max(d["a"], d["b"])) for d in ducts],
                       np.float32).reshape(-1, 3)
    lym = []
    for k, n in enumerate(sizes):
        is_focus = k < n_foci
        spacing_l = rng.uniform(6.7, 7.4) if is_focus else rng.uniform(9.5, 12.5)
        area = n * 0.866 * spacing_l ** 2 / 0.82
        asp = rng.uniform(1.0, 1.6)
        a = np.sqrt(area / np.pi * asp)
        b = np.sqrt(area / np.pi / asp)
        for _try in range(60):
            if len(ducts) and rng.random() < 0.8:
                d = ducts[int(rng.integers(len(ducts)))]
                ang = rng.uniform(0, 2 * np.pi)
                dist = max(d["a"], d["b"]) * 0.9 + 0.55 * b
                x, y = d["x"] + np.cos(ang) * dist, d["y"] + np.sin(ang) * dist
            elif len(gland_lobs):
                li = gland_lobs[int(rng.integers(len(gland_lobs)))]
                x = s.lob_x[li] + rng.uniform(-0.4, 0.4) * spacing
                y = s.lob_y[li] + rng.uniform(-0.4, 0.4) * spacing
            else:
                break
            th = np.linspace(0, 2 * np.pi, 12, endpoint=False)
            ring_x = np.r_[x, x + np.cos(th) * a * 1.1]
            ring_y = np.r_[y, y + np.sin(th) * b * 1.1]
            F = fields_at(ring_x, ring_y)
            ok = (F["tissue"] > 5).all() and ((F["fat"] < 0.5) | (F["sep"] < 0)).all()
            if s.pen is not None:
                ok = ok and (s.pen.coverage(s.seed, ring_x, ring_y) < 0.1).all()
            clear = foci_occ.free(x, y, max(a, b) + 40)
            if ok and clear:
                break
        else:
            if is_focus:
                continue  # no room: the focus count below reflects what was placed
            continue
        angle = rng.uniform(0, np.pi)
        pts = _pack_lymphocytes(rng, x, y, a, b, angle, n, spacing_l, duct_xy)
        if pts is None:
            continue
        px, py, a_eff, b_eff = pts
        foci.append(dict(x=x, y=y, a=a_eff, b=b_eff, angle=angle, n=float(n),
                         reach=max(a_eff, b_eff) * 1.15))
        foci_occ.add(x, y, max(a_eff, b_eff))
        lym.append((px, py, np.full(n, len(foci) - 1)))
    # scattered single lymphocytes in glandular tissue (~40 per mm2)
    n_sc = int(rng.poisson(gland_mm2 * 40))
    if n_sc and blobs:
        xs, ys = [], []
        areas = np.array([b.a_um * b.b_um for b in blobs])
        picks = rng.choice(len(blobs), size=n_sc * 2, p=areas / areas.sum())
        for bi in range(len(blobs)):
            m = int((picks == bi).sum())
            if not m:
                continue
            b = blobs[bi]
            r = b.radius_um
            cx = rng.uniform(b.x_um - r, b.x_um + r, m).astype(np.float32)
            cy = rng.uniform(b.y_um - r, b.y_um + r, m).astype(np.float32)
            ok = gland_ok(cx, cy, 2.0)
            for f in foci:
                ok &= np.hypot((cx - f["x"]) / f["a"], (cy - f["y"]) / f["b"]) > 1.3
            xs.append(cx[ok])
            ys.append(cy[ok])
        if xs:
            cx, cy = np.concatenate(xs)[:n_sc], np.concatenate(ys)[:n_sc]
            lym.append((cx, cy, np.full(len(cx), -1)))
    s.foci = Objects.make(foci, 500.0)
    if lym:
        s.lym_x = np.concatenate([p[0] for p in lym]).astype(np.float32)
        s.lym_y = np.concatenate([p[1] for p in lym]).astype(np.float32)
        s.lym_group = np.concatenate([p[2] for p in lym]).astype(np.int32)
    else:
        s.lym_group = np.zeros(0, np.int32)
    s.lym_index = sc.PointIndex(s.lym_x, s.lym_y, 128.0)
    s.options = {"target_focus_score": round(float(target_fs), 3),
                 "glandular_mm2_estimate": round(gland_mm2, 4)}
    return s


class _Occupancy:
    """Discs already placed (um), in a grid hash, to keep new objects from overlapping."""

    def __init__(self, cell_um: float):
        self.cell = cell_um
        self.grid: dict[tuple[int, int], list[tuple[float, float, float]]] = {}

    def add(self, x: float, y: float, r: float) -> None:
        c = self.cell
        for i in range(int((x - r) // c), int((x + r) // c) + 1):
            for j in range(int((y - r) // c), int((y + r) // c) + 1):
                self.grid.setdefault((i, j), []).append((x, y, r))

    def free(self, x: float, y: float, r: float) -> bool:
        c = self.cell
        for i in range(int((x - r) // c), int((x + r) // c) + 1):
            for j in range(int((y - r) // c), int((y + r) // c) + 1):
                for ox, oy, orr in self.grid.get((i, j), ()):
                    if (x - ox) ** 2 + (y - oy) ** 2 < (r + orr) ** 2:
                        return False
        return True


def _pack_lymphocytes(rng, x, y, a, b, angle, n, spacing, ducts):
    """n lymphocyte centres packed (hexagonal, jittered) in an ellipse, densest centrally.

    Returns (px, py, a_eff, b_eff): centres (um) and the ellipse that holds them.
    """
    scale = 1.35
    hx = np.arange(-a * scale, a * scale + spacing, spacing)
    hy = np.arange(-b * scale, b * scale + spacing, spacing * 0.866)
    gx, gy = np.meshgrid(hx, hy)
    gx = gx + (np.arange(len(hy))[:, None] % 2) * spacing * 0.5
    gx, gy = gx.ravel(), gy.ravel()
    rho = np.sqrt((gx / a) ** 2 + (gy / b) ** 2)
    c, s_ = np.cos(angle), np.sin(angle)
    px = x + gx * c - gy * s_
    py = y + gx * s_ + gy * c
    ok = np.ones(len(px), bool)
    near = np.hypot(ducts[:, 0] - x, ducts[:, 1] - y) < max(a, b) * scale + ducts[:, 2] * 1.5
    for dx_, dy_, dr_ in ducts[near]:
        ok &= np.hypot(px - dx_, py - dy_) > dr_ * 1.1 + 4
    order = np.argsort(rho + rng.uniform(0, 0.35, len(rho)) + np.where(ok, 0, 100))
    if ok.sum() < n:
        return None
    sel = order[:n]
    jit = spacing * 0.2
    px = px[sel] + rng.uniform(-jit, jit, n)
    py = py[sel] + rng.uniform(-jit, jit, n)
    reach = float(rho[sel].max()) + 3.5 / min(a, b)
    return px.astype(np.float32), py.astype(np.float32), a * reach, b * reach


# ----------------------------------------------------------------------------- truth


def truth(s: FlsScene, areas: dict) -> dict:
    """Task part of truth.json from the scene and label-mask areas (mm2 by legend name)."""
    tissue = sum(v for k, v in areas.items() if k not in ("background", "pen"))
    glandular = sum(areas.get(LEGEND[k], 0.0) for k in GLANDULAR)
    n = s.foci.extra.get("n", np.zeros(0))
    is_focus = n >= FOCUS_MIN_LYMPHOCYTES
    n_foci = int(is_focus.sum())
    fs = 4.0 * n_foci / glandular if glandular > 0 else 0.0
    focus_area_um2 = float((np.pi * s.foci.a * s.foci.b)[is_focus].sum()) if n_foci else 0.0
    objects = []
    for i in range(len(s.foci)):
        objects.append({
            "type": "focus" if is_focus[i] else "aggregate",
            "x_um": round(float(s.foci.x[i]), 2), "y_um": round(float(s.foci.y[i]), 2),
            "area_um2": round(float(np.pi * s.foci.a[i] * s.foci.b[i]), 1),
            "lymphocytes": int(n[i]),
            "semi_axes_um": [round(float(s.foci.a[i]), 2), round(float(s.foci.b[i]), 2)],
            "angle_rad": round(float(s.foci.angle[i]), 4),
        })
    return {
        "diagnosis": {"label": "positive" if fs >= 1.0 else "negative",
                      "adequate": bool(glandular >= 8.0)},
        "scores": {"focus_score": round(fs, 4),
                   "focus_area_fraction": round(focus_area_um2 / 1e6 / glandular, 5)
                   if glandular > 0 else 0.0},
        "counts": {"foci": n_foci,
                   "lymphocytes_in_foci": int(n[is_focus].sum()) if n_foci else 0,
                   "aggregates_below_threshold": int((~is_focus).sum()),
                   "lymphocytes_total": int(len(s.lym_x)),
                   "ducts": int(len(s.ducts)), "fragments": len(s.fragments)},
        "areas_mm2": {"tissue": round(tissue, 5), "glandular": round(glandular, 5),
                      "fat": round(areas.get("fat", 0.0), 5),
                      "foci": round(areas.get("focus", 0.0), 5),
                      "pen": round(areas.get("pen", 0.0), 5)},
        "objects": objects,
    }


def arrays(s: FlsScene) -> dict:
    """Large truth arrays for the zarr store."""
    xy = np.stack([s.lym_x, s.lym_y], axis=1).astype(np.float32)
    return {
        "lymphocytes": (xy, {"units": "um", "columns": ["x_um", "y_um"],
                             "description": "all lymphocyte nucleus centres"}),
        "lymphocyte_group": (s.lym_group.astype(np.int32), {
            "description": "index into truth.json objects (foci/aggregates), -1 = scattered"}),
    }


SPEC = SynthSpec(
    name="fls", legend=LEGEND, labels=("positive", "negative"),
    default_size_px=(12000, 9000), default_mpp=0.5, build=build, render_tile=render_tile,
    label_tile=label_tile, truth=truth, arrays=arrays, tissue_classes=(1, 2, 3, 4, 5, 6),
)
