"""Synthetic H&E liver resections for the `liver` task (HCC vs intrahepatic CCA).

Scene (sizes in um, from standard liver histology):
- one large tissue piece (a resection block) with a lobulated edge;
- non-tumour liver: lobules round central veins (jittered lattice, `lobule_um` 0.8-1.1 mm
  apart); one-cell-thick hepatocyte plates (28 um apart) radiate from each central vein,
  built as Voronoi segments (90 um long, 4 hepatocytes) of a lobule-polar lattice that
  continue the plate of the ring inside (occasional interruptions = anastomoses), bent by a
  gentle domain warp; ~5 um sinusoids (open or collapsed) lined by flat endothelial nuclei
  with a few red cells; hepatocytes ~22 um, eosinophilic granular cytoplasm, a round
  central vesicular nucleus (~9 um, nucleolus), ~10 % binucleate; portal tracts (loose
  fibrous stroma, portal vein, hepatic artery, bile duct, lymphocytes) at the lobule
  corners; optional steatosis (fat vacuoles);
- HCC (label "HCC"): 1-3 expansile nodules, most with a thin fibrous capsule; thick
  trabeculae (Voronoi cords 75-120 um across, 3-5 cells) of atypical hepatocyte-like cells
  (24-29 um, pleomorphic hyperchromatic nuclei 10-15 um with big nucleoli, a few giant
  ones) separated by endothelium-lined sinusoid-like spaces, a few pseudo-glands, no portal
  tracts; the cytoplasm has the colour of normal hepatocytes (architecture and nuclei
  differ, not colour);
- CCA (label "CCA"): 1-2 infiltrative masses of irregular glands/ducts (cuboidal to
  columnar epithelium round a lumen, basal elongated nuclei, some luminal mucin; fewer in
  the sclerotic centre) in pale desmoplastic stroma (wavy fibres in domains of one
  direction, spindle fibroblasts, a few lymphocytes);
- optional pen stroke and fold; a little dust.

One tumour type per slide [choice]: the tumour covers a fraction of the tissue drawn from
`TUMOUR_FRACTION` (0.2-0.6; the tumour field is thresholded at that quantile), the rest is
non-tumour liver. No mixed HCC-CCA slides.

Label legend (`LEGEND`) [choice, docs/models.md §3]: 0 background, 1 non-tumour liver, 2 HCC,
3 CCA, 7 pen. Tumour labels cover the whole tumour region: an HCC capsule counts as HCC and
the desmoplastic stroma between CCA glands counts as CCA (there is no separate stroma
class); portal tracts and central veins count as non-tumour liver.
Case rule: r = A_HCC / (A_HCC + A_CCA); HCC if r > 0.5.

`write_liver_cohort` writes many small patients (1-2 slides each, one diagnosis per
patient), a few with the label mask (pixel-annotated), most with the diagnosis only.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

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
from .writer import check_writable, truth_paths, write_spec_slide

LEGEND = {0: "background", 1: "non_tumour", 2: "hcc", 3: "cca", 7: "pen"}
TISSUE_CLASSES = (1, 2, 3)
TUMOUR_VALUE = {"HCC": 2, "CCA": 3}
TUMOUR_FRACTION = (0.2, 0.6)  # of the tissue area [choice]
PEN_VALUE = 7

# stain concentrations (OD units at the reference intensity); H = haematoxylin, E = eosin
C_HEP_E, C_HEP_H = 0.80, 0.17  # hepatocyte cytoplasm (granular, eosinophilic)
C_HCC_E, C_HCC_H = 0.78, 0.19  # tumour hepatocytes: the same pink, a little more basophilic
C_HEP_NUC_H = 1.3  # vesicular hepatocyte nucleus
C_HCC_NUC_H = 1.65  # hyperchromatic tumour nucleus
C_NUCLEOLUS_H = 1.9
C_NUC_H = 1.7  # endothelium, fibroblasts, duct epithelium
C_LYM_H = 2.1
C_SINUS_E, C_SINUS_H = 0.12, 0.03
C_PORTAL_E, C_PORTAL_H = 0.72, 0.10  # portal tract connective tissue
C_CAPSULE_E, C_CAPSULE_H = 1.05, 0.08  # dense collagen
C_DESMO_E, C_DESMO_H = 0.45, 0.13  # desmoplastic stroma: paler, slightly grey-blue
C_EPI_E, C_EPI_H = 0.46, 0.30  # biliary / CCA epithelium (amphophilic)
C_MUCIN_E, C_MUCIN_H = 0.10, 0.16
C_WALL_E = 0.95
C_RBC_E = 1.10

PLATE_ROW_UM = 90.0  # radial length of one plate segment (4 hepatocytes)
PLATE_UM = 28.0  # plate spacing (one hepatocyte + a sinusoid)
SINUSOID_HALF_UM = 2.4
HEPATOCYTE_NUC_UM = 4.4  # nucleus radius
GLAND_SPACING_UM = 120.0  # CCA gland lattice


@dataclass
class LiverScene(SlideBase):
    fragments: list = field(default_factory=list)
    frag_index: sc.SpatialIndex | None = None
    nodules: list = field(default_factory=list)
    tumour_value: int = 2
    tumour_thr_um: float = 0.0
    tumour_noise: tuple = (10.0, 250.0, 4.0, 60.0)  # amp1, scale1, amp2, scale2 (um)
    lobule_um: float = 950.0
    trabecula_um: float = 95.0
    trabecula_angle: float = 0.0
    hcc_cell_um: float = 30.0
    capsule_um: float = 0.0
    steatosis: float = 0.0
    gland_keep: float = 0.7
    target_fraction: float = 0.4
    pseudo_glands: float = 0.3  # share of lattice sites with an HCC pseudo-gland
    cv_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    pt_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))


# ----------------------------------------------------------------------------- macro fields


def macro_fields(s: LiverScene, X, Y) -> dict:
    """Slowly varying fields at points (um): `tissue` (um inside the tissue edge) and
    `tumour` (um inside the tumour boundary, < 0 outside)."""
    X = np.asarray(X, np.float32)
    Y = np.asarray(Y, np.float32)
    tissue = np.full(X.shape, -1e4, np.float32)
    x0, x1, y0, y1 = float(X.min()), float(X.max()), float(Y.min()), float(Y.max())
    for i in s.frag_index.query(x0, y0, x1, y1):
        tissue = np.maximum(tissue, s.fragments[i].sdf(X, Y))
    if tissue.max() > -200:
        tissue = tissue + 12.0 * sc.value_noise(s.seed + 1, X, Y, 110.0) \
            + 4.0 * sc.value_noise(s.seed + 2, X, Y, 25.0)
    tumour = np.full(X.shape, -1e4, np.float32)
    for b in s.nodules:
        tumour = np.maximum(tumour, b.sdf(X, Y))
    if s.nodules:
        a1, s1, a2, s2 = s.tumour_noise
        tumour = tumour + a1 * sc.value_noise(s.seed + 11, X, Y, s1) \
            + a2 * sc.value_noise(s.seed + 12, X, Y, s2) - np.float32(s.tumour_thr_um)
    return {"tissue": tissue, "tumour": tumour.astype(np.float32)}


def label_tile(s: LiverScene, x0_um: float, y0_um: float, px_um: float,
               size: int) -> np.ndarray:
    """Label map (size, size) uint8 at `px_um` um/px with top-left corner (x0_um, y0_um)."""
    lab = np.zeros((size, size), np.uint8)
    x1, y1 = x0_um + size * px_um, y0_um + size * px_um
    if len(s.frag_index.query(x0_um, y0_um, x1, y1)):
        F = sc.coarse_fields(lambda gx, gy: macro_fields(s, gx, gy), x0_um, y0_um, px_um,
                             size, coarse_step(px_um, size))
        tissue = F["tissue"] > 0
        lab[tissue] = 1
        lab[tissue & (F["tumour"] > 0)] = s.tumour_value
    pen_label(s, lab, x0_um, y0_um, px_um, PEN_VALUE)
    return lab


# ----------------------------------------------------------------------------- lobules


def _cv_xy(s: LiverScene, i, j):
    """Central vein centres (um) of lattice cells (i, j) and their lumen radius (um)."""
    L = s.lobule_um
    jx = sc.hash_uniform(s.seed + 201, i, j, 1) - 0.5
    jy = sc.hash_uniform(s.seed + 201, i, j, 2) - 0.5
    r = 14.0 + 20.0 * sc.hash_uniform(s.seed + 201, i, j, 3)
    return ((i + 0.5 + 0.36 * jx) * L).astype(np.float32), \
        ((j + 0.5 + 0.36 * jy) * L).astype(np.float32), r.astype(np.float32)


def _lobule_frame(s: LiverScene, X, Y):
    """Nearest central vein of each point.

    Returns (cand, k1, bis): cand = (ci, cj, cx, cy, r) arrays of the candidate veins, k1 =
    index of the nearest (shape of X), bis = um to the lobule boundary (Voronoi edge).
    """
    L = s.lobule_um
    xa, xb, ya, yb = float(X.min()), float(X.max()), float(Y.min()), float(Y.max())
    i = np.arange(int(np.floor(xa / L)) - 1, int(np.floor(xb / L)) + 2)
    j = np.arange(int(np.floor(ya / L)) - 1, int(np.floor(yb / L)) + 2)
    ci, cj = (a.ravel() for a in np.meshgrid(i, j))
    cx, cy, cr = _cv_xy(s, ci, cj)
    # only veins that can be nearest or second nearest somewhere in the box
    far = np.maximum(np.maximum(np.abs(cx - xa), np.abs(cx - xb)) ** 2
                     + np.maximum(np.abs(cy - ya), np.abs(cy - yb)) ** 2, 0)
    near = (np.maximum(np.maximum(xa - cx, cx - xb), 0) ** 2
            + np.maximum(np.maximum(ya - cy, cy - yb), 0) ** 2)
    keep = near <= np.sort(far)[min(1, len(far) - 1)] + 1.0
    ci, cj, cx, cy, cr = ci[keep], cj[keep], cx[keep], cy[keep], cr[keep]
    d1 = np.full(X.shape, np.inf, np.float32)
    d2 = d1.copy()
    k1 = np.zeros(X.shape, np.int32)
    k2 = k1.copy()
    for k in range(len(ci)):
        d = (X - cx[k]) ** 2 + (Y - cy[k]) ** 2
        closer = d < d1
        second = ~closer & (d < d2)
        d2 = np.where(closer, d1, np.where(second, d, d2))
        k2 = np.where(closer, k1, np.where(second, k, k2))
        d1 = np.where(closer, d, d1)
        k1 = np.where(closer, k, k1)
    cd = np.hypot(cx[k1] - cx[k2], cy[k1] - cy[k2]) + np.float32(1e-3)
    bis = (d2 - d1) / (2 * cd)
    return (ci, cj, cx, cy, cr), k1, bis


def _plate_rows(nrows: int) -> np.ndarray:
    """Plate segments per ring of the lobule-polar lattice (one ring per PLATE_ROW_UM)."""
    rows = np.arange(nrows)
    return np.maximum(4, np.round(2 * np.pi * (rows + 0.5) * PLATE_ROW_UM / PLATE_UM)
                      ).astype(np.int64)


_PLATE_CACHE: dict[tuple, dict] = {}


def _vein_plates(s: LiverScene, ci: int, cj: int) -> dict:
    """Plate-segment features of one central vein (cached): flat arrays over (ring, slot).

    Segment (row, col) has its centre at radius uf (um) and angle th round the vein; `key`
    = row * 1024 + col and `pkey` = the key of the segment it continues (the one of the
    ring inside at its angle; -1 where the plate is interrupted).
    """
    ck = (s.seed, round(s.lobule_um, 3), ci, cj)
    t = _PLATE_CACHE.get(ck)
    if t is not None:
        return t
    nrows = _rings(s)
    n_row = _plate_rows(nrows)
    nmax = int(n_row.max())
    rr, cc = np.meshgrid(np.arange(nrows), np.arange(nmax), indexing="ij")
    h1 = sc.hash_uniform(s.seed + 211, ci, cj, rr, cc)
    h2 = sc.hash_uniform(s.seed + 212, ci, cj, rr, cc)
    h3 = sc.hash_uniform(s.seed + 213, ci, cj, rr, cc)
    th = (2 * np.pi) * (cc + 0.5 + 0.5 * (h2 - 0.5)) / n_row[rr]
    # ring radius waves smoothly with the angle (periodic): neighbours in a ring stay at
    # similar radii, so plates stay radial while the rings' ends are staggered
    ring = sc.hash_uniform(s.seed + 214, ci, cj, np.arange(nrows), np.arange(3)[:, None])
    waves = (2 + np.floor(ring[0] * 4))[:, None]
    wave = np.sin(waves * th + ring[1][:, None] * 6.283) + 0.5 * np.sin(
        (waves + 3) * th + ring[2][:, None] * 6.283)
    uf = (rr + 0.5 + 0.2 * wave + 0.08 * (h1 - 0.5)) * PLATE_ROW_UM
    cx, cy, _ = _cv_xy(s, np.int64(ci), np.int64(cj))
    parent = np.floor(th * n_row[np.maximum(rr - 1, 0)] / (2 * np.pi)).astype(np.int64) \
        % n_row[np.maximum(rr - 1, 0)]
    pkey = np.where((rr > 0) & (h3 > 0.12), (rr - 1) * 1024 + parent, -1)
    t = {"fx": (cx + uf * np.cos(th)).ravel().astype(np.float32),
         "fy": (cy + uf * np.sin(th)).ravel().astype(np.float32),
         "uf": uf.ravel().astype(np.float32), "th": th.ravel().astype(np.float32),
         "key": (rr * 1024 + cc).ravel().astype(np.int32),
         "pkey": pkey.ravel().astype(np.int32), "valid": (cc < n_row[rr]).ravel(),
         "row": rr.ravel(), "col": cc.ravel(), "n_row": n_row, "nmax": nmax}
    if len(_PLATE_CACHE) > 512:
        _PLATE_CACHE.clear()
    _PLATE_CACHE[ck] = t
    return t


def _rings(s: LiverScene) -> int:
    """Rings per lobule: enough for the farthest point of any lobule (jittered lattice)."""
    return int(np.ceil(1.05 * s.lobule_um / PLATE_ROW_UM)) + 2


def _plate_table(s: LiverScene, cand) -> dict:
    """The candidate veins' plate tables stacked: flat index = k * per_vein + row * nmax + col."""
    tabs = [_vein_plates(s, int(a), int(b)) for a, b in zip(cand[0], cand[1], strict=True)]
    out = {name: np.concatenate([t[name] for t in tabs])
           for name in ("fx", "fy", "uf", "th", "key", "pkey", "valid", "row", "col")}
    out["k"] = np.repeat(np.arange(len(tabs)), len(tabs[0]["fx"]))
    out.update(n_row=tabs[0]["n_row"], nmax=tabs[0]["nmax"], per_vein=len(tabs[0]["fx"]))
    return out


