"""Synthetic PAS-stained kidney needle biopsies for `kidney-layer` and `mesangial`.

Scene (sizes in um, from standard renal histology; human by default, see `Species`):
- needle cores: long bands (~0.6-1.1 mm wide) along a gently curved centreline; each core
  has a cortical part and a medullary part, split at a wavy corticomedullary junction;
- cortex: packed convoluted tubules (polygonal profiles ~45 um: PAS-magenta basement
  membrane and brush border, pale pink cytoplasm, round basal nuclei; some distal
  tubules without brush border) and glomeruli;
- glomeruli (150-250 um across): Bowman's capsule (magenta) with flat parietal nuclei,
  a clear urinary space, a lobulated tuft of capillary loops (magenta basement
  membranes round open lumina) with podocyte/endothelial nuclei and mesangial areas
  (PAS-positive matrix) holding a controlled number of mesangial cells;
- medulla: straight tubules and collecting ducts running along the core axis, more
  interstitium; vasa recta with red cells.

Stains: haematoxylin and PAS magenta (`scene.PAS_VECTORS`), perturbed per slide.

Mesangial hypercellularity [Oxford MEST-C]: a glomerulus is hypercellular when any
mesangial area holds > 3 mesangial cells; M1 when more than half of the glomeruli are
hypercellular, else M0; a biopsy with >= 8 glomeruli is adequate. Normocellular
glomeruli here have 1-3 cells in every area; hypercellular ones 4-7 in most areas.

Label legend: see `LEGEND`; cortex area = cortex + glomeruli labels; tissue = label not
in {background, pen}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import scene as sc
from .common import (
    SlideBase,
    SynthSpec,
    coarse_step,
    pen_label,
    render_tissue_tile,
    window,
)

LEGEND = {0: "background", 1: "cortex", 2: "medulla", 3: "glomerulus",
          4: "glomerulus_hypercellular", 7: "pen"}
CORTEX_LABELS = (1, 3, 4)
HYPERCELLULAR_MIN_CELLS = 4  # > 3 mesangial cells in a mesangial area


@dataclass(frozen=True)
class Species:
    """Size parameters of a species' kidney (um); mouse can be added as another profile."""

    name: str = "human"
    glomerulus_diameter_um: tuple[float, float] = (150.0, 250.0)
    tubule_spacing_um: float = 46.0
    medulla_tubule_period_um: float = 40.0
    core_width_um: tuple[float, float] = (650.0, 1100.0)
    glomeruli_per_mm2_cortex: float = 2.8


HUMAN = Species()


@dataclass
class Core:
    """A needle core: centreline (K, 2) um, half width (um), junction arc length (um).

    Cortex lies at arc lengths s < junction_um (junction_um <= 0: no cortex).
    """

    pts: np.ndarray
    half_width_um: float
    junction_um: float

    @property
    def bbox(self):
        r = self.half_width_um * 1.2
        return (float(self.pts[:, 0].min() - r), float(self.pts[:, 1].min() - r),
                float(self.pts[:, 0].max() + r), float(self.pts[:, 1].max() + r))


@dataclass
class Glomeruli:
    """Glomeruli: centres, capsule radius, tuft parameters, mesangial areas and cells."""

    x: np.ndarray
    y: np.ndarray
    r: np.ndarray  # outer radius of Bowman's capsule (um)
    hyper: np.ndarray  # bool
    lobes: np.ndarray  # number of tuft lobes
    phase: np.ndarray
    areas_xy: list = field(default_factory=list)  # per glomerulus (M, 2) area centres (um)
    areas_r: list = field(default_factory=list)  # per glomerulus (M,) area radii (um)
    cells: list = field(default_factory=list)  # per glomerulus (N, 2) mesangial nuclei (um)
    cells_per_area: list = field(default_factory=list)  # per glomerulus (M,) counts
    index: sc.SpatialIndex | None = None


@dataclass
class KidneyScene(SlideBase):
    species: Species = HUMAN
    cores: list = field(default_factory=list)
    core_index: sc.SpatialIndex | None = None
    glom: Glomeruli | None = None


# ----------------------------------------------------------------------------- macro fields


