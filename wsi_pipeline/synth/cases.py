"""Synthetic glomerular-dx cases: a PAS biopsy WSI, an immunofluorescence image, a TEM bag.

A case folder (docs/design.md "glomerular-dx case folder")::

    case/om/<case>.svs          PAS light-microscopy biopsy (Aperio SVS, kidney.CASE_OM_SPEC)
    case/om/<case>.truth.json   its truth (write_slide format) and <case>.truth.zarr
    case/im/if.png              one glomerulus under immunofluorescence (512 x 512 RGB)
    case/tem/tem_XX.{png,tif,jpg}  3-15 greyscale TEM images of mixed sizes and formats
    case/truth.json             diagnosis, weak flags, TEM bag facts, glomeruli, generator

Classes IgAN, MN, LN [standard, docs/models.md §2]:

- OM: IgAN mesangial hypercellularity and matrix expansion; MN thick PAS-bright capillary
  walls; LN both ("wire loops"), see `kidney.CASE_*`.
- IF (FITC, green): IgAN coarse granular deposits in the mesangial stalks (centre of the
  tuft); MN fine granular deposits outlining the capillary loops (periphery of the
  lobules); LN both, brighter ("full house").
- TEM (`TEM_NM_PER_PX` nm/px): a capillary loop segment (light lumen, fenestrated
  endothelium, dark-grey GBM 300-500 nm, podocyte foot processes on the urinary side) and,
  often, a mesangial region on the lumen side. Electron-dense deposits (near black): IgAN
  mesangial; MN subepithelial humps along the GBM with GBM spikes between them and
  effaced foot processes; LN subendothelial, subepithelial and mesangial.

Difficulty [choice]: each modality is "weak" in a case with probability `WEAK_PROBABILITY`
(independently): OM near-normal glomeruli, IF dim, noisy and less specific, TEM deposits
scarce. A fraction `TEM_UNINFORMATIVE` of each TEM bag (at least one image informative)
shows tubule/interstitium or a badly out-of-focus loop, with no deposits, so that picking
instances (SMIL) matters. The flags are in truth.json.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import OutputNotWritable, UsageError
from ..version import __version__
from . import kidney
from . import scene as sc
from .writer import GENERATOR_VERSION, write_spec_slide

TASK = "glomerular-dx"
CLASSES = kidney.CASE_LABELS  # ("IgAN", "MN", "LN")
WEAK_PROBABILITY = {"om": 0.2, "im": 0.2, "tem": 0.2}  # per modality, independent [choice]
IF_SIZE_PX = 512
TEM_NM_PER_PX = 10.0  # a 384-768 px image covers 3.8-7.7 um
TEM_GBM_NM = (300.0, 500.0)
TEM_BAG_SIZE = (3, 15)
TEM_SIDE_PX = (384, 768)
TEM_FORMATS = ("png", "tif", "jpg")
TEM_UNINFORMATIVE = (0.15, 0.4)  # fraction range of uninformative images per bag [choice]
TEM_JPEG_QUALITY = 90
SITES = {1: "mesangial", 2: "subepithelial", 3: "subendothelial"}


def _check_label(label: str | None) -> None:
    if label is not None and label not in CLASSES:
        raise UsageError(f"label {label!r} is not valid for task {TASK}; choose one of "
                         f"{', '.join(CLASSES)}")


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Smooth Gaussian noise (float32, unit standard deviation) with feature size scale_px.

    Small scales: blurred white noise; larger ones: bicubic upsampling of a coarse grid of
    cells 2 * scale_px (much cheaper than a wide blur, same look).
    """
    h, w = shape
    if scale_px <= 3:
        n = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), scale_px)
    else:
        from PIL import Image

        cell = 2.0 * scale_px
        c = rng.standard_normal((int(h / cell) + 2, int(w / cell) + 2), dtype=np.float32)
        n = np.asarray(Image.fromarray(c, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    n = n - n.mean()
    return (n / max(float(n.std()), 1e-6)).astype(np.float32)


def _noise1d(rng: np.random.Generator, s: np.ndarray, scale_px: float) -> np.ndarray:
    """Smooth 1D noise in [-1, 1] evaluated at positions s (px), knots every scale_px."""
    lo, hi = float(s.min()), float(s.max())
    knots = np.arange(lo - scale_px, hi + 2 * scale_px, scale_px)
    vals = rng.uniform(-1, 1, len(knots))
    return np.interp(s, knots, vals).astype(np.float32)


def _splat(shape, ys, xs, amp, sigma: float) -> np.ndarray:
    """Gaussian granules of peak ~amp at sub-pixel points, sigma (px), summed (float32)."""
    img = np.zeros(shape, np.float32)
    iy = np.clip(np.round(ys).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.round(xs).astype(int), 0, shape[1] - 1)
    np.add.at(img, (iy, ix), np.asarray(amp, np.float32))
    return gaussian_filter(img, sigma) * np.float32(2 * np.pi * sigma * sigma)


def _sample(rng: np.random.Generator, weight: np.ndarray, n: int):
    """n random pixel positions (ys, xs, float) with probability proportional to weight."""
    p = np.clip(weight, 0, None).ravel().astype(np.float64)
    if n <= 0 or p.sum() <= 0:
        return np.zeros(0), np.zeros(0)
    idx = rng.choice(p.size, size=n, p=p / p.sum())
    ys, xs = np.divmod(idx, weight.shape[1])
    return ys + rng.uniform(-0.5, 0.5, n), xs + rng.uniform(-0.5, 0.5, n)


def _seg_dist(X, Y, x0, y0, x1, y1):
    """Distance (px) of points to the segment (x0, y0)-(x1, y1)."""
    x0, y0, x1, y1 = float(x0), float(y0), float(x1), float(y1)
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * vx + (Y - y0) * vy) / max(vx * vx + vy * vy, 1e-9), 0, 1)
    return np.hypot(X - (x0 + t * vx), Y - (y0 + t * vy))