def _plates(s: LiverScene, X, Y) -> dict:
    """Hepatocyte-plate geometry at points X, Y (um, already domain-warped).

    Plates are Voronoi segments of a lobule-polar lattice round each central vein (rings
    PLATE_ROW_UM deep, slots ~PLATE_UM wide); a segment continues the plate of the ring
    inside unless the plate is interrupted there, so sinusoids run radially with a few
    cross-connections. Returns b (um to the nearest sinusoid centre line or lobule
    boundary), bp (um to the nearest boundary between cells of one plate), f1 (flat id of
    the nearest segment), f1x, f1y, ex, ey (direction across the nearest sinusoid), r (um
    to the vein), k1 (candidate vein index), cand, table.
    """
    cand, k1, bis = _lobule_frame(s, X, Y)
    dx = X - cand[2][k1]
    dy = Y - cand[3][k1]
    r = np.sqrt(dx * dx + dy * dy)
    a = (np.arctan2(dy, dx) * np.float32(1 / (2 * np.pi))) % np.float32(1.0)
    t = _plate_table(s, cand)
    n_row, nmax, nrows = t["n_row"], t["nmax"], len(t["n_row"])
    fx, fy = t["fx"], t["fy"]
    ur = r * np.float32(1 / PLATE_ROW_UM)
    iu0 = np.floor(ur).astype(np.int32)
    other = np.where(ur - iu0 < 0.5, iu0 - 1, iu0 + 1)  # the nearer neighbouring ring
    base = k1 * np.int32(t["per_vein"])
    d1 = np.full(X.shape, np.inf, np.float32)
    f1 = np.zeros(X.shape, np.int32)
    cands = []
    for row in (iu0, other):
        ok = (row >= 0) & (row < nrows)
        row = np.clip(row, 0, nrows - 1)
        nr = n_row[row].astype(np.int32)
        colc = np.floor(a * nr).astype(np.int32)
        for dv in (-1, 0, 1):
            flat = base + row * np.int32(nmax) + (colc + dv) % nr
            ddx = X - fx[flat]
            ddy = Y - fy[flat]
            d = ddx * ddx + ddy * ddy
            if not ok.all():
                d = np.where(ok, d, np.inf)
            closer = d < d1
            d1 = np.where(closer, d, d1)
            f1 = np.where(closer, flat, f1)
            cands.append((flat, d))
    f1x, f1y = fx[f1], fy[f1]
    key1, pkey1 = t["key"][f1], t["pkey"][f1]
    b = np.full(X.shape, np.inf, np.float32)
    bp = b.copy()
    ex = np.zeros(X.shape, np.float32)
    ey = ex.copy()
    for flat, d in cands:
        gx, gy = fx[flat] - f1x, fy[flat] - f1y
        sep = np.sqrt(gx * gx + gy * gy)
        bj = (d - d1) / (2 * sep + np.float32(1e-3))
        same = (t["pkey"][flat] == key1) | (pkey1 == t["key"][flat])
        bj = np.where(flat == f1, np.inf, bj)
        cross = ~same & (bj < b)
        b = np.where(cross, bj, b)
        ex = np.where(cross, gx, ex)
        ey = np.where(cross, gy, ey)
        bp = np.where(same & (bj < bp), bj, bp)
    lobule_edge = bis < b
    b = np.where(lobule_edge, bis, b)
    return {"b": b, "bp": bp, "f1": f1, "f1x": f1x, "f1y": f1y, "ex": ex, "ey": ey, "r": r,
            "k1": k1, "cand": cand, "table": t}


def _warp_fn(s: LiverScene, key: int, amp_um: float, scale_um: float,
             broad_um: float = 0.0):
    """Domain warp (dx, dy) um as a function of points (um): smooth value noise of
    `amp_um` at `scale_um`, plus `broad_um` at 5x that scale (gently curving structures)."""

    def at(x_um, y_um):
        dx = amp_um * sc.value_noise(s.seed + key, x_um, y_um, scale_um)
        dy = amp_um * sc.value_noise(s.seed + key + 1, x_um, y_um, scale_um)
        if broad_um:
            dx = dx + broad_um * sc.value_noise(s.seed + key + 2, x_um, y_um, 5 * scale_um)
            dy = dy + broad_um * sc.value_noise(s.seed + key + 3, x_um, y_um, 5 * scale_um)
        return dx, dy

    return at


def _liver_warp(s: LiverScene):
    """The non-tumour liver's warp: lobule and plate geometry live in warped space."""
    return _warp_fn(s, 221, 6.0, 80.0, 28.0)


def _unwarp(warp_at, x_um, y_um, iters: int = 3):
    """Image-space points p whose warped position p + warp(p) is (x_um, y_um)."""
    px, py = x_um, y_um
    for _ in range(iters):
        dx, dy = warp_at(px, py)
        px, py = x_um - dx, y_um - dy
    return px, py