def macro_fields(s: KidneyScene, X, Y) -> dict:
    """Fields at points (um): tissue signed distance, cortex (um past the junction, > 0 =
    cortex), s_um / v_um: arc length and lateral offset along the nearest core's axis."""
    X = np.asarray(X, np.float32)
    Y = np.asarray(Y, np.float32)
    x0, x1, y0, y1 = float(X.min()), float(X.max()), float(Y.min()), float(Y.max())
    tissue = np.full(X.shape, -1e4, np.float32)
    cortex = np.full(X.shape, -1e4, np.float32)
    s_um = np.zeros(X.shape, np.float32)
    v_um = np.zeros(X.shape, np.float32)
    for ci in s.core_index.query(x0, y0, x1, y1):
        core = s.cores[ci]
        d, s_, v_ = sc.polyline_distance(X, Y, core.pts)
        hw = core.half_width_um * (1 + 0.06 * sc.value_noise(s.seed + 200 + ci, s_, s_ * 0,
                                                               400.0))
        sd = hw - d
        better = sd > tissue
        tissue = np.where(better, sd, tissue)
        junction = core.junction_um + 260.0 * sc.value_noise(s.seed + 300 + ci, v_, v_ * 0,
                                                             300.0)
        cortex = np.where(better, junction - s_, cortex)
        s_um = np.where(better, s_, s_um)
        v_um = np.where(better, v_, v_um)
    if tissue.max() > -200:
        tissue = tissue + 12.0 * sc.value_noise(s.seed + 1, X, Y, 80.0) \
            + 4.0 * sc.value_noise(s.seed + 2, X, Y, 20.0)
    return {"tissue": tissue, "cortex": cortex, "s_um": s_um, "v_um": v_um}


def _glom_rho(g: Glomeruli, i: int, X, Y):
    return np.sqrt((X - g.x[i]) ** 2 + (Y - g.y[i]) ** 2) / g.r[i]


# ----------------------------------------------------------------------------- labels


def label_tile(s: KidneyScene, x0_um: float, y0_um: float, px_um: float, size: int):
    """Label map (size, size) uint8 at `px_um` um/px with top-left corner (x0_um, y0_um)."""
    lab = np.zeros((size, size), np.uint8)
    x1, y1 = x0_um + size * px_um, y0_um + size * px_um
    if len(s.core_index.query(x0_um, y0_um, x1, y1)):
        F = sc.coarse_fields(lambda gx, gy: macro_fields(s, gx, gy), x0_um, y0_um, px_um,
                             size, coarse_step(px_um, size))
        tissue = F["tissue"] > 0
        cortex = F["cortex"] > 0
        lab[tissue & cortex] = 1
        lab[tissue & ~cortex] = 2
        X = (x0_um + (np.arange(size, dtype=np.float32) + 0.5) * px_um)[None, :]
        Y = (y0_um + (np.arange(size, dtype=np.float32) + 0.5) * px_um)[:, None]
        g = s.glom
        for i in g.index.query(x0_um, y0_um, x1, y1) if len(g.x) else ():
            r = g.r[i]
            win = window((g.x[i] - r, g.y[i] - r, g.x[i] + r, g.y[i] + r), x0_um, y0_um,
                         px_um, size)
            if win is None:
                continue
            rs, cs = win
            sub = lab[rs, cs]
            sub[_glom_rho(g, i, X[:, cs], Y[rs, :]) <= 1.0] = 4 if g.hyper[i] else 3
    pen_label(s, lab, x0_um, y0_um, px_um, 7)
    return lab


# ----------------------------------------------------------------------------- rendering

# concentrations: H = haematoxylin, P = PAS magenta (OD units at reference intensity)
C_NUC_H = 1.75
C_TBM_P = 1.05  # basement membranes
C_BRUSH_P = 0.85
C_PROX_P, C_PROX_H = 0.42, 0.13
C_DIST_P, C_DIST_H = 0.28, 0.12
C_INTER_P, C_INTER_H = 0.20, 0.07
C_MES_P = 0.75


def _px(v_um, o_um, mpp):
    return (np.asarray(v_um) - o_um) / mpp