# ----------------------------------------------------------------------------- IF image


def _if_render(rng: np.random.Generator, label: str, weak: bool) -> tuple[np.ndarray, dict]:
    """IF image (512, 512, 3) uint8 and its geometry (tuft centre/radius in px, maps)."""
    n = IF_SIZE_PX
    Y, X = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    cx, cy = (float(v) for v in n / 2 + rng.uniform(-35, 35, 2))  # floats keep float32
    R = float(rng.uniform(140, 205))
    lobes = int(rng.integers(4, 8))
    phase, phase2 = (float(v) for v in rng.uniform(0, 2 * np.pi, 2))
    dx, dy = X - cx, Y - cy
    r = np.hypot(dx, dy)
    th = np.arctan2(dy, dx)
    edge = R * (1 + 0.08 * np.cos(lobes * th + phase) + 0.03 * np.cos(3 * th + phase2)
                + 0.02 * _noise(rng, (n, n), 12.0))
    rho = r / edge
    tuft = sc.smoothstep(1.02, 0.97, rho)

    # mesangial stalks: a hub and one axis per lobe with two side branches
    mes = np.exp(-(r / (0.16 * R)) ** 2)
    for k in range(lobes):
        a = (2 * np.pi * k - phase) / lobes + float(rng.uniform(-0.12, 0.12))
        L = R * float(rng.uniform(0.55, 0.68))
        ex, ey = cx + L * np.cos(a), cy + L * np.sin(a)
        w = 0.06 * R
        mes = np.maximum(mes, np.exp(-(_seg_dist(X, Y, cx, cy, ex, ey) / w) ** 2))
        for side in (-1, 1):
            f = float(rng.uniform(0.4, 0.7))
            bx, by = cx + f * L * np.cos(a), cy + f * L * np.sin(a)
            b = a + side * float(rng.uniform(0.5, 0.9))
            lb = R * float(rng.uniform(0.15, 0.25))
            d = _seg_dist(X, Y, bx, by, bx + lb * np.cos(b), by + lb * np.sin(b))
            mes = np.maximum(mes, np.exp(-(d / (0.045 * R)) ** 2))
    mes *= tuft

    # capillary loops: rings round jittered centres away from the stalks, and the outer
    # contour of the lobules
    cap = np.exp(-(((rho - 0.955) * edge) / 2.2) ** 2) * sc.smoothstep(1.05, 0.9, rho)
    sp = 0.17 * R
    for gy in np.arange(cy - R, cy + R, sp):
        for gx in np.arange(cx - R, cx + R, sp):
            lx, ly = gx + rng.uniform(0, sp), gy + rng.uniform(0, sp)
            iy, ix = int(np.clip(ly, 0, n - 1)), int(np.clip(lx, 0, n - 1))
            if not (0.22 < rho[iy, ix] < 0.9) or mes[iy, ix] > 0.4:
                continue
            rl = sp * rng.uniform(0.38, 0.5)
            y0, y1 = max(int(ly - rl - 6), 0), min(int(ly + rl + 7), n)
            x0, x1 = max(int(lx - rl - 6), 0), min(int(lx + rl + 7), n)
            dd = np.hypot(X[y0:y1, x0:x1] - lx, Y[y0:y1, x0:x1] - ly) - rl
            np.maximum(cap[y0:y1, x0:x1], np.exp(-(dd / 1.6) ** 2), out=cap[y0:y1, x0:x1])
    cap *= tuft * (1 - sc.smoothstep(0.3, 0.7, mes))

    # deposit weights per compartment [standard]; weak = less specific and sparser
    w_mes, w_cap = {"IgAN": (1.0, 0.0), "MN": (0.0, 1.0), "LN": (1.0, 1.0)}[label]
    if weak:
        if label == "LN":
            w_mes, w_cap = (1.0, 0.2) if rng.random() < 0.5 else (0.2, 1.0)
        else:
            w_mes, w_cap = w_mes + 0.35 * w_cap, w_cap + 0.35 * w_mes
    area = R * R / 170.0 ** 2
    dens = 0.5 if weak else 1.0
    sig = np.zeros((n, n), np.float32)
    if w_mes > 0:  # coarse granular, some clumps
        m_n = int(dens * w_mes * rng.uniform(700, 1100) * area)
        ys, xs = _sample(rng, mes, m_n)
        sig += _splat((n, n), ys, xs, rng.lognormal(-1.2, 0.45, len(ys)),
                      rng.uniform(1.5, 2.2))
        ys, xs = _sample(rng, mes, int(m_n * 0.05))
        sig += _splat((n, n), ys, xs, rng.lognormal(-1.0, 0.3, len(ys)), 3.5)
    if w_cap > 0:  # fine granular, dense along the walls
        c_n = int(dens * w_cap * rng.uniform(1600, 2400) * area)
        ys, xs = _sample(rng, cap * (0.35 + sc.smoothstep(0.3, 0.85, rho)), c_n)
        sig += _splat((n, n), ys, xs, rng.lognormal(-1.0, 0.4, len(ys)),
                      rng.uniform(0.9, 1.25))
    capsule = np.exp(-((r - R * rng.uniform(1.12, 1.2)) / 3.0) ** 2)
    grain = np.clip(1 + 0.3 * _noise(rng, (n, n), 3.0), 0, None)
    auto = 0.05 * tuft * grain + 0.035 * capsule + 0.012  # autofluorescence, capsule
    bright = rng.uniform(0.75, 1.0)
    if label == "LN" and not weak:
        bright *= 1.5
    if weak:
        bright *= rng.uniform(0.35, 0.55)
    v = sig * bright + auto
    v = gaussian_filter(v, rng.uniform(1.2, 2.5) if weak else rng.uniform(0.6, 1.4))
    v = 1 - np.exp(-1.3 * v)  # detector saturation
    read = rng.uniform(0.012, 0.02) * (2.0 if weak else 1.0)
    v = v + rng.normal(0, 1, v.shape).astype(np.float32) * (read + 0.02 * np.sqrt(np.maximum(v, 0)))
    g = np.clip(v, 0, 1)
    rgb = np.stack([0.12 * g + 0.01, g, 0.06 * g + 0.012], -1)
    img = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    geom = {"cx_px": float(cx), "cy_px": float(cy), "tuft_radius_px": R, "lobes": lobes,
            "rho": rho.astype(np.float32), "mesangium": mes.astype(np.float32),
            "capillary": cap.astype(np.float32), "brightness": float(bright),
            "weights": {"mesangial": float(w_mes), "capillary": float(w_cap)}}
    return img, geom