def _coarse_grid(s: LiverScene, x0_px: int, y0_px: int, size: int):
    """Pixel centres (um) of a grid ~1 um apart over the tile: (X, Y, factor).

    Cell geometry (plates, trabeculae) is evaluated there and upsampled with `_up`: its
    edges are smooth at that scale and it costs a quarter at 0.5 um/px.
    """
    f = 1
    while f * 2 * s.mpp <= 1.0 and size % (f * 2) == 0:
        f *= 2
    n = size // f
    xs = ((x0_px + (np.arange(n) + 0.5) * f) * s.mpp).astype(np.float32)
    ys = ((y0_px + (np.arange(n) + 0.5) * f) * s.mpp).astype(np.float32)
    X, Y = np.meshgrid(xs, ys)
    return X, Y, f


def _up(a: np.ndarray, f: int) -> np.ndarray:
    """Bilinear upsampling of a coarse-grid field by `f` (pixel-centre aligned)."""
    if f == 1:
        return a
    from scipy.ndimage import zoom

    return zoom(a, f, order=1, grid_mode=True, mode="nearest").astype(np.float32)


def _tile_px(x_um, y_um, x0, y0, mpp):
    return (np.asarray(x_um) - x0) / mpp, (np.asarray(y_um) - y0) / mpp


def _lattice(seed: int, i_lo: int, ni: int, j_lo: int, nj: int, su: float, sv: float,
             jitter: float):
    """Jittered lattice features of cells [i_lo, i_lo+ni) x [j_lo, j_lo+nj) (cells su x sv
    um): flat arrays (fu, fv, h, ci, cj), h a uniform per cell."""
    ci, cj = np.meshgrid(np.arange(i_lo, i_lo + ni), np.arange(j_lo, j_lo + nj))
    ci, cj = ci.ravel(), cj.ravel()
    fu = (ci + 0.5 + jitter * (2 * sc.hash_uniform(seed, ci, cj, 1) - 1)) * su
    fv = (cj + 0.5 + jitter * (2 * sc.hash_uniform(seed, ci, cj, 2) - 1)) * sv
    return (fu.astype(np.float32), fv.astype(np.float32), sc.hash_uniform(seed, ci, cj, 3),
            ci, cj)


def _voronoi(seed: int, U, V, su: float, sv: float, jitter: float = 0.35) -> dict:
    """Nearest two features of a jittered lattice (cells su x sv um) at points U, V (um).

    Returns b (um to the Voronoi edge, exact for the two features found), f1u, f1v, f2u,
    f2v (feature positions, um) and h (uniform of the nearest cell).
    """
    i_lo = int(np.floor(U.min() / su)) - 2
    j_lo = int(np.floor(V.min() / sv)) - 2
    ni = int(np.floor(U.max() / su)) - i_lo + 3
    nj = int(np.floor(V.max() / sv)) - j_lo + 3
    fu, fv, h, _, _ = _lattice(seed, i_lo, ni, j_lo, nj, su, sv, jitter)
    bi = np.floor(U * np.float32(1 / su)).astype(np.int64) - i_lo
    bj = np.floor(V * np.float32(1 / sv)).astype(np.int64) - j_lo
    d1 = np.full(U.shape, np.inf, np.float32)
    d2 = d1.copy()
    f1 = np.zeros(U.shape, np.int64)
    f2 = f1.copy()
    for dv in (-1, 0, 1):
        for du in (-1, 0, 1):
            flat = (bj + dv) * ni + (bi + du)
            dx = U - fu[flat]
            dy = V - fv[flat]
            d = dx * dx + dy * dy
            closer = d < d1
            second = ~closer & (d < d2)
            d2 = np.where(closer, d1, np.where(second, d, d2))
            f2 = np.where(closer, f1, np.where(second, flat, f2))
            d1 = np.where(closer, d, d1)
            f1 = np.where(closer, flat, f1)
    f1u, f1v, f2u, f2v = fu[f1], fv[f1], fu[f2], fv[f2]
    sep = np.hypot(f2u - f1u, f2v - f1v) + np.float32(1e-3)
    return {"b": (d2 - d1) / (2 * sep), "f1u": f1u, "f1v": f1v, "f2u": f2u, "f2v": f2v,
            "h": h[f1]}


def _box_points(seed: int, x0, y0, x1, y1, su: float, sv: float, jitter: float):
    """All lattice features (as `_voronoi`) inside a box (um): (fu, fv, h, ci, cj)."""
    i_lo, j_lo = int(np.floor(x0 / su)) - 1, int(np.floor(y0 / sv)) - 1
    ni = int(np.floor(x1 / su)) - i_lo + 2
    nj = int(np.floor(y1 / sv)) - j_lo + 2
    fu, fv, h, ci, cj = _lattice(seed, i_lo, ni, j_lo, nj, su, sv, jitter)
    sel = (fu >= x0) & (fu < x1) & (fv >= y0) & (fv < y1)
    return fu[sel], fv[sel], h[sel], ci[sel], cj[sel]


def _stamp_nuclei(nuc, x_um, y_um, ra_um, rb_um, ang, amp, x0, y0, mpp, tex=None,
                  nucleolus: float = 0.0):
    """Nuclei (semi-axes um) into `nuc`, modulated by the chromatin texture `tex` (the
    tile's, or None for smooth dense nuclei), optionally with a central nucleolus (um)."""
    if not np.size(x_um):
        return
    px, py = _tile_px(x_um, y_um, x0, y0, mpp)
    sc.stamp_ellipses(nuc, px, py, np.asarray(ra_um) / mpp, np.asarray(rb_um) / mpp, ang, amp,
                      texture=tex, nuclear=True)
    if nucleolus > 0:
        sc.stamp_ellipses(nuc, px, py, nucleolus / mpp, nucleolus / mpp, 0.0, C_NUCLEOLUS_H)


def _ellipse_rho(X, Y, cx, cy, a, b, ang):
    """Elliptical radius (1 on the boundary) at points X, Y."""
    dx, dy = X - cx, Y - cy
    c, s_ = np.cos(ang), np.sin(ang)
    return np.sqrt(((dx * c + dy * s_) / a) ** 2 + ((dy * c - dx * s_) / b) ** 2)


def _blob_ring(b: sc.Blob, depth_um: float, spacing_um: float, rng):
    """Points `depth_um` inside a blob's boundary, ~`spacing_um` apart: (x, y, normal angle)."""
    R = float(np.sqrt(b.a_um * b.b_um))
    per = np.pi * (b.a_um + b.b_um) * max(1.0 - depth_um / R, 0.1)
    n = max(int(per / spacing_um), 4)
    th = (np.arange(n) + rng.uniform(-0.25, 0.25, n)) * (2 * np.pi / n)
    bound = np.ones(n)
    for k, (amp, ph) in enumerate(zip(b.amps, b.phases, strict=True), start=2):
        bound = bound + amp * np.cos(k * th + ph)
    q = np.maximum(bound - depth_um / R, 0.05)
    u, v = q * np.cos(th), q * np.sin(th)
    c, s_ = np.cos(b.angle), np.sin(b.angle)
    dx = b.a_um * u * c - b.b_um * v * s_
    dy = b.a_um * u * s_ + b.b_um * v * c
    return b.x_um + dx, b.y_um + dy, np.arctan2(dy, dx)


# ----------------------------------------------------------------------------- non-tumour


def _normal_liver(s: LiverScene, x0_px, y0_px, size, X, Y, rng, tex, nuc, vac):
    """Hepatocyte plates, sinusoids, central veins and portal tracts. Returns (cH, cE)."""
    mpp = s.mpp
    x0, y0 = x0_px * mpp, y0_px * mpp
    span = size * mpp
    warp_at = _liver_warp(s)
    Xc, Yc, f = _coarse_grid(s, x0_px, y0_px, size)
    dwx, dwy = warp_at(Xc, Yc)
    P = _plates(s, Xc + dwx, Yc + dwy)
    t = P["table"]
    # membranes: arcs round the vein between the 4 hepatocytes of a segment, and the
    # boundaries between consecutive segments of one plate
    cell = PLATE_ROW_UM / 4
    m = (P["r"] - t["uf"][P["f1"]]) * np.float32(1 / cell) + np.float32(2.0)
    mr = np.round(m)
    arc = np.abs(m - mr) * cell + np.where((mr >= 1) & (mr <= 3), 0, 99)
    memb = sc.smoothstep(0.9, 0.3, _up(np.minimum(arc, P["bp"]), f))
    # sinusoids: open in places, nearly collapsed slits in others
    half = SINUSOID_HALF_UM * (1.0 + 0.45 * sc.value_noise(s.seed + 226, Xc, Yc, 45.0))
    sinus = sc.smoothstep(0.5, -0.5, _up(P["b"] - half, f))
    gran = 1.0 + 0.16 * sc.bank_window(rng, (size, size))
    zone = 1.0 + 0.06 * sc.tile_noise(s.seed + 225, x0_px, y0_px, size,
                                      sc.pow2_cell(150.0, mpp, size))
    keep = 1.0 - sinus
    cE = (C_HEP_E * gran * zone * (1.0 + 0.18 * memb)) * keep + C_SINUS_E * sinus
    cH = (C_HEP_H * gran) * keep + C_SINUS_H * sinus
    _hepatocyte_nuclei(s, P, x0, y0, span, warp_at, nuc, vac, tex)

    def geometry(x, y):
        dx, dy = warp_at(x, y)
        return _plates(s, x + dx, y + dy)

    _sinusoid_cells(s, x0, y0, span, nuc, cE, cH, geometry, SINUSOID_HALF_UM, 24.0, 600)
    _portal_tracts(s, x0, y0, span, X, Y, nuc, cE, cH, tex)
    _central_veins(s, x0, y0, span, X, Y, nuc, cE, cH)
    return cH.astype(np.float32), cE.astype(np.float32)


