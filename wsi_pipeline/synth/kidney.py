"""Synthetic PAS-stained kidney sections for `kidney-layer`, `mesangial` and the
light-microscopy (OM) slide of a `glomerular-dx` case.

Human needle biopsies (both tasks) and whole mouse kidney sections (`kidney-layer` with
species "mouse", see `build_mouse` below for its anatomy).

Human scene (sizes in um, from standard renal histology, see `Species`):
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

Glomerular-dx OM slides (`CASE_OM_SPEC`, labels IgAN / MN / LN) are the human biopsy
with the class's light-microscopy look [standard]: IgAN = mesangial hypercellularity and
matrix expansion (most glomeruli hypercellular, mesangial areas enlarged); MN = thickened,
PAS-bright capillary walls (GBM) with a normal mesangium; LN = both (hypercellular tufts
and thick "wire-loop" walls). A "weak" slide [choice] shows the class only faintly
(fewer hypercellular glomeruli, walls barely thickened). Per glomerulus the GBM thickness
factor (1 = normal) is `Glomeruli.wall`; see `CASE_WALL_FACTOR` and `CASE_HYPER_FRACTION`.

Label legend: see `LEGEND`; human cortex area = cortex + glomeruli labels; mouse slides use
the mouse layer labels 8-11 (glomeruli inside mouse_cortex); tissue = label not in
{background, pen}.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import UsageError
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
          4: "glomerulus_hypercellular", 7: "pen", 8: "mouse_cortex", 9: "mouse_outer_stripe",
          10: "mouse_inner_stripe", 11: "mouse_inner_medulla"}
CORTEX_LABELS = (1, 3, 4)
MOUSE_LAYER_LABELS = (8, 9, 10, 11)  # capsule inwards: cortex, outer/inner stripe, inner medulla
TISSUE_CLASSES = (1, 2, 3, 4) + MOUSE_LAYER_LABELS
HYPERCELLULAR_MIN_CELLS = 4  # > 3 mesangial cells in a mesangial area
CASE_LABELS = ("IgAN", "MN", "LN")
# glomerular-dx OM [choice]: (typical, weak) ranges per class of the hypercellular fraction,
# the GBM thickness factor (1 = normal) and the mesangial area radius factor (matrix
# expansion of hypercellular glomeruli)
CASE_HYPER_FRACTION = {"IgAN": ((0.6, 0.9), (0.15, 0.4)), "MN": ((0.0, 0.15), (0.0, 0.15)),
                       "LN": ((0.55, 0.85), (0.15, 0.4))}
CASE_WALL_FACTOR = {"IgAN": ((1.0, 1.1), (1.0, 1.1)), "MN": ((2.2, 3.0), (1.25, 1.6)),
                    "LN": ((1.9, 2.6), (1.2, 1.5))}
CASE_MATRIX_FACTOR = {"IgAN": ((1.2, 1.35), (1.0, 1.1)), "MN": ((1.0, 1.0), (1.0, 1.0)),
                      "LN": ((1.15, 1.3), (1.0, 1.1))}
CASE_MIN_GLOMERULI = 4  # a case slide shows at least this many glomeruli (when they fit)


@dataclass(frozen=True)
class Species:
    """Size parameters of a species' kidney (um)."""

    name: str = "human"
    glomerulus_diameter_um: tuple[float, float] = (150.0, 250.0)
    tubule_spacing_um: float = 46.0  # cortical convoluted tubule profiles
    medulla_tubule_period_um: float = 40.0
    core_width_um: tuple[float, float] = (650.0, 1100.0)
    glomeruli_per_mm2_cortex: float = 2.8
    glom_loop_um: float = 12.0  # capillary-loop cell size in the tuft
    glom_gap_scale: float = 1.0  # width of the urinary space relative to human


HUMAN = Species()
# mouse [standard murine histology]: convoluted tubule profiles ~30-35 um, glomeruli 70-90 um;
# ~11 glomerular profiles per mm2 of cortex (~12,000 glomeruli in ~90 mm3 of cortex, 3 um
# sections); medulla_tubule_period_um unused (the mouse medulla has its own layer specs)
MOUSE = Species(name="mouse", glomerulus_diameter_um=(70.0, 90.0), tubule_spacing_um=33.0,
                medulla_tubule_period_um=30.0, core_width_um=(0.0, 0.0),
                glomeruli_per_mm2_cortex=11.0, glom_loop_um=9.0, glom_gap_scale=0.45)
SPECIES = {"human": HUMAN, "mouse": MOUSE}


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
    wall: np.ndarray | None = None  # glomerular-dx: GBM thickness factor (1 = normal)


@dataclass
class KidneyScene(SlideBase):
    species: Species = HUMAN
    cores: list = field(default_factory=list)
    core_index: sc.SpatialIndex | None = None
    glom: Glomeruli | None = None
    section: MouseSection | None = None  # mouse: the whole-kidney section (cores unused)


# ----------------------------------------------------------------------------- macro fields


def macro_fields(s: KidneyScene, X, Y) -> dict:
    """Fields at points (um): tissue signed distance, cortex (um past the junction, > 0 =
    cortex), s_um / v_um: arc length and lateral offset along the nearest core's axis.
    Mouse sections: see `mouse_fields`."""
    if s.section is not None:
        return mouse_fields(s, X, Y)
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
    if s.section is not None:
        return _label_tile_mouse(s, x0_um, y0_um, px_um, size)
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
        sc.stamp_ellipses(nuc, px, py, r_nuc, r_nuc * 0.85, th[ok], C_NUC_H * (0.85 + 0.2 * k4),
                          nuclear=True)
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
    tuft_r = (1.0 - (8.0 + 5.0 * (i % 3)) * s.species.glom_gap_scale / R) * (
        1.0 + 0.035 * np.cos(g.lobes[i] * theta + g.phase[i])
        + 0.03 * np.cos(3 * theta + 2.0 * g.phase[i]))
    tuft = sc.smoothstep(tuft_r + 0.01, tuft_r - 0.01, rho)
    # capillary loops: small Worley cells (~9 um in human)
    gc = s.species.glom_loop_um
    fx = (X - g.x[i]) * np.float32(1 / gc) + 1000.0
    fy = (Y - g.y[i]) * np.float32(1 / gc) + 1000.0
    t = sc.cell_table(s.seed + 400 + i, fx, fy, 0.38, n_extra=2)
    d1, d2, id1 = sc.worley(t, fx, fy, 3)
    r1 = np.sqrt(d1)
    bc = (np.sqrt(d2) - r1) * 0.5
    rc = r1 / (r1 + bc + 1e-6)
    open_ = (t.u[0] < 0.8)[id1]
    if g.wall is None:
        lumen = sc.smoothstep(0.66, 0.58, rc) * open_
        gbm = sc.smoothstep(0.58, 0.66, rc) * sc.smoothstep(0.8, 0.72, rc) * open_
    else:
        lumen, gbm = _thick_walls(rc, open_, float(g.wall[i]))
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
                          C_NUC_H * 1.1, nuclear=True)
    px_, py_, u = sc.jittered_points(s.seed + 600 + i, g.x[i] - R, g.y[i] - R, g.x[i] + R,
                                     g.y[i] + R, 11.0, 0.65)
    rr = np.hypot(px_ - g.x[i], py_ - g.y[i]) / R
    ok = rr < 0.85 * (1.0 - 9.0 / R)
    for (ax, ay), ar in zip(g.areas_xy[i], g.areas_r[i], strict=True):
        ok &= np.hypot(px_ - ax, py_ - ay) > ar * 1.1
    if ok.any():
        sc.stamp_ellipses(nuc, _px(px_[ok], x0, mpp), _px(py_[ok], y0, mpp),
                          (2.6 + u[ok]) / mpp, 2.0 / mpp, u[ok] * 6.0, C_NUC_H * 0.95,
                          nuclear=True)
    xs, ys, tang = sc.ring_points(sc.object_rng(s.seed, 5, i), float(g.x[i]), float(g.y[i]),
                                  R, R, 0.0,
                                  1.0 - caps_w * 1.6, 22.0, 0.3, 0.3)
    sc.stamp_ellipses(nuc, _px(xs, x0, mpp), _px(ys, y0, mpp), 3.6 / mpp, 1.1 / mpp, tang,
                      C_NUC_H, nuclear=True)
    return cover, cH.astype(np.float32), cP.astype(np.float32)