def _cortex_tubules(s: KidneyScene, x0_px, y0_px, size, X, Y, rng, nuc):
    """Convoluted tubules (Worley cells). Returns (cH, cP); nuclei into `nuc`."""
    mpp = s.mpp
    g = s.species.tubule_spacing_um
    cw = sc.pow2_cell(70.0, mpp, size)
    wx = 10.0 * sc.tile_noise(s.seed + 121, x0_px, y0_px, size, cw)
    wy = 10.0 * sc.tile_noise(s.seed + 122, x0_px, y0_px, size, cw)
    fx = (X + wx) * np.float32(1 / g)
    fy = (Y + wy) * np.float32(1 / g)
    t = sc.cell_table(s.seed + 123, fx, fy, 0.24, n_extra=4)
    d1, d2, id1 = sc.worley(t, fx, fy, 2)
    r1 = np.sqrt(d1)
    b_um = (np.sqrt(d2) - r1) * (0.5 * g)  # um to the tubule border
    rho = r1 / (r1 + b_um / g + np.float32(1e-6))
    distal = (t.u[0] < 0.28).astype(np.float32)
    dist = distal[id1]
    lum = np.where(t.u[1] < 0.2, 0.04, 0.12 + 0.22 * t.u[1] + 0.1 * distal)[id1]
    lumen = sc.smoothstep(lum + 0.04, lum - 0.02, rho)
    brush = sc.smoothstep(lum - 0.02, lum + 0.02, rho) * sc.smoothstep(
        lum + 0.13, lum + 0.07, rho) * (1 - dist)
    inter = sc.smoothstep(1.6, 0.9, b_um)
    tbm = sc.smoothstep(2.6, 1.9, b_um) * sc.smoothstep(1.0, 1.6, b_um)
    gran = 1.0 + 0.22 * sc.bank_window(rng, (size, size))
    cyto_p = (C_PROX_P + (C_DIST_P - C_PROX_P) * dist) * gran
    cyto_h = (C_PROX_H + (C_DIST_H - C_PROX_H) * dist) * gran
    keep = (1 - lumen) * (1 - inter)
    cP = cyto_p * keep + C_BRUSH_P * brush + C_TBM_P * tbm + C_INTER_P * inter * (1 - tbm)
    cH = cyto_h * keep + C_INTER_H * inter
    # nuclei: ring per tubule profile
    x0, y0 = x0_px * mpp, y0_px * mpp
    cxu, cyu = t.px * g, t.py * g
    span = size * mpp
    sel = np.nonzero((cxu > x0 - g) & (cxu < x0 + span + g) & (cyu > y0 - g)
                     & (cyu < y0 + span + g))[0]
    if len(sel):
        nmax = 9
        dsel = distal[sel]
        n = np.where(dsel > 0, 6 + np.floor(t.u[2, sel] * 4), 4 + np.floor(t.u[2, sel] * 4))
        j = np.arange(nmax)[None, :]
        def cu(key):
            return sc.cell_uniforms(s.seed + 124, t, sel, nmax, key)

        ok = (j < n[:, None]) & (cu(1) > 0.2)
        th = (j + 0.4 * (cu(2) - 0.5)) * (2 * np.pi / n[:, None]) \
            + t.u[3, sel][:, None] * 6.283
        rad = (0.5 * g * 0.62) * (0.85 + 0.25 * cu(3))
        px = _px(cxu[sel][:, None] + np.cos(th) * rad, x0, mpp)[ok]
        py = _px(cyu[sel][:, None] + np.sin(th) * rad, y0, mpp)[ok]
        gxp, gyp = px + x0_px, py + y0_px  # undo the warp (evaluated at the points)
        px = px - 10.0 * sc.value_noise(s.seed + 121, gxp, gyp, cw) / mpp
        py = py - 10.0 * sc.value_noise(s.seed + 122, gxp, gyp, cw) / mpp
        k4 = cu(4)[ok]
        r_nuc = (2.6 + 0.6 * k4) / mpp
        sc.stamp_ellipses(nuc, px, py, r_nuc, r_nuc * 0.85, th[ok], C_NUC_H * (0.85 + 0.2 * k4))
    return cH.astype(np.float32), cP.astype(np.float32)