def if_image(rng: np.random.Generator, label: str, weak: bool = False) -> np.ndarray:
    """One glomerulus under immunofluorescence: (512, 512, 3) uint8 RGB, FITC green.

    label: IgAN (mesangial granular), MN (granular capillary wall) or LN (both, brighter);
    weak: dim, noisy, blurred and less specific. Orientation, size, brightness random.
    """
    _check_label(label)
    return _if_render(rng, label, bool(weak))[0]


# ----------------------------------------------------------------------------- TEM images

# grey levels (0 black .. 255 white; electron-dense = dark)
G_LUMEN, G_URINARY, G_ENDO, G_GBM, G_FOOT = 212.0, 224.0, 142.0, 98.0, 136.0
G_MATRIX, G_NUCLEUS, G_CHROMATIN, G_PODO, G_RBC, G_DEPOSIT = (
    160.0, 124.0, 100.0, 166.0, 108.0, 24.0)


def _blend(img: np.ndarray, alpha: np.ndarray, value) -> None:
    img += (np.asarray(value, np.float32) - img) * np.clip(alpha, 0, 1)


def _loop(rng: np.random.Generator, label: str, shape: tuple[int, int], deposits: bool,
          weak: bool) -> tuple[np.ndarray, dict]:
    """A capillary-loop segment (float grey) with the class's deposits when asked."""
    h, w = shape
    Y, X = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    # a few shared texture fields (fine grain, cell texture, blob outlines, background)
    fine, mid, blobs, bg = (_noise(rng, (h, w), k) for k in (1.5, 3.0, 8.0, 25.0))
    Rc = rng.uniform(250, 600)
    px, py = w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h
    psi = rng.uniform(0, 2 * np.pi)
    cx, cy = float(px - Rc * np.cos(psi)), float(py - Rc * np.sin(psi))
    dist = np.hypot(X - cx, Y - cy)
    s = (Rc * np.angle(np.exp(1j * (np.arctan2(Y - cy, X - cx) - psi)))).astype(np.float32)
    d = dist - Rc  # < 0 lumen side, > 0 urinary side (px)
    d = d - rng.uniform(4, 14) * np.sin(2 * np.pi * s / rng.uniform(90, 220)
                                         + rng.uniform(0, 6.3)) - 4 * _noise1d(rng, s, 40.0)
    d = d.astype(np.float32)
    t_px = rng.uniform(*TEM_GBM_NM) / TEM_NM_PER_PX
    if deposits and not weak:
        t_px *= {"IgAN": 1.0, "MN": rng.uniform(1.15, 1.4), "LN": rng.uniform(1.05, 1.25)}[label]
    ht = t_px / 2
    span = min(h, w)
    site = np.zeros((h, w), np.uint8)
    counts = {v: 0 for v in SITES.values()}

    # mesangium on the lumen side (always in IgAN images that carry deposits)
    has_mes = rng.random() < 0.75 or (deposits and label in ("IgAN",))
    mes = np.zeros((h, w), np.float32)
    if has_mes:
        sm = rng.uniform(-0.3, 0.3) * span
        ma, mb = rng.uniform(90, 180), rng.uniform(70, 140)
        dm = -(ht + 0.85 * mb)
        ell = ((s - sm) / ma) ** 2 + ((d - dm) / mb) ** 2
        mes = sc.smoothstep(1.08, 0.92, ell + 0.12 * blobs)
        mes *= sc.smoothstep(-ht + 2, -ht - 2, d)

    # subepithelial humps (MN, LN) with GBM spikes between them; subendothelial bands (LN)
    h_sep = np.zeros((h, w), np.float32)
    h_spk = np.zeros((h, w), np.float32)
    h_sen = np.zeros((h, w), np.float32)
    if deposits and label in ("MN", "LN"):
        step = rng.uniform(50, 110)
        p_keep = (0.85 if label == "MN" else 0.5) * (0.18 if weak else 1.0)
        prev = None
        for sk in np.arange(-span, span, step) + rng.uniform(0, step):
            if abs(sk) > 0.75 * span or rng.random() > p_keep:
                prev = None
                continue
            wd, hd = rng.uniform(18, 40), rng.uniform(12, 30)
            q = 1 - ((s - sk) / (wd / 2)) ** 2
            np.maximum(h_sep, hd * np.sqrt(np.clip(q, 0, 1)), out=h_sep)
            counts["subepithelial"] += 1
            if prev is not None and label == "MN":  # spike of GBM between two deposits
                s_spike, hs = (prev + sk) / 2, 0.8 * hd
                qs = 1 - ((s - s_spike) / rng.uniform(3, 5)) ** 2
                np.maximum(h_spk, hs * np.clip(qs, 0, 1) ** 0.3, out=h_spk)
            prev = sk
    if deposits and label == "LN":
        for _ in range(int(rng.integers(0, 2) if weak else rng.integers(2, 5))):
            sk = rng.uniform(-0.6, 0.6) * span
            lk, hd = rng.uniform(40, 120), rng.uniform(10, 24)
            q = 1 - ((s - sk) / (lk / 2)) ** 2
            np.maximum(h_sen, hd * np.clip(q, 0, 1) ** 0.5, out=h_sen)
            counts["subendothelial"] += 1
    h_sen *= 1 - (mes > 0.5)  # mesangium abuts the GBM there: no endothelium

    img = np.where(d < 0, G_LUMEN, G_URINARY).astype(np.float32)
    img += 5 * bg
    # red cell in the lumen
    if rng.random() < 0.35:
        sr, dr = rng.uniform(-0.3, 0.3) * span, -(ht + rng.uniform(80, 220))
        a, b = rng.uniform(55, 80), rng.uniform(25, 35)
        _blend(img, sc.smoothstep(1.05, 0.95, ((s - sr) / a) ** 2 + ((d - dr) / b) ** 2)
               * (d < -ht - 20), G_RBC)
    # mesangial matrix, with a mesangial cell nucleus
    if has_mes:
        _blend(img, mes, G_MATRIX + 8 * fine)
        nr = rng.uniform(35, 60)
        ns, nd = sm + rng.uniform(-0.3, 0.3) * ma, dm - rng.uniform(0.1, 0.4) * mb
        nuc = sc.smoothstep(1.1, 0.9, ((s - ns) / (1.5 * nr)) ** 2 + ((d - nd) / nr) ** 2
                            + 0.15 * blobs) * mes
        _blend(img, nuc, G_NUCLEUS + 10 * mid)
        rim = nuc * sc.smoothstep(0.55, 0.95, ((s - ns) / (1.5 * nr)) ** 2
                                  + ((d - nd) / nr) ** 2)
        _blend(img, rim * 0.8, G_CHROMATIN)
    # fenestrated endothelium, displaced inwards by subendothelial deposits
    pf = rng.uniform(9, 13)
    fen = (np.mod(s / pf, 1.0) > 0.3).astype(np.float32)
    e = rng.uniform(5, 9)
    inner = -ht - h_sen
    endo = sc.smoothstep(inner - e - 1, inner - e + 1, d) * sc.smoothstep(inner + 1, inner - 1, d)
    _blend(img, endo * fen * (1 - mes), G_ENDO)
    # GBM (lamina densa darker than the rarae) and its spikes
    gbm = sc.smoothstep(ht + 1.5, ht - 1.5, np.abs(d))
    gbm = np.maximum(gbm, sc.smoothstep(-ht - 1, -ht + 1, d)
                     * sc.smoothstep(ht + h_spk + 1, ht + h_spk - 1, d) * (h_spk > 0.5))
    densa = sc.smoothstep(0.85 * ht, 0.55 * ht, np.abs(d))
    _blend(img, gbm, G_GBM + 14 * (1 - densa) + 6 * fine)
    # foot processes on the urinary side, effaced over subepithelial deposits
    pp = rng.uniform(28, 45)
    hf = rng.uniform(22, 38)
    base = ht + h_sep
    q = np.mod(s / pp + rng.uniform(0, 1), 1.0) - 0.5
    prof = hf * np.sqrt(np.clip(1 - (2 * q / 0.82) ** 2, 0, 1))
    prof = np.where(h_sep > 1, np.maximum(prof, 14.0), prof)
    foot = sc.smoothstep(base - 1, base + 1, d) * sc.smoothstep(base + prof + 1.5,
                                                                base + prof - 1.5, d)
    _blend(img, foot * (prof > 0.5), G_FOOT + 7 * mid)
    # podocyte cytoplasm patches further out
    for _ in range(int(rng.integers(1, 4))):
        sp_, dp = rng.uniform(-0.5, 0.5) * span, ht + hf + rng.uniform(40, 110)
        a, b = rng.uniform(60, 160), rng.uniform(30, 70)
        blob = sc.smoothstep(1.1, 0.9, ((s - sp_) / a) ** 2 + ((d - dp) / b) ** 2
                             + 0.2 * blobs)
        _blend(img, blob * (d > ht + 8), G_PODO + 6 * fine)
    # deposits (near black): subepithelial, subendothelial, mesangial
    dep = np.zeros((h, w), np.float32)
    if h_sep.any():
        a = sc.smoothstep(ht - 2, ht, d) * sc.smoothstep(base + 1, base - 1, d) * (h_sep > 1)
        dep = np.maximum(dep, a)
        site[a > 0.5] = 2
    if h_sen.any():
        a = sc.smoothstep(-ht + 2, -ht, d) * sc.smoothstep(inner - 1, inner + 1, d) * (h_sen > 1)
        dep = np.maximum(dep, a)
        site[(a > 0.5) & (site == 0)] = 3
    if deposits and has_mes and label in ("IgAN", "LN"):
        rough = 0.25 * mid
        k = {"IgAN": rng.integers(4, 11), "LN": rng.integers(2, 7)}[label]
        if weak:
            k = rng.integers(0, 3)
        for _ in range(int(k)):
            for _try in range(30):
                ds = sm + rng.uniform(-0.8, 0.8) * ma
                dd = dm + rng.uniform(-0.1, 1.0) * mb  # towards the GBM (paramesangial)
                ra, rb = rng.uniform(8, 28), rng.uniform(8, 22)
                if ((ds - sm) / ma) ** 2 + ((dd - dm) / mb) ** 2 < 0.55 and dd + rb < -ht:
                    break
            else:
                continue
            blob = sc.smoothstep(1.15, 0.85, ((s - ds) / ra) ** 2 + ((d - dd) / rb) ** 2
                                 + rough) * (mes > 0.5)
            dep = np.maximum(dep, blob)
            site[(blob > 0.5) & (site == 0)] = 1
            counts["mesangial"] += 1
    _blend(img, dep, G_DEPOSIT + 8 * mid)
    geom = {"kind": "capillary_loop", "d_px": d, "gbm_half_px": float(ht),
            "gbm_thickness_nm": float(t_px * TEM_NM_PER_PX), "mesangium": mes > 0.5,
            "deposit": dep > 0.5, "site": site, "deposits": counts}
    return img, geom