def _thick_walls(rc, open_, wall: float):
    """(lumen, gbm) of capillary loops whose GBM is `wall` times the normal thickness.

    rc: radial position in the loop cell (0 centre, 1 cell border). The wall grows inwards
    (narrowing the lumen) and a little outwards; thick walls are also more PAS-bright.
    """
    k = max(wall - 1.0, 0.0)
    inner = max(0.62 - 0.17 * k, 0.22)
    outer = min(0.76 + 0.05 * k, 0.9)
    lumen = sc.smoothstep(inner + 0.04, inner - 0.04, rc) * open_
    gbm = sc.smoothstep(inner - 0.04, inner + 0.04, rc) * sc.smoothstep(
        outer + 0.04, outer - 0.04, rc) * open_ * (1.0 + 0.12 * min(k, 2.0))
    return lumen, gbm


def render_tile(s: KidneyScene, x0_px: int, y0_px: int, size: int) -> np.ndarray | None:
    """RGB uint8 (size, size, 3) of the tile at level-0 pixel (x0_px, y0_px); None = glass."""
    return render_tissue_tile(s, s.core_index, 2, macro_fields, _paint_tissue, x0_px, y0_px,
                              size)


def _paint_tissue(s: KidneyScene, F, x0_px, y0_px, size, X, Y, rng, cH, cP):
    """Fill stain concentrations of cortex, medulla and glomeruli into cH, cP (in place)."""
    if s.section is not None:
        _paint_mouse(s, F, x0_px, y0_px, size, X, Y, rng, cH, cP)
        return
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
    _paint_glomeruli(s, x0, y0, x1, y1, size, X, Y, cH, cP, nuc)
    cP *= 1.0 - 0.35 * np.clip(nuc, 0, 1)
    np.maximum(cH, nuc, out=cH)