def _medulla_tubules(s: KidneyScene, F, size, rng, nuc):
    """Straight tubules along the core axis, from the (s, v) axis coordinates (um)."""
    P = s.species.medulla_tubule_period_um
    su, vu = F["s_um"], F["v_um"] + 6.0 * np.sin(F["s_um"] / 90.0)
    k = np.floor(vu / P).astype(np.int64)
    k_lo, nk = int(k.min()), int(k.max() - k.min()) + 1
    kk = np.arange(k_lo, k_lo + nk)
    seed = s.seed + 140
    seg_len = 350.0
    off = sc.hash_uniform(seed, kk, 1)
    m = np.floor(su / seg_len + off[k - k_lo]).astype(np.int64)
    m_lo, nm = int(m.min()), int(m.max() - m.min()) + 1
    mm, kk2 = np.meshgrid(np.arange(m_lo, m_lo + nm), kk)
    present = (sc.hash_uniform(seed, kk2, mm, 2) < 0.85).ravel()
    hw_frac = (0.28 + 0.14 * sc.hash_uniform(seed, kk2, mm, 3)).ravel()
    kind = sc.hash_uniform(seed, kk2, mm, 4).ravel()  # < .55 collecting duct, else thin limb
    cen = (0.5 + 0.16 * (sc.hash_uniform(seed, kk2, mm, 5) - 0.5)).ravel()
    flat = (k - k_lo) * nm + (m - m_lo)
    # position along the segment: gaps at its ends
    pos = su / seg_len + off[k - k_lo] - m
    ends = sc.smoothstep(0.0, 0.04, pos) * sc.smoothstep(1.0, 0.96, pos)
    hw = hw_frac[flat] * P
    q = np.abs(vu - (k + cen[flat]) * P) / hw  # 0 at the tubule axis, 1 at its wall
    pres = present[flat] * ends
    thin = (kind[flat] >= 0.55).astype(np.float32)
    lum = 0.5 + 0.3 * thin
    wall = sc.smoothstep(1.03, 0.97, q) * pres
    lumen = sc.smoothstep(lum + 0.04, lum - 0.04, q) * pres
    tbm = sc.smoothstep(0.92, 0.97, q) * wall
    grain = 1.0 + 0.2 * sc.bank_window(rng, (size, size))
    epi = wall * (1 - lumen)
    cP = (0.2 * epi + C_TBM_P * 0.9 * tbm + C_INTER_P * 1.1 * (1 - wall)) * grain
    cH = (0.06 * epi + C_INTER_H * (1 - wall)) * grain
    # nuclei along both walls, one every ~8 um (cuboidal) or ~16 um (thin limb)
    spacing = 8.0 + 8.0 * thin
    ph = (k & 1) * 0.5
    along = su / spacing + ph
    frac = along - np.round(along)
    rn = (lum + 1.0) / 2
    dr = (q - rn) * hw
    qn = (dr / (2.4 - 1.2 * thin)) ** 2 + (frac * spacing / (2.6 + 1.5 * thin)) ** 2
    nn = sc.smoothstep(1.15, 0.75, qn) * pres * (
        sc.hash_uniform(seed, k, np.round(along).astype(np.int64), 6) > 0.2)
    np.maximum(nuc, nn * C_NUC_H, out=nuc)
    return cH.astype(np.float32), cP.astype(np.float32)