def _hepatocyte_nuclei(s: LiverScene, P: dict, x0, y0, span, warp_at, nuc, vac, tex):
    """One nucleus per hepatocyte (4 per plate segment along its radius): some binucleate,
    some missing (sectioned off), steatotic cells with a fat vacuole and a flat nucleus."""
    mpp = s.mpp
    t = P["table"]
    ci, cj, cx, cy, cr = P["cand"]
    near = t["valid"] & (t["fx"] > x0 - 60) & (t["fx"] < x0 + span + 60) \
        & (t["fy"] > y0 - 60) & (t["fy"] < y0 + span + 60)
    seg = np.nonzero(near)[0]
    if not len(seg):
        return
    k = t["k"][seg][:, None]
    cell = PLATE_ROW_UM / 4
    # u[q]: independent uniforms per (segment, cell) for purpose q
    u = sc.hash_uniform(s.seed + 231, ci[k], cj[k], t["row"][seg][:, None],
                        t["col"][seg][:, None], np.arange(4)[None, :],
                        np.arange(6)[:, None, None])
    rad = t["uf"][seg][:, None] + (np.arange(4)[None, :] - 1.5) * cell + (u[0] - 0.5) * 4.0
    th = t["th"][seg][:, None] + (u[1] - 0.5) * 5.0 / np.maximum(rad, 10.0)
    px = (cx[k] + rad * np.cos(th)).ravel()
    py = (cy[k] + rad * np.sin(th)).ravel()
    own_x = np.broadcast_to(t["fx"][seg][:, None], rad.shape).ravel()
    own_y = np.broadcast_to(t["fy"][seg][:, None], rad.shape).ravel()
    uu = u.reshape(6, -1)
    th = th.ravel()
    idx = np.nonzero((px > x0 - 12) & (px < x0 + span + 12) & (py > y0 - 12)
                     & (py < y0 + span + 12))[0]
    if not len(idx):
        return
    Q = _plates(s, px[idx], py[idx])
    ok = (np.abs(Q["f1x"] - own_x[idx]) < 1e-2) & (np.abs(Q["f1y"] - own_y[idx]) < 1e-2)
    ok &= (Q["b"] > HEPATOCYTE_NUC_UM + 1.5) & (Q["bp"] > HEPATOCYTE_NUC_UM) \
        & (Q["r"] > Q["cand"][4][Q["k1"]] + 10.0)
    ok &= uu[2][idx] > 0.12
    idx = idx[ok]
    nx, ny = _unwarp(warp_at, px[idx], py[idx])  # warped space -> image space
    ang = th[idx]
    q4, q5 = uu[4][idx], uu[5][idx]
    steat = uu[3][idx] < s.steatosis
    two = (q4 < 0.12) & ~steat
    one = ~two & ~steat
    r_n = HEPATOCYTE_NUC_UM * (0.9 + 0.2 * q5)
    amp = C_HEP_NUC_H * (0.88 + 0.22 * q4)
    _stamp_nuclei(nuc, nx[one], ny[one], r_n[one], r_n[one] * 0.93, q5[one] * 3.1, amp[one],
                  x0, y0, mpp, tex, nucleolus=0.8)
    if two.any():  # binucleate: two smaller nuclei across the cell
        ox, oy = -np.sin(ang[two]) * 4.6, np.cos(ang[two]) * 4.6
        for sgn in (-1, 1):
            _stamp_nuclei(nuc, nx[two] + sgn * ox, ny[two] + sgn * oy, r_n[two] * 0.82,
                          r_n[two] * 0.78, q5[two] * 3.1, amp[two], x0, y0, mpp, tex, nucleolus=0.7)
    if steat.any():
        vr = 6.0 + 4.0 * q5[steat]
        vpx, vpy = _tile_px(nx[steat], ny[steat], x0, y0, mpp)
        sc.stamp_ellipses(vac, vpx, vpy, vr / mpp, vr * 0.92 / mpp, 0.0, 1.0)
        ox, oy = -np.sin(ang[steat]), np.cos(ang[steat])
        _stamp_nuclei(nuc, nx[steat] + ox * (vr + 1.5), ny[steat] + oy * (vr + 1.5), 3.6,
                      1.6, ang[steat], C_HEP_NUC_H * 1.2, x0, y0, mpp, tex)


def _sinusoid_cells(s: LiverScene, x0, y0, span, nuc, cE, cH, geometry, half_um: float,
                    spacing_um: float, key: int) -> None:
    """Flat endothelial nuclei on sinusoid walls and a few red cells inside the sinusoids.

    geometry(x, y) -> dict: b (um to the sinusoid centre line) and ex, ey (direction across
    it) at points (um, image space).
    """
    mpp = s.mpp
    px, py, u = sc.jittered_points(s.seed + key, x0 - 6, y0 - 6, x0 + span + 6, y0 + span + 6,
                                   spacing_um, 0.85)
    if len(px):
        G = geometry(px, py)
        ok = G["b"] < half_um + 0.5
        if ok.any():
            n = np.hypot(G["ex"], G["ey"]) + 1e-3
            shift = G["b"] - half_um + 0.6  # onto the wall, just inside the lumen
            sx = px + G["ex"] / n * shift
            sy = py + G["ey"] / n * shift
            ang = np.arctan2(G["ey"], G["ex"]) + np.pi / 2
            _stamp_nuclei(nuc, sx[ok], sy[ok], 4.2 + 1.5 * u[ok], 1.3, ang[ok],
                          C_NUC_H * (0.9 + 0.2 * u[ok]), x0, y0, mpp, None)
    px, py, u = sc.jittered_points(s.seed + key + 1, x0 - 4, y0 - 4, x0 + span + 4,
                                   y0 + span + 4, 16.0, 0.3)
    if len(px):
        G = geometry(px, py)
        ok = G["b"] < half_um - 1.2
        if ok.any():
            rbc = np.zeros_like(nuc)
            qx, qy = _tile_px(px[ok], py[ok], x0, y0, mpp)
            sc.stamp_ellipses(rbc, qx, qy, 3.4 / mpp, 2.6 / mpp, u[ok] * 6.0, 1.0)
            cE += (C_RBC_E - cE) * rbc
            cH *= 1 - 0.8 * rbc


def _central_veins(s: LiverScene, x0, y0, span, X, Y, nuc, cE, cH) -> None:
    """Central vein lumina (thin wall, endothelium, a few red cells) in the tile."""
    mpp = s.mpp
    L = s.lobule_um
    i = np.arange(int(np.floor(x0 / L)) - 1, int(np.floor((x0 + span) / L)) + 2)
    j = np.arange(int(np.floor(y0 / L)) - 1, int(np.floor((y0 + span) / L)) + 2)
    ci, cj = (a.ravel() for a in np.meshgrid(i, j))
    cx, cy, cr = _cv_xy(s, ci, cj)
    cx, cy = _unwarp(_liver_warp(s), cx, cy)
    size = nuc.shape[0]
    for k in np.nonzero((cx + cr + 6 > x0) & (cx - cr - 6 < x0 + span)
                        & (cy + cr + 6 > y0) & (cy - cr - 6 < y0 + span))[0]:
        R = float(cr[k]) + 4.0
        win = window((cx[k] - R, cy[k] - R, cx[k] + R, cy[k] + R), x0, y0, mpp, size)
        if win is None:
            continue
        rs, cs = win
        d = np.hypot(X[:, cs] - cx[k], Y[rs, :] - cy[k])
        lumen = sc.smoothstep(cr[k] + 0.5, cr[k] - 0.5, d)
        wall = sc.smoothstep(cr[k] - 0.5, cr[k] + 0.3, d) * sc.smoothstep(cr[k] + 2.5,
                                                                           cr[k] + 1.5, d)
        rest = 1 - lumen - wall
        cE[rs, cs] = cE[rs, cs] * rest + 0.04 * lumen + C_WALL_E * wall
        cH[rs, cs] = cH[rs, cs] * rest + 0.02 * lumen + 0.08 * wall
        nuc[rs, cs] *= 1 - lumen
        orng = sc.object_rng(s.seed, 241, int(ci[k]), int(cj[k]))
        ex, ey, tang = sc.ring_points(orng, float(cx[k]), float(cy[k]), float(cr[k]),
                                      float(cr[k]), 0.0, 1.0 + 0.5 / float(cr[k]), 14.0,
                                      0.3, 0.25)
        _stamp_nuclei(nuc, ex, ey, 4.0, 1.2, tang, C_NUC_H, x0, y0, mpp, None)
        n_rbc = int(orng.integers(0, 12))
        if n_rbc:
            ang = orng.uniform(0, 2 * np.pi, n_rbc)
            rr = float(cr[k]) * np.sqrt(orng.uniform(0, 0.7, n_rbc))
            rbc = np.zeros_like(nuc)
            qx, qy = _tile_px(cx[k] + rr * np.cos(ang), cy[k] + rr * np.sin(ang), x0, y0, mpp)
            sc.stamp_ellipses(rbc, qx, qy, 3.6 / mpp, 3.2 / mpp, ang, 1.0)
            cE += (C_RBC_E - cE) * rbc * 0.9


def _pt_sites(s: LiverScene, x0, y0, x1, y1):
    """Portal tract sites in a box (um): lattice corners and about half of the edge
    midpoints of the central-vein lattice. Returns (x, y, kind, i, j) arrays."""
    L = s.lobule_um
    i = np.arange(int(np.floor(x0 / L)) - 1, int(np.floor(x1 / L)) + 2)
    j = np.arange(int(np.floor(y0 / L)) - 1, int(np.floor(y1 / L)) + 2)
    ii, jj = (a.ravel() for a in np.meshgrid(i, j))
    out = []
    for kind, (ox, oy, jit, keep) in enumerate(((0.0, 0.0, 0.28, 1.0), (0.5, 0.0, 0.14, 0.45),
                                                 (0.0, 0.5, 0.14, 0.45))):
        hx = sc.hash_uniform(s.seed + 251 + kind, ii, jj, 1) - 0.5
        hy = sc.hash_uniform(s.seed + 251 + kind, ii, jj, 2) - 0.5
        x = ((ii + ox + jit * hx) * L).astype(np.float32)
        y = ((jj + oy + jit * hy) * L).astype(np.float32)
        sel = (sc.hash_uniform(s.seed + 251 + kind, ii, jj, 3) < keep) & (x >= x0) \
            & (x < x1) & (y >= y0) & (y < y1)
        out.append((x[sel], y[sel], np.full(int(sel.sum()), kind), ii[sel], jj[sel]))
    return tuple(np.concatenate(c) for c in zip(*out, strict=True))