def _paint_glomeruli(s: KidneyScene, x0, y0, x1, y1, size, X, Y, cH, cP, nuc) -> None:
    """Composite the glomeruli touching the tile (um box) over cH, cP and nuc (in place)."""
    mpp = s.mpp
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
          label: str | None, pen: bool, fold: bool, species: str = "human",
          weak: bool = False) -> KidneyScene:
    """Build a kidney scene; `label`: kidney-layer adequate|inadequate, mesangial M0|M1,
    glomerular-dx IgAN|MN|LN.

    species: "human" (needle cores) or "mouse" (a whole kidney section, kidney-layer only);
    weak: glomerular-dx only, the class's glomerular changes are faint.
    """
    if weak and task != "glomerular-dx":
        raise UsageError(f"weak applies to task glomerular-dx only, not {task!r}")
    if species not in SPECIES:
        raise UsageError(f"unknown species {species!r}; choose one of {', '.join(SPECIES)}")
    if species == "mouse":
        return build_mouse(task, seed, width_px, height_px, mpp, label, pen, fold)
    rng = np.random.default_rng([seed, 2202])
    stains = sc.perturbed_stains(rng, sc.PAS_VECTORS, ("hematoxylin", "pas"))
    W, H = width_px * mpp, height_px * mpp
    species = HUMAN
    if task == "kidney-layer":
        if label is None:
            label = "adequate" if rng.random() < 0.75 else "inadequate"

        def cortex_share(r):
            return r.uniform(0.3, 0.85) if label == "adequate" else 0.0
    elif task == "glomerular-dx":
        if species.name != "human":
            raise UsageError("glomerular-dx slides are human biopsies")
        if label is None:
            label = CASE_LABELS[int(rng.integers(len(CASE_LABELS)))]
        if label not in CASE_LABELS:
            raise UsageError(f"label {label!r} is not valid for task glomerular-dx; choose "
                             f"one of {', '.join(CASE_LABELS)}")

        def cortex_share(r):
            return r.uniform(0.75, 0.95)
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
    if task == "glomerular-dx":  # a diagnostic biopsy: enough glomeruli per cortex core
        n_cortex_cores = max(sum(c.junction_um > 0 for c in s.cores), 1)
        min_per_core = -(-CASE_MIN_GLOMERULI // n_cortex_cores)
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
        elif task == "glomerular-dx":
            target = max(target, min_per_core)
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
    elif task == "glomerular-dx":
        n_hyper = min(int(round(rng.uniform(*CASE_HYPER_FRACTION[label][int(weak)]) * n)), n)
        if label != "MN" and not weak and n:
            n_hyper = max(n_hyper, n // 2 + 1)
    else:
        n_hyper = int(rng.binomial(n, 0.2)) if n else 0
    hyper = np.zeros(n, bool)
    hyper[rng.permutation(n)[:n_hyper]] = True
    g = Glomeruli(np.array(gx, np.float32), np.array(gy, np.float32), np.array(gr, np.float32),
                  hyper, rng.integers(4, 7, n).astype(np.float32),
                  rng.uniform(0, 2 * np.pi, n).astype(np.float32))
    if task == "glomerular-dx":
        matrix = CASE_MATRIX_FACTOR[label][int(weak)]
        for i in range(n):
            _mesangium(rng, g, i, r_scale=rng.uniform(*matrix) if g.hyper[i] else 1.0)
        lo, hi = CASE_WALL_FACTOR[label][int(weak)]
        g.wall = rng.uniform(lo, hi, n).astype(np.float32)
    else:
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
    if task == "glomerular-dx":
        s.options["weak"] = bool(weak)
    return s


def _mesangium(rng, g: Glomeruli, i: int, fracs=(0.3, 0.58), min_r_um: float = 9.0,
               min_sep_um: float = 4.8, r_scale: float = 1.0) -> None:
    """Mesangial areas (stalk regions of the tuft lobes) and their cells for glomerulus i.

    fracs: radial positions of the areas along each lobe (fraction of the capsule radius);
    min_r_um: smallest area radius; min_sep_um: least distance between mesangial nuclei;
    r_scale: area radius factor (> 1: mesangial matrix expansion).
    """
    R = float(g.r[i])
    lobes = int(g.lobes[i])
    areas, radii = [], []
    for k in range(lobes):
        th = g.phase[i] / lobes + k * 2 * np.pi / lobes + rng.uniform(-0.2, 0.2)
        for frac in fracs:
            d = frac * R * rng.uniform(0.9, 1.1)
            areas.append((g.x[i] + np.cos(th) * d, g.y[i] + np.sin(th) * d))
            radii.append(max(min_r_um, R * rng.uniform(0.085, 0.11)) * r_scale)
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
            if all(np.hypot(p[0] - q[0], p[1] - q[1]) > min_sep_um for q in pts):
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


# ----------------------------------------------------------------------------- mouse section
#
# A whole mouse kidney section (sagittal/coronal, through the hilum), built in the "papilla
# frame": origin at the papilla tip, w along the axis from the tip towards the convex border,
# u across it, psi = atan2(u, w) (0 on the axis, +-pi towards the hilum). The outline is a
# bean (~9-10 x 5-6 mm) with a hilum notch, stored as the tip-to-capsule distance R(psi).
# Layers [standard murine anatomy] are concentric from the capsule inwards, by depth =
# (R(psi) - r) cos(alpha) (alpha: angle between the ray and the capsule normal, so depth is
# close to the perpendicular distance to the capsule):
# - cortex (1.08-1.2 mm): convoluted tubules (~33 um profiles), glomeruli (70-90 um, ~11 per
#   mm2) and medullary rays (bundles of straight tubules running on from the outer stripe);
# - outer stripe of the outer medulla (0.37-0.44 mm): dense straight proximal tubules (S3)
#   with a thick PAS-magenta brush border, some thick limbs and collecting ducts;
# - inner stripe (0.59-0.71 mm): thick ascending limbs (paler, no brush border), collecting
#   ducts (pale cuboidal), vascular bundles (vasa recta with red cells);
# - inner medulla / papilla: a parabolic cone below the inner stripe whose narrower tip, the
#   free papilla, projects into the renal pelvis: thin limbs, collecting ducts, vasa recta,
#   abundant pale interstitium with interstitial cells lying across the tubules.
# Medullary tubules run radially towards the papilla tip. The pelvis is a cavity round the
# papilla tip that opens through the hilum (background), lined by urothelium. All noise is
# in the papilla frame, so a smaller slide shows the same section's centre.

MOUSE_FIELD_UM = (11000.0, 7000.0)  # default slide area (um): one whole section, centred
R0_UM = 80.0  # radial fans: below this distance from the tip the tubule count stops halving
_LMAX = 12  # radial fans: most halvings of the tubule spacing


def default_size_px(species: str, mpp: float) -> tuple[int, int]:
    """Default level-0 size (px) of a kidney-layer slide of `species` at `mpp` um/px.

    Human: the task default whatever the MPP; mouse: 11 x 7 mm, a whole section.
    """
    if species not in SPECIES:
        raise UsageError(f"unknown species {species!r}; choose one of {', '.join(SPECIES)}")
    if species == "mouse":
        return int(round(MOUSE_FIELD_UM[0] / mpp)), int(round(MOUSE_FIELD_UM[1] / mpp))
    return LAYER_SPEC.default_size_px


@dataclass
class MouseSection:
    """Geometry of a mouse kidney section in the papilla frame (lengths in um).

    tip_xy: papilla tip on the slide; ex, ey: slide directions of the frame's u and w axes;
    psi_tab/r_out/cos_a: tip-to-capsule distance and the ray/capsule-normal cosine by
    angle; t_*: layer thicknesses; rho_um: free papilla, parabola 2 rho w > u^2;
    im_rho_um / im_w_um: the inner-medulla cone 2 im_rho (w + im_w) > u^2 (wider than the
    free papilla); cav_*: pelvis cavity (ellipse centre w, half axes across/along);
    hilum_hw_um: half width of the hilum channel where it leaves the cavity (it flares
    towards the surface); bbox: slide box (x0, y0, x1, y1) of the section.
    """

    tip_xy: tuple[float, float]
    ex: tuple[float, float]
    ey: tuple[float, float]
    psi_tab: np.ndarray
    r_out: np.ndarray
    cos_a: np.ndarray
    t_cortex_um: float
    t_outer_um: float
    t_inner_um: float
    rho_um: float
    im_rho_um: float
    im_w_um: float
    cav_w_um: float
    cav_au_um: float
    cav_aw_um: float
    hilum_hw_um: float
    bbox: tuple[float, float, float, float]

    def frame(self, X, Y):
        """(u, w) papilla-frame coordinates (um) of slide points (um)."""
        dx = np.asarray(X, np.float32) - np.float32(self.tip_xy[0])
        dy = np.asarray(Y, np.float32) - np.float32(self.tip_xy[1])
        u = dx * np.float32(self.ex[0]) + dy * np.float32(self.ex[1])
        w = dx * np.float32(self.ey[0]) + dy * np.float32(self.ey[1])
        return u, w


def _bean(rng):
    """A random bean outline: implicit F(x, y) (< 0 inside; um; y towards the convex side,
    hilum notch at the bottom centre)."""
    a = rng.uniform(4500.0, 4950.0)
    b = rng.uniform(2700.0, 3000.0)
    bend = rng.uniform(0.06, 0.16)
    dent = rng.uniform(0.4, 0.55)
    dent_w = rng.uniform(1100.0, 1500.0)
    amps = rng.normal(0.0, 0.012, 4)
    phases = rng.uniform(0, 2 * np.pi, 4)

    def f(x, y):
        yb = y + bend * b * (x / a) ** 2  # the poles bend towards the hilum side
        th = np.arctan2(yb / b, x / a)
        mod = 1.0 + sum(amp * np.cos((k + 2) * th + ph)
                        for k, (amp, ph) in enumerate(zip(amps, phases, strict=True)))
        q = ((x / a) ** 2 + (yb / b) ** 2) / mod ** 2
        return q - 1.0 + dent * np.exp(-(x / dent_w) ** 2 - ((yb + b) / (0.45 * b)) ** 2)

    return f, b


def _first_crossing(f, x0, y0, dx, dy, r_max: float, step: float = 8.0) -> np.ndarray:
    """Distance (um) along rays from (x0, y0) in directions (dx, dy) to where the sign of f
    first differs from its sign at the start."""
    r = np.arange(0.0, r_max, step)
    vals = f(x0 + dx[:, None] * r[None, :], y0 + dy[:, None] * r[None, :])
    out = (vals >= 0) != (vals[:, :1] >= 0)
    k = np.where(out.any(axis=1), out.argmax(axis=1), len(r) - 1)
    k = np.maximum(k, 1)
    rows = np.arange(len(dx))
    v0, v1 = vals[rows, k - 1], vals[rows, k]
    t = np.clip(-v0 / np.where(v1 - v0 == 0, 1e-9, v1 - v0), 0.0, 1.0)
    return r[k - 1] + t * step


def _mouse_section(rng, W: float, H: float) -> MouseSection:
    f, b = _bean(rng)
    # papilla tip on the mid line, 0.8-1.1 mm above the hilum notch
    xp = rng.uniform(-150.0, 150.0)
    notch = -b - 800.0 + _first_crossing(f, xp, -b - 800.0, np.zeros(1), np.ones(1), 3 * b)[0]
    yp = notch + rng.uniform(800.0, 1100.0)
    k = 1440
    psi = np.linspace(-np.pi, np.pi, k, endpoint=False)
    r_out = _first_crossing(f, xp, yp, np.sin(psi), np.cos(psi), 9000.0)
    kern = np.array([1, 2, 3, 4, 3, 2, 1], float) / 16.0
    r_out = np.convolve(np.concatenate([r_out[-3:], r_out, r_out[:3]]), kern, "valid")
    dr = (np.roll(r_out, -1) - np.roll(r_out, 1)) / (2 * (2 * np.pi / k))
    cos_a = np.clip(r_out / np.sqrt(r_out ** 2 + dr ** 2 + 1e-6), 0.45, 1.0)
    cos_a = np.convolve(np.concatenate([cos_a[-3:], cos_a, cos_a[:3]]), kern, "valid")
    # place: the outline's box centred on the slide; axis up or down the slide, tilted
    ox, oy = xp + r_out * np.sin(psi), yp + r_out * np.cos(psi)
    cx, cy = (ox.min() + ox.max()) / 2, (oy.min() + oy.max()) / 2
    phi = (-np.pi / 2 if rng.random() < 0.5 else np.pi / 2) + rng.uniform(-0.1, 0.1)
    ey = (float(np.cos(phi)), float(np.sin(phi)))
    ex = (-ey[1], ey[0])

    def to_slide(x, y):
        return (W / 2 + (x - cx) * ex[0] + (y - cy) * ey[0],
                H / 2 + (x - cx) * ex[1] + (y - cy) * ey[1])

    sx, sy = to_slide(ox, oy)
    tip = to_slide(xp, yp)
    down = yp - notch  # tip to the notch (um)
    cav_aw = rng.uniform(0.38, 0.5) * down
    return MouseSection(
        tip_xy=(float(tip[0]), float(tip[1])), ex=ex, ey=ey,
        psi_tab=psi.astype(np.float64), r_out=r_out, cos_a=cos_a,
        t_cortex_um=float(rng.uniform(1080.0, 1200.0)),
        t_outer_um=float(rng.uniform(370.0, 440.0)),
        t_inner_um=float(rng.uniform(590.0, 710.0)),
        rho_um=float(rng.uniform(150.0, 210.0)), im_rho_um=float(rng.uniform(450.0, 650.0)),
        im_w_um=float(rng.uniform(100.0, 250.0)),
        cav_w_um=float(rng.uniform(-60.0, 40.0)), cav_au_um=float(rng.uniform(600.0, 850.0)),
        cav_aw_um=float(cav_aw), hilum_hw_um=float(rng.uniform(280.0, 400.0)),
        bbox=(float(sx.min()) - 50, float(sy.min()) - 50, float(sx.max()) + 50,
              float(sy.max()) + 50),
    )


def mouse_fields(s: KidneyScene, X, Y) -> dict:
    """Mouse-section fields at points (um), all float32 um:

    tissue: signed distance to the tissue edge (> 0 in tissue); depth: distance below the
    capsule; b_cortex / b_outer / b_inner: depth past the inner border of the cortex / outer
    stripe / inner stripe (wavy borders); papilla / im_cone: signed distance to the free
    papilla / the inner-medulla cone (> 0 inside); pelvis: signed distance into the pelvis
    space (> 0 inside).
    """
    m = s.section
    X = np.asarray(X, np.float32)
    Y = np.asarray(Y, np.float32)
    u, w = m.frame(X, Y)
    r = np.sqrt(u * u + w * w)
    psi = np.arctan2(u, w)
    depth = (np.interp(psi, m.psi_tab, m.r_out, period=2 * np.pi) - r) * np.interp(
        psi, m.psi_tab, m.cos_a, period=2 * np.pi)
    eu, ew = u / m.cav_au_um, (w - m.cav_w_um) / m.cav_aw_um
    grad = 2.0 * np.sqrt((eu / m.cav_au_um) ** 2 + (ew / m.cav_aw_um) ** 2) + 1e-6
    cavity = (1.0 - eu * eu - ew * ew) / grad
    below = m.cav_w_um - w
    flare = 0.4  # the hilum widens by 0.4 um per um towards the surface (0.93 = its cosine)
    channel = np.minimum((m.hilum_hw_um + flare * np.maximum(below, 0.0) - np.abs(u)) * 0.93,
                         below)
    pelvis = np.maximum(cavity, channel)

    def parabola(rho, w0):  # ~ signed distance to 2 rho (w + w0) = u^2
        return (2.0 * rho * (w + w0) - u * u) / (2.0 * np.sqrt(u * u + rho * rho))

    papilla = parabola(m.rho_um, 0.0)
    tissue = np.minimum(depth, np.maximum(papilla, -pelvis))
    # noise in the papilla frame: the section looks the same wherever the slide puts it
    if tissue.max() > -200:
        tissue = tissue + 12.0 * sc.value_noise(s.seed + 1, u, w, 80.0) \
            + 4.0 * sc.value_noise(s.seed + 2, u, w, 20.0)
    t1 = m.t_cortex_um + 25.0 * sc.value_noise(s.seed + 801, u, w, 260.0)
    t2 = m.t_cortex_um + m.t_outer_um + 12.0 * sc.value_noise(s.seed + 802, u, w, 300.0)
    t3 = m.t_cortex_um + m.t_outer_um + m.t_inner_um + 30.0 * sc.value_noise(
        s.seed + 803, u, w, 320.0)
    f32 = np.float32
    return {"tissue": tissue.astype(f32), "depth": depth.astype(f32),
            "b_cortex": (depth - t1).astype(f32), "b_outer": (depth - t2).astype(f32),
            "b_inner": (depth - t3).astype(f32), "papilla": papilla.astype(f32),
            "im_cone": parabola(m.im_rho_um, m.im_w_um).astype(f32),
            "pelvis": pelvis.astype(f32)}


def mouse_layers(F: dict) -> np.ndarray:
    """Mouse layer label (8-11, see LEGEND) wherever tissue would be, from `mouse_fields`."""
    lab = np.where(F["b_cortex"] < 0, 8, np.where(F["b_outer"] < 0, 9, 10)).astype(np.uint8)
    # the cone below the inner stripe, and all of it round the pelvis (near the papilla tip
    # depth is no guide: every direction meets there)
    lab[(F["im_cone"] > 0) & ((F["b_inner"] > 0) | (F["pelvis"] > -40.0))] = 11
    return lab


def _label_tile_mouse(s: KidneyScene, x0_um, y0_um, px_um, size):
    """`label_tile` of a mouse section: layer labels 8-11 in tissue, pen 7."""
    lab = np.zeros((size, size), np.uint8)
    bx0, by0, bx1, by1 = s.section.bbox
    x1, y1 = x0_um + size * px_um, y0_um + size * px_um
    if bx0 < x1 and bx1 > x0_um and by0 < y1 and by1 > y0_um:
        F = sc.coarse_fields(lambda gx, gy: mouse_fields(s, gx, gy), x0_um, y0_um, px_um,
                             size, coarse_step(px_um, size))
        tissue = F["tissue"] > 0
        lab[tissue] = mouse_layers(F)[tissue]
    pen_label(s, lab, x0_um, y0_um, px_um, 7)
    return lab


# ---- mouse medulla: fans of straight tubules converging on the papilla tip


@dataclass(frozen=True)
class TubuleKind:
    """A straight medullary tubule or vessel (sizes um; stain concentrations (H, P) in OD).

    lumen: lumen half width / outer half width; brush: brush-border thickness in the same
    units (0 = none); nuc_step_um: nucleus spacing along each wall; nuc_um: nucleus semi-axes
    along / across the tubule; rbc: probability that a segment's lumen holds red cells.
    """

    share: float
    hw_um: tuple[float, float]
    lumen: tuple[float, float]
    cyto: tuple[float, float]
    brush: float = 0.0
    nuc_step_um: float = 8.0
    nuc_um: tuple[float, float] = (2.7, 2.4)
    rbc: float = 0.0


@dataclass(frozen=True)
class RadialLayer:
    """Tubules of one medullary layer: mean axis spacing and segment length (um), the share
    of segments present, tubule kinds, interstitium (H, P) concentrations."""

    salt: int
    period_um: float
    seg_um: float
    present: float
    kinds: tuple[TubuleKind, ...]
    inter: tuple[float, float]


_S3 = TubuleKind(0.72, (13.0, 16.0), (0.06, 0.14), (0.13, 0.46), brush=0.34, nuc_step_um=10.0,
                 nuc_um=(2.8, 2.5))
_TAL = TubuleKind(0.6, (8.0, 10.5), (0.14, 0.24), (0.12, 0.3), nuc_step_um=7.5,
                  nuc_um=(2.4, 2.1))
_CD = TubuleKind(0.3, (10.0, 13.0), (0.3, 0.45), (0.06, 0.12), nuc_step_um=8.0,
                 nuc_um=(2.7, 2.5))
_THIN = TubuleKind(0.1, (5.0, 7.0), (0.55, 0.7), (0.04, 0.18), nuc_step_um=16.0,
                   nuc_um=(3.8, 1.3))
_VESSEL = TubuleKind(1.0, (3.0, 4.5), (0.65, 0.75), (0.04, 0.2), nuc_step_um=22.0,
                     nuc_um=(3.5, 1.1), rbc=0.6)

OUTER_STRIPE = RadialLayer(900, 28.0, 320.0, 0.97, (
    _S3, replace(_TAL, share=0.16), replace(_CD, share=0.12)), (0.07, 0.2))
INNER_STRIPE = RadialLayer(920, 21.0, 240.0, 0.93, (_TAL, _CD, _THIN), (0.06, 0.16))
VASA_RECTA = RadialLayer(940, 13.0, 300.0, 0.8, (_VESSEL,), (0.035, 0.09))
INNER_MEDULLA = RadialLayer(960, 28.0, 300.0, 0.6, (
    TubuleKind(0.45, (9.0, 15.0), (0.35, 0.5), (0.06, 0.12), nuc_step_um=8.0),
    replace(_THIN, share=0.35), replace(_VESSEL, share=0.2, rbc=0.6)), (0.045, 0.11))
CORTEX_RAYS = OUTER_STRIPE  # the rays' tubules continue those of the outer stripe
BUNDLE_PERIOD_UM = 170.0  # vascular bundles of the inner stripe
RAY_PERIOD_UM = 330.0  # medullary rays of the cortex


def _radial_axes(seed: int, r, psi, period_um: float):
    """Nearest tubule axis of a fan of rays from the papilla tip, at polar points (r um, psi).

    The fan keeps a mean axis spacing of `period_um` at every radius: between R0 * 2^L and
    R0 * 2^(L+1) there are m0 * 2^(L+1) axis slots; even slots are the axes of the level
    below, odd ones start at a random radius inside the level (a tubule entering the fan).
    Returns (key, v_um, cap_um, grow): a stable axis id (the same at every level), the
    lateral offset from the axis, the free half width round it and the 0-1 growth of a
    starting axis.
    """
    m0 = max(int(round(2 * np.pi * R0_UM / period_um)), 3)
    rc = np.maximum(r, R0_UM)
    lev = np.clip(np.floor(np.log2(rc / R0_UM)), 0, _LMAX - 1).astype(np.int64)
    n = m0 * (np.int64(2) << lev)
    step = (2 * np.pi / n).astype(np.float32)
    jf = psi / step
    j = np.round(jf).astype(np.int64)
    base = R0_UM * np.exp2(lev).astype(np.float32)

    def grow(jj):
        start = base * (1.1 + 0.85 * sc.hash_uniform(seed, (jj % n) << (_LMAX - lev), 1))
        return np.where((jj & 1) == 1, sc.smoothstep(0.0, 50.0, r - start), 1.0)

    gj = grow(j)
    a = np.where(gj > 0, j, j + np.where(jf >= j, 1, -1))
    ga = np.where(gj > 0, gj, 1.0)
    gap = np.minimum(2.0 - grow(a - 1), 2.0 - grow(a + 1))
    cap = 0.5 * r * step * gap
    key = (a % n) << (_LMAX - lev)
    return key, r * (psi - a * step), cap, ga


def _radial_tubules(seed: int, layer: RadialLayer, r, psi, rng, size: int):
    """Stain concentrations (cH, cP), nuclei, tubule-wall coverage and the lateral offset
    (um) from each pixel's tubule axis, of a radial layer."""
    seed = seed + layer.salt
    key, v, cap, grow = _radial_axes(seed, r, psi, layer.period_um)
    seg = layer.seg_um
    t = r / seg + sc.hash_uniform(seed, key, 2) + 0.25 * np.sin(
        r * np.float32(2.1 / seg) + 6.283 * sc.hash_uniform(seed, key, 3))
    m = np.floor(t).astype(np.int64)
    pos = t - m

    def h(k):
        return sc.hash_uniform(seed, key, m, k)

    kinds = layer.kinds
    cum = np.cumsum([k.share for k in kinds]) / sum(k.share for k in kinds)
    ki = np.searchsorted(cum[:-1], h(4), side="right")

    def per(fn):
        return np.array([fn(k) for k in kinds], np.float32)[ki]

    pres = (h(5) < layer.present).astype(np.float32)
    hw_lo, hw_hi = per(lambda k: k.hw_um[0]), per(lambda k: k.hw_um[1])
    hw = np.minimum(hw_lo + (hw_hi - hw_lo) * h(6), 0.92 * cap) * np.sqrt(grow)
    room = np.maximum(0.92 * cap - hw, 0.0)
    # a tubule leaving the section plane: its profile narrows to nothing at the segment ends
    prof = np.sqrt(np.clip(1.0 - (2.0 * pos - 1.0) ** 12, 0.0, 1.0))
    hw = np.maximum(hw * prof, 0.3)
    lum_lo, lum_hi = per(lambda k: k.lumen[0]), per(lambda k: k.lumen[1])
    lum = lum_lo + (lum_hi - lum_lo) * h(7)
    ph = 6.283 * sc.hash_uniform(seed, key, 9)
    dv = v - (h(8) - 0.5) * 1.4 * room - 0.3 * room * np.sin(r * np.float32(1 / 70.0) + ph) \
        - 0.8 * np.sin(r * np.float32(1 / 19.0) + 2.0 * ph)
    q = np.abs(dv) / hw
    wall = sc.smoothstep(1.04, 0.96, q) * pres
    lumen = sc.smoothstep(lum + 0.05, lum - 0.05, q) * wall
    tbm = sc.smoothstep(0.88, 0.96, q) * wall
    bb = per(lambda k: k.brush)
    brush = sc.smoothstep(lum - 0.03, lum + 0.02, q) * sc.smoothstep(
        lum + bb + 0.04, lum + bb - 0.01, q) * (bb > 0) * wall
    epi = wall * (1.0 - lumen)
    grain = 1.0 + 0.2 * sc.bank_window(rng, (size, size))
    ih, ip = layer.inter
    cP = (epi * (per(lambda k: k.cyto[1]) * (1 - brush) + C_BRUSH_P * brush)
          + C_TBM_P * 0.9 * tbm + ip * (1 - wall)) * grain
    cH = (epi * per(lambda k: k.cyto[0]) + ih * (1 - wall)) * grain
    rbc = (h(10) < per(lambda k: k.rbc)) * lumen
    cP += 0.55 * rbc
    cH += 0.02 * rbc
    # nuclei in the middle of each wall, alternating between the two walls
    side = (dv >= 0).astype(np.int64)
    step = per(lambda k: k.nuc_step_um)
    along = r / step + sc.hash_uniform(seed, key, 11) + 0.5 * side
    k_n = np.round(along).astype(np.int64)
    frac = along - k_n
    dr = np.abs(dv) - 0.5 * (1.0 + lum) * hw
    nid = k_n * 2 + side
    frac = frac - 0.4 * (sc.hash_uniform(seed, key, nid, 13) - 0.5)
    size_f = 0.8 + 0.35 * sc.hash_uniform(seed, key, nid, 14)
    qn = ((dr / per(lambda k: k.nuc_um[1])) ** 2
          + (frac * step / per(lambda k: k.nuc_um[0])) ** 2) / (size_f * size_f)
    keep = (sc.hash_uniform(seed, key, nid, 12) > 0.25) & (prof > 0.6)
    nuc = sc.smoothstep(1.15, 0.75, qn) * keep * pres * sc.smoothstep(1.25, 1.05, q) * C_NUC_H
    return cH.astype(np.float32), cP.astype(np.float32), nuc.astype(np.float32), wall, v


def _inner_stripe(seed: int, r, psi, rng, size: int):
    """Inner stripe: thick limbs and collecting ducts between vascular bundles."""
    cH, cP, nuc, _, _ = _radial_tubules(seed, INNER_STRIPE, r, psi, rng, size)
    kb, vb, _, _ = _radial_axes(seed + 950, r, psi, BUNDLE_PERIOD_UM)
    bw = 26.0 + 20.0 * sc.hash_uniform(seed + 950, kb, 1)
    inb = sc.smoothstep(bw + 1.0, bw - 1.0, np.abs(vb)) * (
        sc.hash_uniform(seed + 950, kb, 2) < 0.85)
    if inb.any():
        vh, vp, vn, _, _ = _radial_tubules(seed, VASA_RECTA, r, psi, rng, size)
        cH += (vh - cH) * inb
        cP += (vp - cP) * inb
        nuc += (vn - nuc) * inb
    return cH, cP, nuc


def medullary_rays(s: KidneyScene, r, psi, b_cortex):
    """Medullary rays: straight tubules reaching from the outer stripe into the cortex.

    At polar points (r um, psi) with `b_cortex` from `mouse_fields`, returns (offset_um,
    half_width_um): signed lateral offset from the ray's axis and its half width there (0
    where there is no ray). A ray spans 55-85% of the cortex and narrows at its tip.
    """
    seed = s.seed + 995
    key, v, _, _ = _radial_axes(seed, r, psi, RAY_PERIOD_UM)
    reach = s.section.t_cortex_um * (0.55 + 0.3 * sc.hash_uniform(seed, key, 3))
    hw = (28.0 + 22.0 * sc.hash_uniform(seed, key, 1)) * np.sqrt(
        np.clip((b_cortex + reach) / 200.0, 0.0, 1.0))
    hw = np.where(sc.hash_uniform(seed, key, 2) < 0.8, hw, 0.0)
    return v, hw


def _interstitial_cells(s: KidneyScene, x0, y0, size, into: np.ndarray, spacing_um: float):
    """Interstitial cell nuclei lying across the radial tubules, max-stamped into `into`."""
    mpp = s.mpp
    m = s.section
    pad = 6.0
    xs, ys, uu = sc.jittered_points(s.seed + 970, x0 - pad, y0 - pad, x0 + size * mpp + pad,
                                    y0 + size * mpp + pad, spacing_um, 0.8)
    if not len(xs):
        return
    ang = np.arctan2(ys - m.tip_xy[1], xs - m.tip_xy[0]) + np.pi / 2 + (uu - 0.5) * 0.6
    sc.stamp_ellipses(into, (xs - x0) / mpp, (ys - y0) / mpp, (3.2 + 1.5 * uu) / mpp,
                      1.3 / mpp, ang, C_NUC_H * 0.9, nuclear=True)


def _urothelium(s: KidneyScene, x0, y0, size, into: np.ndarray):
    """Dense small nuclei of the urothelium, max-stamped into `into` (masked by the caller)."""
    mpp = s.mpp
    xs, ys, uu = sc.jittered_points(s.seed + 980, x0 - 4, y0 - 4, x0 + size * mpp + 4,
                                    y0 + size * mpp + 4, 5.5, 0.85)
    if len(xs):
        sc.stamp_ellipses(into, (xs - x0) / mpp, (ys - y0) / mpp, (2.5 + 0.6 * uu) / mpp,
                          (2.0 + 0.4 * uu) / mpp, uu * 6.0, C_NUC_H * 0.95, nuclear=True)


def _paint_mouse(s: KidneyScene, F, x0_px, y0_px, size, X, Y, rng, cH, cP):
    """Fill stain concentrations of a mouse-section tile into cH, cP (in place)."""
    mpp = s.mpp
    x0, y0 = x0_px * mpp, y0_px * mpp
    x1, y1 = x0 + size * mpp, y0 + size * mpp
    lay = mouse_layers(F)
    nuc = np.zeros((size, size), np.float32)
    u, w = s.section.frame(X, Y)
    r = np.sqrt(u * u + w * w)
    psi = np.arctan2(u, w)
    if (lay == 8).any():
        h, p = _cortex_tubules(s, x0_px, y0_px, size, X, Y, rng, nuc)
        off, hw = medullary_rays(s, r, psi, F["b_cortex"])
        if (np.abs(off) < hw + CORTEX_RAYS.period_um).any():
            rh, rp, rn, _, v = _radial_tubules(s.seed, CORTEX_RAYS, r, psi, rng, size)
            ray = np.abs(off - v) < hw  # whole tubules: their axes lie inside the ray
            h[ray], p[ray], nuc[ray] = rh[ray], rp[ray], rn[ray]
        sel = lay == 8
        cH[sel], cP[sel] = h[sel], p[sel]
        nuc[~sel] = 0.0
    for value, paint in ((9, lambda: _radial_tubules(s.seed, OUTER_STRIPE, r, psi, rng, size)),
                         (10, lambda: _inner_stripe(s.seed, r, psi, rng, size)),
                         (11, lambda: _radial_tubules(s.seed, INNER_MEDULLA, r, psi, rng,
                                                      size))):
        sel = lay == value
        if not sel.any():
            continue
        h, p, n, *rest = paint()
        if value == 11:
            inuc = np.zeros((size, size), np.float32)
            _interstitial_cells(s, x0, y0, size, inuc, 13.0)
            n = np.maximum(n, inuc * (1.0 - rest[0]))
        cH[sel], cP[sel], nuc[sel] = h[sel], p[sel], n[sel]
    _paint_glomeruli(s, x0, y0, x1, y1, size, X, Y, cH, cP, nuc)
    # fibrous capsule under the surface; urothelium lining the pelvis and the papilla
    capsule = sc.smoothstep(7.0, 3.0, F["depth"])
    lining = (np.maximum(F["papilla"], -F["pelvis"]) < F["depth"] - 5.0) * sc.smoothstep(
        16.0, 11.0, F["tissue"])
    if capsule.any():
        cH += (0.07 - cH) * capsule
        cP += (0.5 - cP) * capsule
        nuc *= 1.0 - capsule
    if lining.any():
        un = np.zeros((size, size), np.float32)
        _urothelium(s, x0, y0, size, un)
        cH += (0.16 - cH) * lining
        cP += (0.2 - cP) * lining
        nuc += (un - nuc) * lining
    cP *= 1.0 - 0.35 * np.clip(nuc, 0, 1)
    np.maximum(cH, nuc, out=cH)


# ---- mouse scene build


def build_mouse(task: str, seed: int, width_px: int, height_px: int, mpp: float,
                label: str | None, pen: bool, fold: bool) -> KidneyScene:
    """A whole mouse kidney section centred on the slide (kidney-layer; always adequate)."""
    if task != "kidney-layer":
        raise UsageError(f"species 'mouse' applies to task kidney-layer only, not {task!r}")
    if label not in (None, "adequate"):
        raise UsageError(f"label {label!r} is not available for a mouse section (a whole "
                         "section always holds cortex); use 'adequate' or leave it out")
    rng = np.random.default_rng([seed, 2203])
    stains = sc.perturbed_stains(rng, sc.PAS_VECTORS, ("hematoxylin", "pas"))
    W, H = width_px * mpp, height_px * mpp
    s = KidneyScene(task=task, seed=int(seed), width_px=int(width_px), height_px=int(height_px),
                    mpp=float(mpp), stains=stains, label="adequate", species=MOUSE)
    s.section = _mouse_section(rng, W, H)
    s.core_index = sc.SpatialIndex(2000.0)
    s.core_index.insert(0, *s.section.bbox)
    s.glom = _mouse_glomeruli(rng, s, W, H)
    m = s.section
    if pen:
        psi = rng.uniform(-1.2, 1.2)
        rr = float(np.interp(psi, m.psi_tab, m.r_out, period=2 * np.pi))
        du, dw = np.sin(psi), np.cos(psi)
        dx, dy = du * m.ex[0] + dw * m.ey[0], du * m.ex[1] + dw * m.ey[1]
        edge = (m.tip_xy[0] + rr * dx, m.tip_xy[1] + rr * dy)
        s.pen = sc.random_pen(rng, W, H, edge, float(np.arctan2(dy, dx)))
    if fold:
        bx0, by0, bx1, by1 = m.bbox
        blob = sc.Blob((bx0 + bx1) / 2, (by0 + by1) / 2, (bx1 - bx0) / 3, (by1 - by0) / 3,
                       float(np.arctan2(m.ex[1], m.ex[0])))
        s.fold = sc.random_fold(rng, blob)
    s.dust = sc.random_dust(rng, W, H)
    s.options = {"species": "mouse"}
    return s


def _mouse_glomeruli(rng, s: KidneyScene, W: float, H: float) -> Glomeruli:
    """Glomeruli thrown into the cortex (centres on the slide), at the species density."""
    bx0, by0, bx1, by1 = s.section.bbox
    bx0, by0, bx1, by1 = max(bx0, 0.0), max(by0, 0.0), min(bx1, W), min(by1, H)
    gx, gy, gr = [], [], []
    if bx1 > bx0 and by1 > by0:
        n = 60000
        cx = rng.uniform(bx0, bx1, n).astype(np.float32)
        cy = rng.uniform(by0, by1, n).astype(np.float32)
        F = mouse_fields(s, cx, cy)
        rad = rng.uniform(*s.species.glomerulus_diameter_um, n) / 2
        in_cortex = (F["tissue"] > 0) & (F["b_cortex"] < 0)
        cortex_mm2 = float(in_cortex.mean()) * (bx1 - bx0) * (by1 - by0) / 1e6
        target = int(rng.poisson(s.species.glomeruli_per_mm2_cortex * cortex_mm2))
        ok = (F["tissue"] > rad + 15) & (F["b_cortex"] < -(rad + 25)) & (F["depth"] > rad + 40)
        # not in a medullary ray (glomeruli lie in the cortical labyrinth)
        u, w = s.section.frame(cx, cy)
        r_c, psi_c = np.sqrt(u * u + w * w), np.arctan2(u, w)
        off, hw = medullary_rays(s, r_c, psi_c, F["b_cortex"] + rad)
        ok &= np.abs(off) > hw + rad + CORTEX_RAYS.period_um
        grid: dict = {}
        cell = 100.0
        for x, y, r in zip(cx[ok], cy[ok], rad[ok], strict=True):
            if len(gx) >= target:
                break
            i, j = int(x // cell), int(y // cell)
            near = [k for a in (i - 1, i, i + 1) for b in (j - 1, j, j + 1)
                    for k in grid.get((a, b), ())]
            if all(np.hypot(x - gx[k], y - gy[k]) > r + gr[k] + 20 for k in near):
                grid.setdefault((i, j), []).append(len(gx))
                gx.append(float(x))
                gy.append(float(y))
                gr.append(float(r))
    n = len(gx)
    g = Glomeruli(np.array(gx, np.float32), np.array(gy, np.float32), np.array(gr, np.float32),
                  np.zeros(n, bool), rng.integers(3, 5, n).astype(np.float32),
                  rng.uniform(0, 2 * np.pi, n).astype(np.float32))
    for i in range(n):
        _mesangium(rng, g, i, fracs=(0.42,), min_r_um=5.5, min_sep_um=4.0)
    g.index = sc.build_index(g.x, g.y, g.r * 1.05, 1000.0)
    return g


# ----------------------------------------------------------------------------- truth


def _areas(areas: dict) -> tuple[float, float, float]:
    """(cortex, medulla, tissue) in mm2 of a human slide from its label areas."""
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
    if s.section is not None:
        return _truth_mouse(s, areas)
    cortex, medulla, tissue = _areas(areas)
    adequate = cortex > 0
    n = len(s.glom.x)
    return {
        "species": s.species.name,
        "diagnosis": {"label": "adequate" if adequate else "inadequate", "adequate": adequate},
        "scores": {"cortex_fraction": round(cortex / (cortex + medulla), 5)
                   if cortex + medulla > 0 else 0.0},
        "counts": {"glomeruli": n, "cores": len(s.cores)},
        "areas_mm2": {"cortex": round(cortex, 5), "medulla": round(medulla, 5),
                      "tissue": round(tissue, 5), "pen": round(areas.get("pen", 0.0), 5)},
        "objects": _glom_objects(s),
    }


def _truth_mouse(s: KidneyScene, areas: dict) -> dict:
    """Mouse kidney-layer truth: the four layer areas, cortex fraction, glomeruli, papilla."""
    layers = {LEGEND[k]: areas.get(LEGEND[k], 0.0) for k in MOUSE_LAYER_LABELS}
    cortex = layers["mouse_cortex"]
    medulla = sum(v for k, v in layers.items() if k != "mouse_cortex")
    tissue = sum(v for k, v in areas.items() if k not in ("background", "pen"))
    adequate = cortex > 0
    m = s.section
    tip = {"type": "papilla_tip", "x_um": round(m.tip_xy[0], 2), "y_um": round(m.tip_xy[1], 2),
           "axis_deg": round(float(np.degrees(np.arctan2(m.ey[1], m.ey[0]))), 3),
           "layer_thickness_um": {"cortex": round(m.t_cortex_um, 1),
                                  "outer_stripe": round(m.t_outer_um, 1),
                                  "inner_stripe": round(m.t_inner_um, 1)}}
    return {
        "species": "mouse",
        "diagnosis": {"label": "adequate" if adequate else "inadequate", "adequate": adequate},
        "scores": {"cortex_fraction": round(cortex / (cortex + medulla), 5)
                   if cortex + medulla > 0 else 0.0},
        "counts": {"glomeruli": len(s.glom.x)},
        "areas_mm2": {"cortex": round(cortex, 5), "medulla": round(medulla, 5),
                      "tissue": round(tissue, 5), "pen": round(areas.get("pen", 0.0), 5),
                      **{k: round(v, 5) for k, v in layers.items()}},
        "objects": _glom_objects(s) + [tip],
    }


def truth_mesangial(s: KidneyScene, areas: dict) -> dict:
    """mesangial truth: M0/M1 from the hypercellular fraction, adequacy = >= 8 glomeruli."""
    cortex, medulla, tissue = _areas(areas)
    n = len(s.glom.x)
    n_hyper = int(s.glom.hyper.sum())
    frac = n_hyper / n if n else 0.0
    return {
        "species": s.species.name,
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


def truth_case(s: KidneyScene, areas: dict) -> dict:
    """glomerular-dx OM truth: the class (one-hot scores), glomeruli with their wall factor."""
    cortex, medulla, tissue = _areas(areas)
    g = s.glom
    n = len(g.x)
    n_hyper = int(g.hyper.sum())
    objects = _glom_objects(s)
    for o, w in zip(objects, g.wall if g.wall is not None else np.ones(n), strict=True):
        o["gbm_thickness_factor"] = round(float(w), 4)
    return {
        "species": s.species.name,
        "diagnosis": {"label": s.label, "adequate": bool(n >= 1), "weak": bool(
            s.options.get("weak", False))},
        "scores": {**{f"p_{c}": float(c == s.label) for c in CASE_LABELS},
                   "hypercellular_fraction": round(n_hyper / n, 5) if n else 0.0,
                   "mean_gbm_thickness_factor": round(float(g.wall.mean()), 4)
                   if n and g.wall is not None else 1.0},
        "counts": {"glomeruli": n, "hypercellular_glomeruli": n_hyper,
                   "mesangial_cells": int(sum(len(c) for c in g.cells))},
        "areas_mm2": {"cortex": round(cortex, 5), "medulla": round(medulla, 5),
                      "tissue": round(tissue, 5), "pen": round(areas.get("pen", 0.0), 5)},
        "objects": objects,
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
    label_tile=label_tile, truth=truth_layer, arrays=arrays, tissue_classes=TISSUE_CLASSES,
)
MESANGIAL_SPEC = SynthSpec(
    name="mesangial", legend=LEGEND, labels=("M0", "M1"),
    default_size_px=(16000, 8000), default_mpp=0.5, build=build, render_tile=render_tile,
    label_tile=label_tile, truth=truth_mesangial, arrays=arrays,
    tissue_classes=TISSUE_CLASSES,
)
# the OM slide of a glomerular-dx case (`synth.cases.write_case`; write_slide writes it alone)
CASE_OM_SPEC = SynthSpec(
    name="glomerular-dx", legend=LEGEND, labels=CASE_LABELS,
    default_size_px=(6000, 4000), default_mpp=0.5, build=build, render_tile=render_tile,
    label_tile=label_tile, truth=truth_case, arrays=arrays, tissue_classes=TISSUE_CLASSES,
)