def _glomerulus(s: KidneyScene, i: int, X, Y, x0, y0, nuc):
    """One glomerulus on its window: (coverage, cH, cP); nuclei stamped into `nuc`."""
    g = s.glom
    mpp = s.mpp
    R = float(g.r[i])
    dx, dy = X - g.x[i], Y - g.y[i]
    r = np.sqrt(dx * dx + dy * dy)
    rho = r / R
    theta = np.arctan2(dy, dx)
    cover = sc.smoothstep(1.03, 0.99, rho)
    caps_w = 2.2 / R
    capsule = sc.smoothstep(1.0 - caps_w - 0.01, 1.0 - caps_w, rho) * sc.smoothstep(
        1.0, 0.985, rho)
    tuft_r = (1.0 - (8.0 + 5.0 * (i % 3)) / R) * (
        1.0 + 0.035 * np.cos(g.lobes[i] * theta + g.phase[i])
        + 0.03 * np.cos(3 * theta + 2.0 * g.phase[i]))
    tuft = sc.smoothstep(tuft_r + 0.01, tuft_r - 0.01, rho)
    # capillary loops: small Worley cells (~9 um)
    gc = 12.0
    fx = (X - g.x[i]) * np.float32(1 / gc) + 1000.0
    fy = (Y - g.y[i]) * np.float32(1 / gc) + 1000.0
    t = sc.cell_table(s.seed + 400 + i, fx, fy, 0.38, n_extra=2)
    d1, d2, id1 = sc.worley(t, fx, fy, 3)
    r1 = np.sqrt(d1)
    bc = (np.sqrt(d2) - r1) * 0.5
    rc = r1 / (r1 + bc + 1e-6)
    open_ = (t.u[0] < 0.8)[id1]
    lumen = sc.smoothstep(0.66, 0.58, rc) * open_
    gbm = sc.smoothstep(0.58, 0.66, rc) * sc.smoothstep(0.8, 0.72, rc) * open_
    # mesangial areas
    mes = np.zeros(rho.shape, np.float32)
    for (ax, ay), ar in zip(g.areas_xy[i], g.areas_r[i], strict=True):
        da = np.sqrt((X - ax) ** 2 + (Y - ay) ** 2) / ar
        np.maximum(mes, sc.smoothstep(1.15, 0.7, da), out=mes)
    hyper = bool(g.hyper[i])
    base_p = 0.42 + (0.1 if hyper else 0.0)
    cP = tuft * ((base_p * (1 - lumen) + C_TBM_P * 1.1 * gbm) * (1 - mes)
                 + (C_MES_P + (0.12 if hyper else 0.0)) * mes) + C_TBM_P * capsule
    cH = tuft * (0.1 * (1 - lumen)) * (1 - mes) + tuft * 0.12 * mes
    cP = cP + 0.03 * (1 - tuft) * (1 - capsule)  # urinary space: nearly clear
    # red cells in some capillary lumina
    rbc = (t.u[1] < 0.25)[id1] * lumen * tuft
    cP = cP + 0.25 * rbc
    # nuclei: mesangial cells (explicit), podocytes/endothelium (procedural), parietal cells
    cells = g.cells[i]
    if len(cells):
        rad = sc.hash_uniform(s.seed + 500 + i, np.arange(len(cells)))
        sc.stamp_ellipses(nuc, _px(cells[:, 0], x0, mpp), _px(cells[:, 1], y0, mpp),
                          (2.7 + 0.5 * rad) / mpp, (2.3 + 0.4 * rad) / mpp, rad * 3.1,
                          C_NUC_H * 1.1)
    px_, py_, u = sc.jittered_points(s.seed + 600 + i, g.x[i] - R, g.y[i] - R, g.x[i] + R,
                                     g.y[i] + R, 11.0, 0.65)
    rr = np.hypot(px_ - g.x[i], py_ - g.y[i]) / R
    ok = rr < 0.85 * (1.0 - 9.0 / R)
    for (ax, ay), ar in zip(g.areas_xy[i], g.areas_r[i], strict=True):
        ok &= np.hypot(px_ - ax, py_ - ay) > ar * 1.1
    if ok.any():
        sc.stamp_ellipses(nuc, _px(px_[ok], x0, mpp), _px(py_[ok], y0, mpp),
                          (2.6 + u[ok]) / mpp, 2.0 / mpp, u[ok] * 6.0, C_NUC_H * 0.95)
    xs, ys, tang = sc.ring_points(sc.object_rng(s.seed, 5, i), float(g.x[i]), float(g.y[i]),
                                  R, R, 0.0,
                                  1.0 - caps_w * 1.6, 22.0, 0.3, 0.3)
    sc.stamp_ellipses(nuc, _px(xs, x0, mpp), _px(ys, y0, mpp), 3.6 / mpp, 1.1 / mpp, tang,
                      C_NUC_H)
    return cover, cH.astype(np.float32), cP.astype(np.float32)


def render_tile(s: KidneyScene, x0_px: int, y0_px: int, size: int) -> np.ndarray | None:
    """RGB uint8 (size, size, 3) of the tile at level-0 pixel (x0_px, y0_px); None = glass."""
    return render_tissue_tile(s, s.core_index, 2, macro_fields, _paint_tissue, x0_px, y0_px,
                              size)


def _paint_tissue(s: KidneyScene, F, x0_px, y0_px, size, X, Y, rng, cH, cP):
    """Fill stain concentrations of cortex, medulla and glomeruli into cH, cP (in place)."""
    mpp = s.mpp
    x0, y0 = x0_px * mpp, y0_px * mpp
    x1, y1 = x0 + size * mpp, y0 + size * mpp
    nuc = np.zeros((size, size), np.float32)
    cortex = F["cortex"] > 0
    if cortex.any():
        cnuc = np.zeros((size, size), np.float32)
        h, p = _cortex_tubules(s, x0_px, y0_px, size, X, Y, rng, cnuc)
        cH[cortex] = h[cortex]
        cP[cortex] = p[cortex]
        nuc[cortex] = cnuc[cortex]
    if not cortex.all():
        med = ~cortex
        mnuc = np.zeros((size, size), np.float32)
        h, p = _medulla_tubules(s, F, size, rng, mnuc)
        cH[med] = h[med]
        cP[med] = p[med]
        nuc[med] = mnuc[med]
    g = s.glom
    for i in (g.index.query(x0, y0, x1, y1) if len(g.x) else ()):
        R = float(g.r[i]) * 1.05
        win = window((g.x[i] - R, g.y[i] - R, g.x[i] + R, g.y[i] + R), x0, y0, mpp, size)
        if win is None:
            continue
        rs, cs = win
        gn = np.zeros((size, size), np.float32)
        cover, h, p = _glomerulus(s, i, X[:, cs], Y[rs, :], x0, y0, gn)
        cH[rs, cs] += (h - cH[rs, cs]) * cover
        cP[rs, cs] += (p - cP[rs, cs]) * cover
        nuc[rs, cs] = nuc[rs, cs] * (1 - cover) + gn[rs, cs] * cover
    cP *= 1.0 - 0.35 * np.clip(nuc, 0, 1)
    np.maximum(cH, nuc, out=cH)