def _portal_tract(s: LiverScene, x: float, y: float, kind: int, i: int, j: int) -> dict:
    """Geometry of one portal tract (deterministic per site)."""
    orng = sc.object_rng(s.seed, 252, kind, i, j)
    R = float(orng.uniform(45.0, 125.0))
    blob = sc.random_blob(orng, float(x), float(y), R, float(orng.uniform(1.0, 1.8)), 0.12)
    a0 = orng.uniform(0, 2 * np.pi)

    def at(angle, frac):
        return float(x + np.cos(angle) * frac * R), float(y + np.sin(angle) * frac * R)

    rv = float(orng.uniform(0.18, 0.3)) * R
    vein = (*at(a0, 0.25), rv, rv * orng.uniform(0.5, 0.9), float(orng.uniform(0, np.pi)))
    ra = float(orng.uniform(5.0, 8.5))
    artery = (*at(a0 + np.pi + orng.uniform(-0.6, 0.6), 0.35), ra, ra * 0.9, 0.0)
    rd = float(orng.uniform(7.0, 12.0))
    duct = (*at(a0 + np.pi + orng.uniform(0.9, 1.6), 0.38), rd, rd * orng.uniform(0.75, 1.0),
            float(orng.uniform(0, np.pi)))
    return {"blob": blob, "vein": vein, "artery": artery, "duct": duct,
            "lym_keep": float(orng.uniform(0.2, 0.75)), "rng": orng}


def _portal_tracts(s: LiverScene, x0, y0, span, X, Y, nuc, cE, cH, tex) -> None:
    """Portal tracts: loose fibrous stroma, portal vein, hepatic artery, bile duct,
    lymphocytes."""
    mpp = s.mpp
    size = nuc.shape[0]
    xs, ys, kinds, ii, jj = _pt_sites(s, x0 - 210, y0 - 210, x0 + span + 210, y0 + span + 210)
    xs, ys = _unwarp(_liver_warp(s), xs, ys)
    for x, y, kind, i, j in zip(xs, ys, kinds, ii, jj, strict=True):
        pt = _portal_tract(s, x, y, int(kind), int(i), int(j))
        b = pt["blob"]
        R = b.radius_um + 2
        win = window((x - R, y - R, x + R, y + R), x0, y0, mpp, size)
        if win is None:
            continue
        rs, cs = win
        Xw, Yw = X[:, cs], Y[rs, :]
        cover = sc.smoothstep(-1.2, 1.0, b.sdf(Xw, Yw))
        fib = 0.8 + 0.3 * sc.value_noise(s.seed + 253, Xw, Yw * 0.4, 7.0)
        stroma_e = C_PORTAL_E * fib
        sub_e, sub_h, sub_n = cE[rs, cs], cH[rs, cs], nuc[rs, cs]
        sub_e += (stroma_e - sub_e) * cover
        sub_h += (C_PORTAL_H - sub_h) * cover
        sub_n *= 1 - cover
        nuclei = []
        excl = []
        # portal vein: thin wall, open lumen, a few red cells
        vx, vy, va, vb, vang = pt["vein"]
        rho = _ellipse_rho(Xw, Yw, vx, vy, va, vb, vang)
        lumen = sc.smoothstep(1.0, 0.96, rho) * cover
        wall = sc.smoothstep(0.96, 1.0, rho) * sc.smoothstep(1.0 + 2.5 / vb, 1.0 + 1.5 / vb,
                                                             rho) * cover
        sub_e += (0.04 - sub_e) * lumen + (C_WALL_E - sub_e) * wall
        sub_h += (0.02 - sub_h) * lumen
        ex, ey, tang = sc.ring_points(pt["rng"], vx, vy, va, vb, vang, 1.0, 16.0, 0.3, 0.3)
        nuclei.append((ex, ey, 4.0, 1.2, tang, C_NUC_H))
        excl.append((vx, vy, va + 2, vb + 2, vang))
        # hepatic artery: thick pink media with circumferential smooth-muscle nuclei
        ax_, ay, aa, ab, aang = pt["artery"]
        rho = _ellipse_rho(Xw, Yw, ax_, ay, aa, ab, aang)
        media = sc.smoothstep(0.4, 0.46, rho) * sc.smoothstep(1.04, 0.96, rho) * cover
        alum = sc.smoothstep(0.44, 0.38, rho) * cover
        sub_e += (1.0 - sub_e) * media + (0.05 - sub_e) * alum
        sub_h += (0.12 - sub_h) * media
        ex, ey, tang = sc.ring_points(pt["rng"], ax_, ay, aa, ab, aang, 0.72, 6.0, 0.3, 0.2)
        nuclei.append((ex, ey, 3.2, 1.1, tang, C_NUC_H * 0.95))
        excl.append((ax_, ay, aa + 2, ab + 2, aang))
        # bile duct: cuboidal epithelium round a small lumen
        dx_, dy_, da, db, dang = pt["duct"]
        rho = _ellipse_rho(Xw, Yw, dx_, dy_, da, db, dang)
        epi = sc.smoothstep(0.36, 0.42, rho) * sc.smoothstep(1.04, 0.96, rho) * cover
        dlum = sc.smoothstep(0.4, 0.34, rho) * cover
        sub_e += (C_EPI_E - sub_e) * epi + (0.05 - sub_e) * dlum
        sub_h += (C_EPI_H - sub_h) * epi + (0.02 - sub_h) * dlum
        ex, ey, tang = sc.ring_points(pt["rng"], dx_, dy_, da, db, dang, 0.7, 5.6, 0.15, 0.05)
        nuclei.append((ex, ey, 2.6, 2.2, tang, C_NUC_H))
        excl.append((dx_, dy_, da + 2, db + 2, dang))
        for ex, ey, ra, rb, ang, amp in nuclei:
            _stamp_nuclei(nuc, ex, ey, ra, rb, ang, amp, x0, y0, mpp, None)
        # lymphocytes and fibroblasts in the stroma
        lx, ly, lu = sc.jittered_points(s.seed + 254, x - R, y - R, x + R, y + R, 8.5, 1.0)
        ok = b.sdf(lx, ly) > 3.0
        for cx_, cy_, ea, eb, eang in excl:
            ok &= _ellipse_rho(lx, ly, cx_, cy_, ea + 3, eb + 3, eang) > 1.0
        lym = ok & (lu < pt["lym_keep"])
        fibro = ok & (lu > 0.9)
        _stamp_nuclei(nuc, lx[lym], ly[lym], 3.0 + 0.4 * lu[lym], 2.7 + 0.3 * lu[lym],
                      lu[lym] * 6.0, C_LYM_H, x0, y0, mpp, None)
        _stamp_nuclei(nuc, lx[fibro], ly[fibro], 4.5, 1.3, lu[fibro] * 60.0, C_NUC_H,
                      x0, y0, mpp, None)


# ----------------------------------------------------------------------------- HCC


def _hcc_frame(s: LiverScene, Xw, Yw):
    """Rotate warped coordinates into the trabecular frame (um)."""
    c, sn = np.float32(np.cos(s.trabecula_angle)), np.float32(np.sin(s.trabecula_angle))
    return Xw * c + Yw * sn, Yw * c - Xw * sn


def _trabeculae(s: LiverScene, Xw, Yw) -> dict:
    """Trabecula geometry at warped points: b (um to the sinusoid centre line), ex, ey."""
    U, V = _hcc_frame(s, Xw, Yw)
    g = s.trabecula_um
    T = _voronoi(s.seed + 303, U, V, g * 1.7, g, 0.4)
    eu, ev = T["f2u"] - T["f1u"], T["f2v"] - T["f1v"]
    c, sn = np.cos(s.trabecula_angle), np.sin(s.trabecula_angle)
    return {"b": T["b"], "ex": eu * c - ev * sn, "ey": eu * sn + ev * c}


HCC_SINUS_HALF_UM = 4.5