def _tubule(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """Tubular epithelium over its thick basement membrane and interstitium (no deposits)."""
    h, w = shape
    Y, X = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    a = rng.uniform(0, np.pi)
    nx, ny = np.cos(a), np.sin(a)
    d = (X - w / 2) * nx + (Y - h / 2) * ny + rng.uniform(-0.2, 0.2) * min(h, w)
    d = d + 12 * _noise(rng, (h, w), 60.0)
    t = rng.uniform(50, 100)  # TBM 0.5-1 um
    img = np.where(d < 0, G_PODO + 4, 206.0).astype(np.float32) + 5 * _noise(rng, (h, w), 20)
    # interstitium: collagen fibrils (faint stripes)
    fib = np.sin(((X * ny - Y * nx) + 6 * _noise(rng, (h, w), 30.0)) * rng.uniform(0.5, 0.9))
    _blend(img, (d > t / 2) * 0.35 * (fib > 0.6), 178.0)
    _blend(img, sc.smoothstep(t / 2 + 2, t / 2 - 2, np.abs(d)), 112.0 + 6 * _noise(rng, (h, w),
                                                                                     2.0))
    # mitochondria (elongated, mid grey with lighter cristae) in the epithelium
    mito = np.zeros((h, w), np.float32)
    cris = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(25, 60))):
        mx, my = rng.uniform(0, w), rng.uniform(0, h)
        if (mx - w / 2) * nx + (my - h / 2) * ny > -t:
            continue
        ang = a + np.pi / 2 + rng.normal(0, 0.3)
        la, lb = rng.uniform(25, 60), rng.uniform(9, 15)
        u = ((X - mx) * np.cos(ang) + (Y - my) * np.sin(ang)) / la
        v = (-(X - mx) * np.sin(ang) + (Y - my) * np.cos(ang)) / lb
        m = sc.smoothstep(1.1, 0.9, u * u + v * v)
        np.maximum(mito, m, out=mito)
        np.maximum(cris, m * (np.sin(u * la * 0.6) > 0.5), out=cris)
    _blend(img, mito * (d < -t / 2), 118.0)
    _blend(img, cris * 0.5 * (d < -t / 2), 150.0)
    # a nucleus in the epithelium
    nr = rng.uniform(70, 140)
    ncx = w / 2 - nx * (t / 2 + nr + rng.uniform(30, 120))
    ncy = h / 2 - ny * (t / 2 + nr + rng.uniform(30, 120))
    rr = np.hypot((X - ncx) / 1.3, Y - ncy) / nr + 0.06 * _noise(rng, (h, w), 8.0)
    _blend(img, sc.smoothstep(1.03, 0.97, rr), 132.0 + 8 * _noise(rng, (h, w), 4.0))
    _blend(img, sc.smoothstep(1.03, 0.97, rr) * sc.smoothstep(0.8, 0.97, rr) * 0.7, G_CHROMATIN)
    geom = {"kind": "tubule", "deposit": np.zeros((h, w), bool), "site": np.zeros((h, w),
                                                                               np.uint8),
            "deposits": {v: 0 for v in SITES.values()}}
    return img, geom