# ----------------------------------------------------------------------------- scene build


def _place_cores(rng, W, H, species: Species, cortex_share) -> list[Core]:
    n = int(np.clip(round(H / 3500.0), 1, 14))
    band = H / n
    cores = []
    for k in range(n):
        hw = min(rng.uniform(*species.core_width_um) / 2, band * 0.33)
        length = W * rng.uniform(0.65, 0.88)
        cy = (k + 0.5) * band + rng.uniform(-0.08, 0.08) * band
        cx = W / 2 + rng.uniform(-0.08, 0.08) * W
        tilt = rng.uniform(-0.06, 0.06)
        start = (cx - length / 2, cy - np.sin(tilt) * length / 2)
        end = (cx + length / 2, cy + np.sin(tilt) * length / 2)
        pts = sc.smooth_path(rng, start, end, 8, 0.03)
        margin = hw * 1.25 + 0.02 * H
        pts[:, 1] = np.clip(pts[:, 1], margin, H - margin)
        if rng.random() < 0.5:
            pts = pts[::-1].copy()
        total = float(np.hypot(*np.diff(pts, axis=0).T).sum())
        share = cortex_share(rng)
        junction = share * total if share > 0 else -1e6
        cores.append(Core(pts, float(hw), float(junction)))
    return cores