def _hcc(s: LiverScene, x0_px, y0_px, size, X, Y, rng, tex, nuc, vac):
    """Thick trabeculae of atypical hepatocyte-like cells. Returns (cH, cE)."""
    mpp = s.mpp
    x0, y0 = x0_px * mpp, y0_px * mpp
    span = size * mpp
    warp_at = _warp_fn(s, 301, 14.0, 140.0)
    Xc, Yc, f = _coarse_grid(s, x0_px, y0_px, size)
    dwx, dwy = warp_at(Xc, Yc)
    Xw, Yw = Xc + dwx, Yc + dwy
    T = _trabeculae(s, Xw, Yw)
    sinus = sc.smoothstep(HCC_SINUS_HALF_UM + 0.6, HCC_SINUS_HALF_UM - 0.4, _up(T["b"], f))
    gc = s.hcc_cell_um
    C = _voronoi(s.seed + 305, Xw, Yw, gc, gc, 0.38)
    memb = sc.smoothstep(0.9, 0.3, _up(C["b"], f))
    gran = 1.0 + 0.18 * sc.bank_window(rng, (size, size))
    # regional variation: clearer or more eosinophilic groups of cells
    clear = 1.0 + 0.12 * sc.tile_noise(s.seed + 306, x0_px, y0_px, size,
                                        sc.pow2_cell(200.0, mpp, size))
    keep = 1.0 - sinus
    cE = C_HCC_E * gran * clear * (1.0 + 0.25 * memb) * keep + C_SINUS_E * sinus
    cH = C_HCC_H * gran * keep + C_SINUS_H * sinus

    # pseudo-glands: small lumina inside trabeculae, ringed by radially arranged cells
    gx, gy, gu, gi, gj = _box_points(s.seed + 311, x0 - 40, y0 - 40, x0 + span + 40,
                                     y0 + span + 40, 150.0, 150.0, 0.35)
    glands = np.zeros((0, 5), np.float32)
    if len(gx):
        gr = 5.0 + 7.0 * sc.hash_uniform(s.seed + 312, gi, gj)
        ok = (gu < s.pseudo_glands) & (_trabeculae(s, gx, gy)["b"] > gr + 12.0)
        glands = np.stack([gx[ok], gy[ok], gr[ok], gi[ok], gj[ok]], 1)
    pg = np.zeros((size, size), np.float32)
    for gxk, gyk, grk, gik, gjk in glands:
        win = window((gxk - grk - 20, gyk - grk - 20, gxk + grk + 20, gyk + grk + 20),
                      x0, y0, mpp, size)
        if win is None:
            continue
        rs, cs = win
        cgx, cgy = _unwarp(warp_at, np.float32(gxk), np.float32(gyk))
        d = np.hypot(X[:, cs] - cgx, Y[rs, :] - cgy)
        pg[rs, cs] = np.maximum(pg[rs, cs], sc.smoothstep(grk + 0.6, grk - 0.6, d))
        orng = sc.object_rng(s.seed, 313, int(gik), int(gjk))
        ex, ey, tang = sc.ring_points(orng, float(gxk), float(gyk), float(grk), float(grk),
                                      0.0, 1.0 + 7.0 / float(grk), 11.0, 0.2, 0.05)
        ex, ey = _unwarp(warp_at, ex, ey)
        _stamp_nuclei(nuc, ex, ey, 5.5, 3.6, tang + np.pi / 2, C_HCC_NUC_H,
                      x0, y0, mpp, tex, nucleolus=1.0)
    if pg.any():
        cE += (0.25 - cE) * pg
        cH += (0.03 - cH) * pg

    # one nucleus per tumour cell: large, pleomorphic, hyperchromatic, big nucleolus
    fx, fy, fu, fi, fj = _box_points(s.seed + 305, x0 - 12, y0 - 12, x0 + span + 12,
                                     y0 + span + 12, gc, gc, 0.38)
    if len(fx):
        ok = _trabeculae(s, fx, fy)["b"] > HCC_SINUS_HALF_UM + 4.0
        for gxk, gyk, grk, _, _ in glands:
            ok &= np.hypot(fx - gxk, fy - gyk) > grk + 11.0
        q = sc.hash_uniform(s.seed + 307, fi[:, None], fj[:, None], np.arange(5)[None, :])
        ok &= q[:, 0] > 0.06
        fx, fy, q = fx[ok], fy[ok], q[ok]
        fx, fy = _unwarp(warp_at, fx, fy)
        big = q[:, 1] < 0.08  # occasional giant nuclei
        ra = np.where(big, 8.0, 5.2) + 2.0 * q[:, 2]
        rb = ra * (0.72 + 0.28 * q[:, 3])
        amp = C_HCC_NUC_H * (0.85 + 0.3 * q[:, 4])
        _stamp_nuclei(nuc, fx, fy, ra, rb, q[:, 2] * 6.3, amp, x0, y0, mpp, tex,
                      nucleolus=1.25)
        steat = q[:, 0] < 0.06 + s.steatosis * 0.5
        if steat.any():
            vpx, vpy = _tile_px(fx[steat] + 6, fy[steat], x0, y0, mpp)
            sc.stamp_ellipses(vac, vpx, vpy, 6.0 / mpp, 5.5 / mpp, 0.0, 1.0)

    def geometry(x, y):
        dx, dy = warp_at(x, y)
        return _trabeculae(s, x + dx, y + dy)

    _sinusoid_cells(s, x0, y0, span, nuc, cE, cH, geometry, HCC_SINUS_HALF_UM, 20.0, 620)
    return cH.astype(np.float32), cE.astype(np.float32)


# ----------------------------------------------------------------------------- CCA


FIBRE_DIRECTIONS = 3


def _fibre_weights(s: LiverScene, X, Y) -> np.ndarray:
    """(FIBRE_DIRECTIONS, ...) weights (sum 1) of the stroma's fibre directions at points:
    domains ~200 um across in which the fibres run one way, blending smoothly."""
    w = np.stack([np.exp(2.5 * sc.value_noise(s.seed + 326 + k, X, Y, 220.0))
                  for k in range(FIBRE_DIRECTIONS)])
    return w / w.sum(0)


def _fibre_angles(s: LiverScene) -> np.ndarray:
    return np.pi * sc.hash_uniform(s.seed + 327, np.arange(FIBRE_DIRECTIONS))


def _desmoplastic(s: LiverScene, x0_px, y0_px, size, rng):
    """Pale desmoplastic stroma: wavy collagen fibres and clefts. Returns (cH, cE)."""
    Xc, Yc, f = _coarse_grid(s, x0_px, y0_px, size)
    wts = _fibre_weights(s, Xc, Yc)
    wave = 6.0 * sc.value_noise(s.seed + 328, Xc, Yc, 60.0)
    n = np.zeros(Xc.shape, np.float32)
    for k, ang in enumerate(_fibre_angles(s)):
        c, sn = np.float32(np.cos(ang)), np.float32(np.sin(ang))
        u = Xc * c + Yc * sn
        v = Yc * c - Xc * sn + wave
        n += wts[k] * sc.value_noise(s.seed + 329 + k, u * np.float32(0.1), v, 3.5)
    n = _up(n, f)
    clefts = sc.smoothstep(0.16, 0.0, np.abs(n))
    grain = 1.0 + 0.12 * sc.bank_window(rng, (size, size))
    dens = 0.85 + 0.25 * sc.tile_noise(s.seed + 324, x0_px, y0_px, size,
                                       sc.pow2_cell(90.0, s.mpp, size))
    cE = C_DESMO_E * dens * (1.0 + 0.35 * n) * (1.0 - 0.55 * clefts) * grain
    cH = C_DESMO_H * grain
    return cH.astype(np.float32), cE.astype(np.float32)


def _gland(s: LiverScene, i: int, j: int, x: float, y: float, r_max: float) -> dict:
    """Geometry of one CCA gland (deterministic per lattice cell)."""
    orng = sc.object_rng(s.seed, 331, i, j)
    kind = orng.random()
    if kind < 0.15:  # small compressed duct / cord with a slit lumen
        R, asp, epi = orng.uniform(8.0, 14.0), orng.uniform(2.0, 3.5), orng.uniform(5.5, 7.5)
    elif kind < 0.3:  # dilated gland, flatter epithelium
        R, asp, epi = orng.uniform(32.0, 55.0), orng.uniform(1.0, 1.5), orng.uniform(8.0, 11.0)
    else:  # tubular gland
        R, asp, epi = orng.uniform(18.0, 45.0), orng.uniform(1.0, 2.2), orng.uniform(10.0, 16.0)
    R = min(R, r_max / np.sqrt(asp) / 1.1)
    epi = min(epi, 0.75 * R)
    blob = sc.random_blob(orng, x, y, R, asp, 0.16)
    return {"blob": blob, "epi": float(epi), "mucin": bool(orng.random() < 0.3),
            "rng": orng}


def _cca(s: LiverScene, x0_px, y0_px, size, X, Y, rng, tex, nuc):
    """Irregular glands in desmoplastic stroma. Returns (cH, cE)."""
    mpp = s.mpp
    x0, y0 = x0_px * mpp, y0_px * mpp
    span = size * mpp
    cH, cE = _desmoplastic(s, x0_px, y0_px, size, rng)
    # fibroblasts along the fibres, a few lymphocytes
    px, py, u = sc.jittered_points(s.seed + 325, x0 - 8, y0 - 8, x0 + span + 8,
                                   y0 + span + 8, 16.0, 0.4)
    if len(px):
        wts = _fibre_weights(s, px, py)
        ang = _fibre_angles(s)[np.argmax(wts, axis=0)] + (u - 0.5) * 0.6
        lym = u < 0.12
        _stamp_nuclei(nuc, px[~lym], py[~lym], 4.0 + 2.5 * u[~lym], 1.2 + 0.4 * u[~lym],
                      ang[~lym], C_NUC_H * 0.95, x0, y0, mpp, None)
        _stamp_nuclei(nuc, px[lym], py[lym], 3.0, 2.8, 0.0, C_LYM_H, x0, y0, mpp, tex)
    G = GLAND_SPACING_UM
    gx, gy, gu, gi, gj = _box_points(s.seed + 330, x0 - 2 * G, y0 - 2 * G, x0 + span + 2 * G,
                                     y0 + span + 2 * G, G, G, 0.3)
    if not len(gx):
        return cH, cE
    # keep the glands whose centre lies in the tumour; radius bounded by the neighbours
    F = macro_fields(s, gx, gy)
    # sclerotic, gland-poor centre; glands crowd at the invasive edge
    keep = s.gland_keep * (1.0 - 0.5 * sc.smoothstep(150.0, 700.0, F["tumour"]))
    sel = (gu < keep) & (F["tumour"] > 0) & (F["tissue"] > 0)
    nn = np.full(len(gx), 2 * G, np.float32)
    for k in np.nonzero(sel)[0]:
        d = np.hypot(gx[sel] - gx[k], gy[sel] - gy[k])
        d = d[d > 0]
        if len(d):
            nn[k] = d.min()
    size_ = nuc.shape[0]
    for k in np.nonzero(sel)[0]:
        gl = _gland(s, int(gi[k]), int(gj[k]), float(gx[k]), float(gy[k]), 0.5 * nn[k] - 4)
        b = gl["blob"]
        R = b.radius_um + 2
        win = window((gx[k] - R, gy[k] - R, gx[k] + R, gy[k] + R), x0, y0, mpp, size_)
        if win is None:
            continue
        rs, cs = win
        sdf = b.sdf(X[:, cs], Y[rs, :])
        cover = sc.smoothstep(-0.8, 0.8, sdf)
        lumen = sc.smoothstep(gl["epi"] - 0.6, gl["epi"] + 0.6, sdf)
        epi = cover - lumen
        grain = 1.0 + 0.15 * sc.bank_window(rng, epi.shape)
        le, lh = (C_MUCIN_E, C_MUCIN_H) if gl["mucin"] else (0.04, 0.02)
        sub_e, sub_h = cE[rs, cs], cH[rs, cs]
        sub_e += (C_EPI_E * grain - sub_e) * epi + (le - sub_e) * lumen
        sub_h += (C_EPI_H * grain - sub_h) * epi + (lh - sub_h) * lumen
        nuc[rs, cs] *= 1 - cover
        ex, ey, nang = _blob_ring(b, gl["epi"] * 0.38, 6.2, gl["rng"])
        n = len(ex)
        q = gl["rng"].random((3, n))
        keep = q[0] > 0.08
        ra = (3.6 + 1.4 * q[1]) * (1.0 + 0.25 * (gl["epi"] > 11.0))
        _stamp_nuclei(nuc, ex[keep], ey[keep], ra[keep], 2.3 + 0.6 * q[2][keep], nang[keep],
                      C_NUC_H * (0.85 + 0.3 * q[2][keep]), x0, y0, mpp, tex)
    return cH, cE