def _tem_render(rng: np.random.Generator, label: str, informative: bool,
                shape: tuple[int, int], weak: bool = False) -> tuple[np.ndarray, dict]:
    """TEM image (H, W) uint8 and its geometry: kind, signed distance to the GBM centre
    `d_px` (< 0 lumen side), `gbm_half_px`, `mesangium` / `deposit` masks, `site` map
    (see `SITES`), deposit counts per site."""
    h, w = int(shape[0]), int(shape[1])
    if informative:
        img, geom = _loop(rng, label, (h, w), True, weak)
    elif rng.random() < 0.5:
        img, geom = _tubule(rng, (h, w))
    else:
        img, geom = _loop(rng, label, (h, w), False, False)
        img = gaussian_filter(img, rng.uniform(6, 12))
        geom = {**geom, "kind": "out_of_focus"}
    img = img + 4 * _noise(rng, (h, w), 1.0)  # stain / section grain
    img = gaussian_filter(img, rng.uniform(0.5, 1.1))
    img = img * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10)
    yy, xx = np.mgrid[0:h, 0:w]
    vign = 1 - 0.06 * (((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2) * 4
    img = img * vign + rng.normal(0, rng.uniform(3, 7), (h, w))
    geom["informative"] = bool(informative)
    geom["nm_per_px"] = TEM_NM_PER_PX
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), geom


def tem_image(rng: np.random.Generator, label: str, informative: bool,
              shape: tuple[int, int], weak: bool = False) -> np.ndarray:
    """A greyscale TEM image (H, W) uint8 at `TEM_NM_PER_PX` nm/px.

    informative: a capillary loop with the class's electron-dense deposits (IgAN
    mesangial; MN subepithelial with spikes; LN subendothelial, subepithelial and
    mesangial); otherwise tubule/interstitium or a badly out-of-focus loop without
    deposits. weak: deposits scarce. shape: (H, W) px.
    """
    _check_label(label)
    if min(shape) < 64:
        raise UsageError(f"TEM image shape {tuple(shape)} is too small (at least 64 px)")
    return _tem_render(rng, label, bool(informative), shape, bool(weak))[0]


# ----------------------------------------------------------------------------- cases


def _write_tem(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    if path.suffix == ".tif":
        import tifffile

        tifffile.imwrite(path, img, compression="zlib")
    elif path.suffix == ".jpg":
        Image.fromarray(img).save(path, quality=TEM_JPEG_QUALITY)
    else:
        Image.fromarray(img).save(path)


def _prepare(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for sub in ("om", "im", "tem"):
            (folder / sub).mkdir(exist_ok=True)
    except OSError as e:
        raise OutputNotWritable(f"cannot create case folder {folder}: {e.strerror}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputNotWritable(f"case folder {folder} is not writable")
    for old in (folder / "tem").glob("tem_*"):  # a rewritten case keeps no stale images
        old.unlink()


def _case_plan(seed: int, label: str | None, weak: dict | None) -> tuple[str, dict]:
    """(label, weak flags by modality) of a case: drawn from the seed unless given."""
    rng = np.random.default_rng([seed, 9301])
    drawn = CLASSES[int(rng.integers(len(CLASSES)))]
    flags = {m: bool(rng.random() < p) for m, p in WEAK_PROBABILITY.items()}
    flags.update({m: bool(v) for m, v in (weak or {}).items()})
    return label or drawn, flags


def _tem_plan(seed: int) -> list[dict]:
    """The TEM bag of a case: per image its shape (H, W), format and informativeness."""
    rng = np.random.default_rng([seed, 9303])
    n = int(rng.integers(TEM_BAG_SIZE[0], TEM_BAG_SIZE[1] + 1))
    n_uninf = min(int(round(rng.uniform(*TEM_UNINFORMATIVE) * n)), n - 1)
    informative = np.ones(n, bool)
    informative[rng.permutation(n)[:n_uninf]] = False
    return [{"shape": (int(rng.integers(TEM_SIDE_PX[0], TEM_SIDE_PX[1] + 1)),
                       int(rng.integers(TEM_SIDE_PX[0], TEM_SIDE_PX[1] + 1))),
             "format": TEM_FORMATS[int(rng.integers(len(TEM_FORMATS)))],
             "informative": bool(informative[k])} for k in range(n)]


def write_case(folder: str | os.PathLike, label: str | None = None, seed: int = 0,
               om_size_px: tuple[int, int] = (6000, 4000), mpp: float = 0.5, *,
               weak: dict[str, bool] | None = None, workers: int | None = None,
               randomise: bool = False) -> dict:
    """Write one synthetic glomerular-dx case folder and return its truth dict.

    folder: the case folder (created; its name is the case id); label: IgAN, MN or LN
    (None = drawn from the seed); om_size_px: (width, height) of the biopsy slide in
    level-0 px at `mpp` um/px; weak: override the per-modality weak flags, e.g.
    {"om": False, "im": True, "tem": False} (missing keys are drawn); workers: OM
    rendering processes (default: up to 2 for big slides); randomise: a domain-randomised
    OM slide (`synth.randomise`). Writes om/<case>.svs (+ truth files), im/if.png,
    tem/tem_XX.{png,tif,jpg} and truth.json.
    """
    _check_label(label)
    folder = Path(folder)
    width, height = (int(v) for v in om_size_px)
    if width < 256 or height < 256:
        raise UsageError(f"OM slide size {width}x{height} px is too small (at least 256x256)")
    if not 0.05 <= float(mpp) <= 20:
        raise UsageError(f"mpp {mpp} um/px is outside the plausible range 0.05-20")
    if weak is not None and set(weak) - set(WEAK_PROBABILITY):
        raise UsageError(f"weak flags are {', '.join(WEAK_PROBABILITY)}; got {sorted(weak)}")
    label, flags = _case_plan(int(seed), label, weak)
    case = folder.name or "case"
    _prepare(folder)
    try:
        return _write_case(folder, case, label, int(seed), flags, width, height, float(mpp),
                           workers, bool(randomise))
    except OSError as e:
        raise OutputNotWritable(f"cannot write case {folder}: {e.strerror or e}") from e


def _write_case(folder: Path, case: str, label: str, seed: int, flags: dict, width: int,
                height: int, mpp: float, workers, randomise: bool = False) -> dict:
    from PIL import Image

    om_path = folder / "om" / f"{case}.svs"
    om = write_spec_slide(kidney.CASE_OM_SPEC, om_path, width=width, height=height, mpp=mpp,
                          seed=seed, label=label, workers=workers,
                          build_kw={"weak": flags["om"]}, randomise=randomise)

    r_if = np.random.default_rng([seed, 9302])
    if_img, if_geom = _if_render(r_if, label, flags["im"])
    Image.fromarray(if_img).save(folder / "im" / "if.png")

    r_tem = np.random.default_rng([seed, 9304])
    tem = []
    for k, item in enumerate(_tem_plan(seed)):
        img, g = _tem_render(r_tem, label, item["informative"], item["shape"], flags["tem"])
        rel = f"tem/tem_{k + 1:02d}.{item['format']}"
        _write_tem(folder / rel, img)
        tem.append({"path": rel, "informative": item["informative"], "kind": g["kind"],
                    "shape_px": list(item["shape"]), "format": item["format"],
                    "deposits": g["deposits"],
                    **({"gbm_thickness_nm": round(g["gbm_thickness_nm"], 1)}
                       if "gbm_thickness_nm" in g else {})})
    n = len(tem)
    n_inf = sum(t["informative"] for t in tem)

    truth = {
        "task": TASK,
        "case": case,
        "diagnosis": {"label": label, "weak": dict(flags)},
        "scores": {f"p_{c}": float(c == label) for c in CLASSES},
        "counts": {"glomeruli": om["counts"]["glomeruli"],
                   "hypercellular_glomeruli": om["counts"]["hypercellular_glomeruli"],
                   "tem_images": n, "tem_informative": n_inf},
        "areas_mm2": om["areas_mm2"],
        "objects": om["objects"],
        "weak": dict(flags),
        "modalities": {
            "om": {"path": f"om/{om_path.name}", "truth": f"om/{om_path.stem}.truth.json",
                   "mpp": mpp, "width": width, "height": height, "weak": flags["om"],
                   "hypercellular_fraction": om["scores"]["hypercellular_fraction"],
                   "mean_gbm_thickness_factor": om["scores"]["mean_gbm_thickness_factor"]},
            "im": {"path": "im/if.png", "weak": flags["im"], "size_px": IF_SIZE_PX,
                   "tuft_centre_px": [round(if_geom["cx_px"], 2), round(if_geom["cy_px"], 2)],
                   "tuft_radius_px": round(if_geom["tuft_radius_px"], 2),
                   "brightness": round(if_geom["brightness"], 4),
                   "pattern_weights": if_geom["weights"]},
            "tem": {"nm_per_px": TEM_NM_PER_PX, "weak": flags["tem"],
                    "informative": [t["path"] for t in tem if t["informative"]],
                    "images": tem},
        },
        "generator": {
            "name": "wsi-synth", "version": f"{__version__}+synth{GENERATOR_VERSION}",
            "seed": seed, "om_size_px": [width, height], "mpp": mpp,
            "weak_probability": dict(WEAK_PROBABILITY),
            "tem_bag_size": list(TEM_BAG_SIZE), "tem_side_px": list(TEM_SIDE_PX),
            "tem_uninformative_fraction": list(TEM_UNINFORMATIVE),
            "tem_formats": list(TEM_FORMATS),
        },
    }
    (folder / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def write_case_cohort(folder: str | os.PathLike, cases: int, seed: int = 0,
                      **kw) -> list[dict]:
    """Write `cases` case folders folder/case_XXX/ balanced over IgAN, MN, LN (in a seeded
    random order) and folder/cases.csv (case_id, diagnosis); returns the truth dicts.

    kw: passed to `write_case` (om_size_px, mpp, weak, workers, randomise).
    """
    if int(cases) < 1:
        raise UsageError(f"a cohort needs at least one case, not {cases}")
    if "label" in kw:
        raise UsageError("a cohort is balanced over the classes; label cannot be set")
    folder = Path(folder)
    rng = np.random.default_rng([int(seed), 9300])
    labels = [CLASSES[i % len(CLASSES)] for i in range(int(cases))]
    labels = [labels[i] for i in rng.permutation(len(labels))]
    truths = []
    for i, lab in enumerate(labels):
        case_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0] >> 1)
        truths.append(write_case(folder / f"case_{i + 1:03d}", lab, case_seed, **kw))
    try:
        with open(folder / "cases.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["case_id", "diagnosis"])
            for t in truths:
                w.writerow([t["case"], t["diagnosis"]["label"]])
    except OSError as e:
        raise OutputNotWritable(f"cannot write {folder / 'cases.csv'}: {e.strerror}") from e
    return truths