def build(task: str, seed: int, width_px: int, height_px: int, mpp: float,
          label: str | None, pen: bool, fold: bool) -> KidneyScene:
    """Build a kidney scene; `label`: kidney-layer adequate|inadequate, mesangial M0|M1."""
    rng = np.random.default_rng([seed, 2202])
    stains = sc.perturbed_stains(rng, sc.PAS_VECTORS, ("hematoxylin", "pas"))
    W, H = width_px * mpp, height_px * mpp
    species = HUMAN
    if task == "kidney-layer":
        if label is None:
            label = "adequate" if rng.random() < 0.75 else "inadequate"

        def cortex_share(r):
            return r.uniform(0.3, 0.85) if label == "adequate" else 0.0
    else:
        if label is None:
            label = "M1" if rng.random() < 0.5 else "M0"

        def cortex_share(r):
            return r.uniform(0.7, 0.95)
    s = KidneyScene(task=task, seed=int(seed), width_px=int(width_px), height_px=int(height_px),
                    mpp=float(mpp), stains=stains, label=label, species=species)
    s.cores = _place_cores(rng, W, H, species, cortex_share)
    s.core_index = sc.SpatialIndex(2000.0)
    for i, c in enumerate(s.cores):
        s.core_index.insert(i, *c.bbox)

    # glomeruli: dart throwing in the cortex, fully inside the tissue
    gx, gy, gr = [], [], []
    for core in s.cores:
        if core.junction_um <= 0:
            continue
        bx0, by0, bx1, by1 = core.bbox
        cand_x = rng.uniform(bx0, bx1, 4000).astype(np.float32)
        cand_y = rng.uniform(by0, by1, 4000).astype(np.float32)
        F = macro_fields(s, cand_x, cand_y)
        rad = rng.uniform(*species.glomerulus_diameter_um, 4000) / 2
        ok = (F["tissue"] > rad + 25) & (F["cortex"] > rad + 20)
        cortex_mm2 = 2 * core.half_width_um * min(core.junction_um, 1e9) / 1e6
        target = int(rng.poisson(species.glomeruli_per_mm2_cortex * cortex_mm2))
        if task == "mesangial":
            target = max(target, 1)
        placed = 0
        for x, y, r in zip(cand_x[ok], cand_y[ok], rad[ok], strict=True):
            if placed >= target:
                break
            if all(np.hypot(x - ox, y - oy) > r + orr + 50 for ox, oy, orr in
                   zip(gx, gy, gr, strict=True)):
                gx.append(float(x))
                gy.append(float(y))
                gr.append(float(r))
                placed += 1
    n = len(gx)
    if task == "mesangial":
        frac = rng.uniform(0.6, 0.9) if label == "M1" else rng.uniform(0.0, 0.35)
        n_hyper = int(round(frac * n))
        n_hyper = max(n_hyper, n // 2 + 1) if label == "M1" else min(n_hyper, n // 2)
        n_hyper = min(n_hyper, n)
    else:
        n_hyper = int(rng.binomial(n, 0.2)) if n else 0
    hyper = np.zeros(n, bool)
    hyper[rng.permutation(n)[:n_hyper]] = True
    g = Glomeruli(np.array(gx, np.float32), np.array(gy, np.float32), np.array(gr, np.float32),
                  hyper, rng.integers(4, 7, n).astype(np.float32),
                  rng.uniform(0, 2 * np.pi, n).astype(np.float32))
    for i in range(n):
        _mesangium(rng, g, i)
    g.index = sc.build_index(g.x, g.y, g.r * 1.05, 1000.0)
    s.glom = g

    if pen and s.cores:
        core = s.cores[int(rng.integers(len(s.cores)))]
        p = core.pts[len(core.pts) // 2]
        d = core.pts[-1] - core.pts[0]
        outward = np.arctan2(d[1], d[0]) + np.pi / 2 * (1 if rng.random() < 0.5 else -1)
        edge = (p[0] + np.cos(outward) * core.half_width_um,
                p[1] + np.sin(outward) * core.half_width_um)
        s.pen = sc.random_pen(rng, W, H, edge, outward)
    if fold and s.cores:
        core = s.cores[0]
        mid = core.pts[len(core.pts) // 2]
        blob = sc.Blob(float(mid[0]), float(mid[1]), core.half_width_um * 1.5,
                       core.half_width_um, float(np.arctan2(*(core.pts[-1] - core.pts[0])[::-1])))
        s.fold = sc.random_fold(rng, blob)
    s.dust = sc.random_dust(rng, W, H)
    s.options = {"species": species.name}
    return s


def _mesangium(rng, g: Glomeruli, i: int) -> None:
    """Mesangial areas (stalk regions of the tuft lobes) and their cells for glomerulus i."""
    R = float(g.r[i])
    lobes = int(g.lobes[i])
    areas, radii = [], []
    for k in range(lobes):
        th = g.phase[i] / lobes + k * 2 * np.pi / lobes + rng.uniform(-0.2, 0.2)
        for frac in (0.3, 0.58):
            d = frac * R * rng.uniform(0.9, 1.1)
            areas.append((g.x[i] + np.cos(th) * d, g.y[i] + np.sin(th) * d))
            radii.append(max(9.0, R * rng.uniform(0.085, 0.11)))
    areas_xy = np.array(areas, np.float32)
    radii = np.array(radii, np.float32)
    if g.hyper[i]:
        counts = rng.integers(4, 8, len(radii))
        counts[rng.random(len(radii)) < 0.25] = rng.integers(2, 4)
        counts[int(rng.integers(len(radii)))] = int(rng.integers(4, 8))  # at least one > 3
    else:
        counts = rng.integers(1, 4, len(radii))
    cells = []
    for (ax, ay), ar, c in zip(areas_xy, radii, counts, strict=True):
        pts: list = []
        for _ in range(400):
            if len(pts) >= c:
                break
            a = rng.uniform(0, 2 * np.pi)
            d = ar * 0.85 * np.sqrt(rng.random())
            p = (ax + np.cos(a) * d, ay + np.sin(a) * d)
            if all(np.hypot(p[0] - q[0], p[1] - q[1]) > 4.8 for q in pts):
                pts.append(p)
        cells.extend(pts)
    # recount per area from the placed cells (a crowded area may hold fewer than asked)
    cells_arr = np.array(cells, np.float32).reshape(-1, 2)
    per_area = np.array([int(((np.hypot(cells_arr[:, 0] - ax, cells_arr[:, 1] - ay) <= ar))
                              .sum()) for (ax, ay), ar in zip(areas_xy, radii, strict=True)])
    g.areas_xy.append(areas_xy)
    g.areas_r.append(radii)
    g.cells.append(cells_arr)
    g.cells_per_area.append(per_area)
    g.hyper[i] = bool(per_area.max(initial=0) >= HYPERCELLULAR_MIN_CELLS)


# ----------------------------------------------------------------------------- truth


def _areas(areas: dict) -> tuple[float, float, float]:
    cortex = sum(areas.get(LEGEND[k], 0.0) for k in CORTEX_LABELS)
    medulla = areas.get("medulla", 0.0)
    tissue = sum(v for k, v in areas.items() if k not in ("background", "pen"))
    return cortex, medulla, tissue


def _glom_objects(s: KidneyScene) -> list[dict]:
    g = s.glom
    return [{"type": "glomerulus", "x_um": round(float(g.x[i]), 2),
             "y_um": round(float(g.y[i]), 2), "diameter_um": round(float(2 * g.r[i]), 2),
             "hypercellular": bool(g.hyper[i]),
             "mesangial_cells_per_area": [int(c) for c in g.cells_per_area[i]],
             "max_cells_per_area": int(g.cells_per_area[i].max(initial=0))}
            for i in range(len(g.x))]


def truth_layer(s: KidneyScene, areas: dict) -> dict:
    """kidney-layer truth: cortex/medulla areas, cortex fraction, adequacy = cortex present."""
    cortex, medulla, tissue = _areas(areas)
    adequate = cortex > 0
    n = len(s.glom.x)
    return {
        "diagnosis": {"label": "adequate" if adequate else "inadequate", "adequate": adequate},
        "scores": {"cortex_fraction": round(cortex / (cortex + medulla), 5)
                   if cortex + medulla > 0 else 0.0},
        "counts": {"glomeruli": n, "cores": len(s.cores)},
        "areas_mm2": {"cortex": round(cortex, 5), "medulla": round(medulla, 5),
                      "tissue": round(tissue, 5), "pen": round(areas.get("pen", 0.0), 5)},
        "objects": _glom_objects(s),
    }


def truth_mesangial(s: KidneyScene, areas: dict) -> dict:
    """mesangial truth: M0/M1 from the hypercellular fraction, adequacy = >= 8 glomeruli."""
    cortex, medulla, tissue = _areas(areas)
    n = len(s.glom.x)
    n_hyper = int(s.glom.hyper.sum())
    frac = n_hyper / n if n else 0.0
    return {
        "diagnosis": {"label": "M1" if frac > 0.5 else "M0", "adequate": bool(n >= 8)},
        "scores": {"hypercellular_fraction": round(frac, 5),
                   "cortex_fraction": round(cortex / (cortex + medulla), 5)
                   if cortex + medulla > 0 else 0.0},
        "counts": {"glomeruli": n, "hypercellular_glomeruli": n_hyper,
                   "mesangial_cells": int(sum(len(c) for c in s.glom.cells))},
        "areas_mm2": {"cortex": round(cortex, 5), "medulla": round(medulla, 5),
                      "tissue": round(tissue, 5), "pen": round(areas.get("pen", 0.0), 5)},
        "objects": _glom_objects(s),
    }


def arrays(s: KidneyScene) -> dict:
    """Mesangial cell centres (um) and their glomerulus index, for the truth zarr."""
    g = s.glom
    cells = [c for c in g.cells if len(c)]
    xy = np.concatenate(cells).astype(np.float32) if cells else np.zeros((0, 2), np.float32)
    idx = np.concatenate([np.full(len(c), i, np.int32) for i, c in enumerate(g.cells)]) \
        if len(g.cells) else np.zeros(0, np.int32)
    return {
        "mesangial_cells": (xy, {"units": "um", "columns": ["x_um", "y_um"]}),
        "mesangial_cell_glomerulus": (idx.astype(np.int32), {
            "description": "index into truth.json objects (glomeruli)"}),
    }


LAYER_SPEC = SynthSpec(
    name="kidney-layer", legend=LEGEND, labels=("adequate", "inadequate"),
    default_size_px=(16000, 8000), default_mpp=0.5, build=build, render_tile=render_tile,
    label_tile=label_tile, truth=truth_layer, arrays=arrays, tissue_classes=(1, 2, 3, 4),
)
MESANGIAL_SPEC = SynthSpec(
    name="mesangial", legend=LEGEND, labels=("M0", "M1"),
    default_size_px=(16000, 8000), default_mpp=0.5, build=build, render_tile=render_tile,
    label_tile=label_tile, truth=truth_mesangial, arrays=arrays, tissue_classes=(1, 2, 3, 4),
)