# ----------------------------------------------------------------------------- rendering


def render_tile(s: LiverScene, x0_px: int, y0_px: int, size: int) -> np.ndarray | None:
    """RGB uint8 (size, size, 3) of the tile at level-0 pixel (x0_px, y0_px); None = glass."""
    return render_tissue_tile(s, s.frag_index, 3, macro_fields, _paint_tissue, x0_px, y0_px,
                              size)


def _paint_tissue(s: LiverScene, F, x0_px, y0_px, size, X, Y, rng, cH, cE):
    """Fill stain concentrations of non-tumour liver and tumour into cH, cE (in place)."""
    tum = F["tumour"] > 0
    normal = ~tum
    nuc = np.zeros((size, size), np.float32)
    vac = np.zeros((size, size), np.float32)
    tex = 0.8 + 0.25 * np.clip(sc.bank_window(rng, (size, size)), -1.5, 1.5)
    if normal.any():
        h, e = _normal_liver(s, x0_px, y0_px, size, X, Y, rng, tex, nuc, vac)
        cH[normal] = h[normal]
        cE[normal] = e[normal]
    if tum.any():
        tnuc = np.zeros((size, size), np.float32)
        tvac = np.zeros((size, size), np.float32)
        if s.tumour_value == TUMOUR_VALUE["HCC"]:
            h, e = _hcc(s, x0_px, y0_px, size, X, Y, rng, tex, tnuc, tvac)
        else:
            h, e = _cca(s, x0_px, y0_px, size, X, Y, rng, tex, tnuc)
        cH[tum] = h[tum]
        cE[tum] = e[tum]
        nuc[tum] = tnuc[tum]
        vac[tum] = tvac[tum]
        if s.capsule_um > 0 and s.tumour_value == TUMOUR_VALUE["HCC"]:
            _capsule(s, F["tumour"], x0_px, y0_px, size, cH, cE, nuc)
    cE += (0.03 - cE) * vac
    cH += (0.02 - cH) * vac
    nuc *= 1 - vac
    cE *= 1.0 - 0.35 * np.clip(nuc, 0, 1)
    np.maximum(cH, nuc, out=cH)


def _capsule(s: LiverScene, tumour, x0_px, y0_px, size, cH, cE, nuc) -> None:
    """Fibrous capsule just inside the HCC boundary, with spindle fibroblasts along it."""
    band = sc.smoothstep(0.0, 1.0, tumour) * sc.smoothstep(s.capsule_um + 1.0,
                                                           s.capsule_um - 1.0, tumour)
    if band.max() <= 0:
        return
    mpp = s.mpp
    streak = 0.85 + 0.25 * sc.tile_noise(s.seed + 341, x0_px, y0_px, size,
                                         sc.pow2_cell(12.0, mpp, size))
    cE += (C_CAPSULE_E * streak - cE) * band
    cH += (C_CAPSULE_H - cH) * band
    nuc *= 1 - band
    x0, y0 = x0_px * mpp, y0_px * mpp
    px, py, u = sc.jittered_points(s.seed + 342, x0, y0, x0 + size * mpp, y0 + size * mpp,
                                   14.0, 0.6)
    if not len(px):
        return
    ii = np.clip(((py - y0) / mpp).astype(np.int64), 1, size - 2)
    jj = np.clip(((px - x0) / mpp).astype(np.int64), 1, size - 2)
    inside = band[ii, jj] > 0.5
    if not inside.any():
        return
    gy = tumour[ii + 1, jj] - tumour[ii - 1, jj]
    gx = tumour[ii, jj + 1] - tumour[ii, jj - 1]
    ang = np.arctan2(gy, gx) + np.pi / 2 + (u - 0.5) * 0.4
    _stamp_nuclei(nuc, px[inside], py[inside], 4.5 + 2.0 * u[inside], 1.2, ang[inside],
                  C_NUC_H, x0, y0, mpp, None)


# ----------------------------------------------------------------------------- scene build


def _grid(s: LiverScene, n_target: int = 40000):
    """A regular grid over the slide (um) and its macro fields: (gx, gy, step, F)."""
    W, H = s.width_um, s.height_um
    step = max(float(np.sqrt(W * H / n_target)), 2.0)
    gx, gy = np.meshgrid(np.arange(step / 2, W, step, dtype=np.float32),
                         np.arange(step / 2, H, step, dtype=np.float32))
    return gx, gy, step, macro_fields(s, gx, gy)


def _tissue_piece(rng, W: float, H: float) -> sc.Blob:
    """One resection piece: a lobulated blob covering ~50-68 % of the slide, inside it."""
    frac = rng.uniform(0.5, 0.68)
    asp = W / H
    a = np.sqrt(frac * W * H / np.pi * asp)
    b = np.sqrt(frac * W * H / np.pi / asp)
    blob = sc.random_blob(rng, W / 2 + rng.uniform(-0.03, 0.03) * W,
                          H / 2 + rng.uniform(-0.03, 0.03) * H, 1.0, 1.0, 0.05)
    blob.a_um, blob.b_um = float(a), float(b)
    blob.angle = float(rng.normal(0, 0.06))
    grow = 1.0 + float(np.abs(blob.amps).sum())
    fit = min(1.0, 0.47 * W / (a * grow), 0.47 * H / (b * grow))
    blob.a_um *= fit
    blob.b_um *= fit
    return blob


def build(task: str, seed: int, width_px: int, height_px: int, mpp: float,
          label: str | None, pen: bool, fold: bool) -> LiverScene:
    """Build a liver scene. `label`: 'HCC', 'CCA' or None (drawn from the seed)."""
    rng = np.random.default_rng([seed, 2203])
    stains = sc.perturbed_stains(rng, sc.HE_VECTORS, ("hematoxylin", "eosin"))
    if label is None:
        label = "HCC" if rng.random() < 0.5 else "CCA"
    if label not in TUMOUR_VALUE:
        raise UsageError(f"label {label!r} is not valid for task liver; choose HCC or CCA")
    W, H = width_px * mpp, height_px * mpp
    hcc = label == "HCC"
    s = LiverScene(
        task=task, seed=int(seed), width_px=int(width_px), height_px=int(height_px),
        mpp=float(mpp), stains=stains, label=label, tumour_value=TUMOUR_VALUE[label],
        lobule_um=float(rng.uniform(820.0, 1100.0)),
        trabecula_um=float(rng.uniform(75.0, 120.0)),
        trabecula_angle=float(rng.uniform(0, np.pi)),
        hcc_cell_um=float(rng.uniform(24.0, 29.0)),
        capsule_um=float(rng.uniform(12.0, 35.0)) if rng.random() < 0.7 else 0.0,
        steatosis=float(rng.uniform(0.03, 0.2)) if rng.random() < 0.35 else 0.0,
        gland_keep=float(rng.uniform(0.7, 0.92)),
        target_fraction=float(rng.uniform(*TUMOUR_FRACTION)),
        tumour_noise=(8.0, 250.0, 3.0, 60.0) if hcc else (30.0, 180.0, 12.0, 45.0),
    )
    s.pseudo_glands = float(rng.uniform(0.1, 0.5))
    piece = _tissue_piece(rng, W, H)
    s.fragments = [piece]
    s.frag_index = sc.SpatialIndex(2000.0)
    r = piece.radius_um * 1.05 + 60
    s.frag_index.insert(0, piece.x_um - r, piece.y_um - r, piece.x_um + r, piece.y_um + r)

    # tumour nodules: sized for the target fraction, then thresholded at its quantile
    gx, gy, step, F = _grid(s)
    tissue = F["tissue"] > 0
    tissue_um2 = float(tissue.sum()) * step * step
    n = int(rng.integers(1, 4)) if hcc else int(rng.integers(1, 3))
    wts = rng.uniform(0.5, 1.5, n)
    radii = np.sqrt(s.target_fraction * tissue_um2 * wts / wts.sum() / np.pi)
    tx, ty, td = gx[tissue], gy[tissue], F["tissue"][tissue]
    nodules = []
    for r_i in radii:
        ok = td > 0.3 * r_i
        cand = np.nonzero(ok if ok.any() else td >= td.max())[0]
        best = None
        for _ in range(30):  # prefer spots away from the nodules already placed
            k = int(cand[rng.integers(len(cand))])
            gap = min((np.hypot(tx[k] - b.x_um, ty[k] - b.y_um) - b.radius_um for b in nodules),
                      default=1e9)
            if best is None or gap > best[0]:
                best = (gap, k)
            if gap > r_i:
                break
        k = best[1]
        asp = rng.uniform(1.0, 1.5) if hcc else rng.uniform(1.2, 2.0)
        nodules.append(sc.random_blob(rng, float(tx[k]), float(ty[k]), float(r_i), asp,
                                      0.06 if hcc else 0.15))
    s.nodules = nodules
    s.tumour_thr_um = 0.0
    T = macro_fields(s, tx, ty)["tumour"]
    s.tumour_thr_um = float(np.quantile(T, 1.0 - s.target_fraction)) if len(T) else 0.0

    # artefacts
    if pen:
        s.pen = _pen_near_edge(rng, piece, W, H)
    if fold:
        s.fold = sc.random_fold(rng, piece)
    s.dust = sc.random_dust(rng, W, H)

    # landmarks in the non-tumour liver (central veins, portal tracts)
    L = s.lobule_um
    i = np.arange(-1, int(W / L) + 2)
    j = np.arange(-1, int(H / L) + 2)
    ci, cj = (a.ravel() for a in np.meshgrid(i, j))
    cx, cy = _unwarp(_liver_warp(s), *_cv_xy(s, ci, cj)[:2])
    px, py = _unwarp(_liver_warp(s), *_pt_sites(s, -200.0, -200.0, W + 200, H + 200)[:2])

    def in_liver(x, y):
        if not len(x):
            return np.zeros((0, 2), np.float32)
        inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
        G = macro_fields(s, x, y)
        ok = inside & (G["tissue"] > 0) & (G["tumour"] <= 0)
        return np.stack([x[ok], y[ok]], 1).astype(np.float32)

    s.cv_xy = in_liver(cx, cy)
    s.pt_xy = in_liver(px, py)
    s.options = {
        "tumour_fraction_target": round(s.target_fraction, 4),
        "tumour_threshold_um": round(s.tumour_thr_um, 3),
        "lobule_um": round(s.lobule_um, 1), "trabecula_um": round(s.trabecula_um, 1),
        "hcc_cell_um": round(s.hcc_cell_um, 2), "capsule_um": round(s.capsule_um, 1),
        "steatosis": round(s.steatosis, 3), "pseudo_glands": round(s.pseudo_glands, 3),
        "gland_keep": round(s.gland_keep, 3),
    }
    return s


def _pen_near_edge(rng, b: sc.Blob, W: float, H: float) -> sc.PenStroke:
    """A pen stroke along the tissue edge (walk out from the centre to the boundary)."""
    ang = rng.uniform(0, 2 * np.pi)
    px_, py_ = b.x_um, b.y_um
    for _ in range(64):
        for t in np.linspace(0, 1.2, 80):
            px_ = b.x_um + np.cos(ang) * b.radius_um * t
            py_ = b.y_um + np.sin(ang) * b.radius_um * t
            if b.sdf(np.float32(px_), np.float32(py_)) < 0:
                break
        if 0 < px_ < W and 0 < py_ < H:
            break
        ang = rng.uniform(0, 2 * np.pi)
    return sc.random_pen(rng, W, H, (float(px_), float(py_)), float(ang))


# ----------------------------------------------------------------------------- truth


def truth(s: LiverScene, areas: dict) -> dict:
    """Task part of truth.json from the scene and label-mask areas (mm2 by legend name)."""
    hcc = areas.get("hcc", 0.0)
    cca = areas.get("cca", 0.0)
    non = areas.get("non_tumour", 0.0)
    tissue = non + hcc + cca
    tumour = hcc + cca
    r = hcc / tumour if tumour > 0 else None
    kind = "hcc_nodule" if s.tumour_value == TUMOUR_VALUE["HCC"] else "cca_mass"
    objects = [{"type": kind, "x_um": round(b.x_um, 2), "y_um": round(b.y_um, 2),
                "semi_axes_um": [round(b.a_um, 2), round(b.b_um, 2)],
                "angle_rad": round(b.angle, 4)} for b in s.nodules]
    return {
        "diagnosis": {"label": s.label, "adequate": bool(tumour > 0)},
        "scores": {"hcc_fraction": round(r, 5) if r is not None else None,
                   "tumour_fraction": round(tumour / tissue, 5) if tissue > 0 else 0.0},
        "counts": {"tumour_nodules": len(s.nodules), "central_veins": len(s.cv_xy),
                   "portal_tracts": len(s.pt_xy), "fragments": len(s.fragments)},
        "areas_mm2": {"tissue": round(tissue, 5), "non_tumour": round(non, 5),
                      "hcc": round(hcc, 5), "cca": round(cca, 5), "tumour": round(tumour, 5),
                      "pen": round(areas.get("pen", 0.0), 5)},
        "objects": objects,
    }


def arrays(s: LiverScene) -> dict:
    """Central vein and portal tract centres (um) in the non-tumour liver, for the zarr."""
    cols = {"units": "um", "columns": ["x_um", "y_um"]}
    return {
        "central_veins": (s.cv_xy, {**cols, "description": "central vein centres"}),
        "portal_tracts": (s.pt_xy, {**cols, "description": "portal tract centres"}),
    }


SPEC = SynthSpec(
    name="liver", legend=LEGEND, labels=("HCC", "CCA"), default_size_px=(8000, 6000),
    default_mpp=0.5, build=build, render_tile=render_tile, label_tile=label_tile,
    truth=truth, arrays=arrays, tissue_classes=TISSUE_CLASSES,
)


# ----------------------------------------------------------------------------- cohorts

COHORT_SIZE_PX = (4096, 3072)  # default slide size of cohort patients (2 x 1.5 mm at 0.5)
COHORT_COLUMNS = ("patient_id", "slide", "diagnosis", "annotated")


def _cohort_plan(patients: int, annotated: int, seed: int,
                 slides_per_patient: tuple[int, int]):
    """Diagnoses (balanced HCC/CCA), annotated flags (balanced too) and slide counts."""
    rng = np.random.default_rng([seed, 7001])
    first = "HCC" if rng.random() < 0.5 else "CCA"
    other = "CCA" if first == "HCC" else "HCC"
    diagnoses = [first if k % 2 == 0 else other for k in range(patients)]
    diagnoses = [diagnoses[k] for k in rng.permutation(patients)]
    by_dx = {d: [k for k in range(patients) if diagnoses[k] == d] for d in ("HCC", "CCA")}
    want = {"HCC": annotated // 2, "CCA": annotated // 2}
    if annotated % 2:
        want[first] += 1
    for d, o in (("HCC", "CCA"), ("CCA", "HCC")):  # a short group hands its share over
        spare = want[d] - len(by_dx[d])
        if spare > 0:
            want[d] -= spare
            want[o] += spare
    chosen = set()
    for d in ("HCC", "CCA"):
        chosen.update(rng.permutation(by_dx[d])[:want[d]].tolist())
    lo, hi = slides_per_patient
    n_slides = rng.integers(lo, hi + 1, patients)
    return diagnoses, [k in chosen for k in range(patients)], [int(n) for n in n_slides]


def write_liver_cohort(folder: str | os.PathLike, patients: int, annotated: int,
                       seed: int = 0, width: int | None = None, height: int | None = None,
                       slides_per_patient: tuple[int, int] = (1, 2), *,
                       mpp: float | None = None, workers: int | None = None,
                       progress=None, randomise: bool = False) -> list[dict]:
    """Write a synthetic liver cohort; return the rows of FOLDER/cohort.csv.

    `patients` patients, half HCC and half CCA (one diagnosis for all of a patient's
    slides), each with 1-2 slides (`slides_per_patient`, inclusive) of `width` x `height`
    px (default `COHORT_SIZE_PX`) at `mpp` um/px (default 0.5), written as
    FOLDER/<patient_id>/<patient_id>_<n>.svs. `annotated` patients (balanced between the
    diagnoses) keep the label mask `<stem>.truth.zarr`; the others are weakly labelled:
    diagnosis and areas only. Every slide has `<stem>.truth.json` with "annotated" and
    "patient_id" added. Slide seeds derive from `seed`; the same arguments give the same
    files. randomise: domain-randomised slides (`synth.randomise`), each from its own seed.
    cohort.csv columns: patient_id, slide (path relative to FOLDER), diagnosis,
    annotated (1/0).
    """
    patients, annotated = int(patients), int(annotated)
    if patients < 1:
        raise UsageError(f"a cohort needs at least 1 patient, not {patients}")
    if not 0 <= annotated <= patients:
        raise UsageError(f"annotated patients must be between 0 and {patients}, "
                         f"not {annotated}")
    lo, hi = (int(v) for v in slides_per_patient)
    if not 1 <= lo <= hi:
        raise UsageError(f"slides per patient {slides_per_patient} must be 1 <= lo <= hi")
    folder = Path(folder)
    if folder.suffix.lower() in (".svs", ".tif", ".tiff"):
        raise UsageError(f"a cohort is written into a folder, not a slide file: {folder}")
    csv_path = folder / "cohort.csv"
    check_writable(csv_path)
    width = int(width or COHORT_SIZE_PX[0])
    height = int(height or COHORT_SIZE_PX[1])
    diagnoses, flags, n_slides = _cohort_plan(patients, annotated, int(seed), (lo, hi))
    digits = max(3, len(str(patients)))
    rows = []
    for p, (dx, ann, n) in enumerate(zip(diagnoses, flags, n_slides, strict=True)):
        pid = f"P{p + 1:0{digits}d}"
        for j in range(n):
            path = folder / pid / f"{pid}_{j + 1}.svs"
            slide_seed = int(sc.hash_u32(int(seed), 7002, p, j).reshape(-1)[0]) & 0x7FFFFFFF
            truth_ = write_spec_slide(SPEC, path, width=width, height=height, mpp=mpp,
                                      seed=slide_seed, label=dx, workers=workers,
                                      progress=progress, randomise=randomise)
            json_path, zarr_path = truth_paths(path)
            if not ann:  # weakly labelled: the diagnosis and areas, no label mask
                shutil.rmtree(zarr_path, ignore_errors=True)
                truth_["generator"]["truth_zarr"] = None
            truth_["annotated"] = bool(ann)
            truth_["patient_id"] = pid
            json_path.write_text(json.dumps(truth_, indent=1))
            rows.append({"patient_id": pid, "slide": path.relative_to(folder).as_posix(),
                         "diagnosis": dx, "annotated": int(ann)})
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COHORT_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return rows
