"""Colour and texture statistics to compare synthetic slides with real scans.

The same simple tissue rule is applied to both (saturation > 0.07 with max < 250, or
summed OD > 0.6), so the numbers compare like with like:

    python -m wsi_pipeline.synth.realism SLIDE_OR_PNG [...]

`tile_features` describes a tile (colour in optical density, stain angle, glass fraction,
texture at two scales); `frechet_distance` compares two sets of them as Gaussians, the
way FID compares network features, and `precision_recall` says how much of each set
lies within the other's; `benchmarks/bench_realism.py` reports both for synthetic
against real H&E and PAS.
"""

from __future__ import annotations

import sys

import numpy as np


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an (H, W, 3) uint8 image by a saturation/OD rule."""
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1)
    od = -np.log(np.maximum(rgb, 1) / 255.0).sum(-1)
    return ((sat > 0.07) & (mx < 250)) | (od > 0.6)


def colour_stats(rgb: np.ndarray) -> dict:
    """Tissue fraction, RGB/OD mean and percentiles of tissue, glass mean/sd (dict)."""
    m = tissue_mask(rgb)
    t = rgb[m].astype(np.float64)
    od = -np.log(np.maximum(t, 1) / 255.0)
    g = rgb[~m].astype(np.float64)
    out = {"tissue_fraction": float(m.mean())}
    if len(t):
        out.update(
            rgb_mean=t.mean(0).round(1).tolist(),
            rgb_p5=np.percentile(t, 5, 0).round(0).tolist(),
            rgb_p50=np.percentile(t, 50, 0).round(0).tolist(),
            rgb_p95=np.percentile(t, 95, 0).round(0).tolist(),
            od_mean=od.mean(0).round(3).tolist(),
            od_p95=np.percentile(od, 95, 0).round(3).tolist(),
            od_sum_p50=round(float(np.median(od.sum(1))), 3),
        )
    if len(g):
        out.update(glass_mean=g.mean(0).round(1).tolist(), glass_sd=g.std(0).round(1).tolist())
    return out


def read_rgb(path: str, max_side: int = 6000) -> np.ndarray:
    """Level-0 RGB of a slide (openslide) or an image file (PIL), at most max_side^2."""
    if path.lower().endswith((".svs", ".tif", ".tiff")):
        import openslide

        s = openslide.OpenSlide(path)
        w, h = s.dimensions
        return np.asarray(s.read_region((0, 0), 0, (min(w, max_side), min(h, max_side)))
                          .convert("RGB"))
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


FEATURE_NAMES = (
    "glass_fraction",
    "od_mean_r", "od_mean_g", "od_mean_b", "od_sd_r", "od_sd_g", "od_sd_b",
    "stain_angle_p5", "stain_angle_p50", "stain_angle_p95",
    "grad_p50", "grad_p90", "log_energy_1um", "log_energy_2p5um",
    "log_local_var_mean", "log_local_var_p90",
)
"""Names of the `tile_features` columns, in order."""

# orthonormal basis of the OD plane perpendicular to grey (1, 1, 1): a pixel's stain angle
_E1 = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)
_E2 = np.array([1.0, 1.0, -2.0]) / np.sqrt(6.0)


def tile_features(rgb: np.ndarray, mpp: float = 0.5) -> np.ndarray:
    """Colour and texture features (len(FEATURE_NAMES),) float64 of an (H, W, 3) uint8 tile.

    Colour: glass fraction (1 - `tissue_mask`), mean and sd of OD per channel over tissue,
    percentiles 5/50/95 of the stain angle (degrees; direction of a pixel's OD vector in
    the plane perpendicular to grey, pixels with summed OD > 0.3). Texture, on the mean OD
    of all pixels: gradient magnitude (OD/um) percentiles 50/90; log mean squared
    scale-normalised Laplacian of Gaussian at sigma 1 and 2.5 um; log of the mean and the
    90th percentile of the local variance in a 3.5 um square window. `mpp` (um/px) sets
    the physical scales; tiles of about 0.5 um/px compare best.
    """
    from scipy import ndimage

    rgb = np.asarray(rgb)
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    m = tissue_mask(rgb)
    t = od[m] if m.any() else od.reshape(-1, 3)[:1] * 0
    odsum = t.sum(1)
    dense = t[odsum > 0.3]
    if len(dense):
        ang = np.degrees(np.arctan2(dense @ _E2, dense @ _E1))
        ang_p = np.percentile(ang, (5, 50, 95))
    else:
        ang_p = np.zeros(3)
    g = od.mean(-1)
    gy, gx = np.gradient(g)
    grad = np.hypot(gx, gy) / mpp
    energy = []
    for sigma_um in (1.0, 2.5):
        s_px = sigma_um / mpp
        lap = ndimage.gaussian_laplace(g, s_px, mode="reflect") * s_px * s_px
        energy.append(np.log(np.mean(lap * lap) + 1e-8))
    w = max(int(round(3.5 / mpp)), 3)
    mu = ndimage.uniform_filter(g, w, mode="reflect")
    var = np.maximum(ndimage.uniform_filter(g * g, w, mode="reflect") - mu * mu, 0.0)
    return np.array([
        1.0 - m.mean(), *t.mean(0), *t.std(0), *ang_p,
        *np.percentile(grad, (50, 90)), *energy,
        np.log(var.mean() + 1e-8), np.log(np.percentile(var, 90) + 1e-8),
    ], np.float64)


def tiles_of(rgb: np.ndarray, size: int, min_tissue: float = 0.5) -> list[np.ndarray]:
    """Non-overlapping (size, size, 3) tiles of an image with at least `min_tissue` tissue."""
    out = []
    for y in range(0, rgb.shape[0] - size + 1, size):
        for x in range(0, rgb.shape[1] - size + 1, size):
            t = rgb[y:y + size, x:x + size]
            if tissue_mask(t).mean() >= min_tissue:
                out.append(t)
    return out


def frechet_distance(real: np.ndarray, synth: np.ndarray) -> dict:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F).

    Both sets are standardised by the real set's mean and sd per feature first, so each
    feature counts alike and the distance is in units of the real spread. Returns
    {"frechet": float, "per_feature": {name: 1-D Fréchet term (dmean^2 + dsd^2)},
    "mean_gap_sd": {name: (synthetic mean - real mean) / real sd}}, names from
    `FEATURE_NAMES` when F matches, else f0, f1, ...
    """
    from scipy import linalg

    real = np.asarray(real, np.float64)
    synth = np.asarray(synth, np.float64)
    mu, sd = real.mean(0), real.std(0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    a, b = (real - mu) / sd, (synth - mu) / sd
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb)
    root = root.real if np.iscomplexobj(root) else root
    fd = float(np.sum((ma - mb) ** 2) + np.trace(ca + cb - 2.0 * root))
    names = FEATURE_NAMES if real.shape[1] == len(FEATURE_NAMES) else tuple(
        f"f{k}" for k in range(real.shape[1]))
    term = (ma - mb) ** 2 + (a.std(0) - b.std(0)) ** 2
    return {"frechet": fd,
            "per_feature": {n: float(v) for n, v in zip(names, term, strict=True)},
            "mean_gap_sd": {n: float(v) for n, v in zip(names, mb - ma, strict=True)}}


def precision_recall(real: np.ndarray, synth: np.ndarray, k: int = 3) -> dict:
    """Improved precision and recall of Kynkäänniemi et al. (NeurIPS 2019) on features.

    Features are standardised by the real set. precision: fraction of synthetic samples
    inside the real manifold (within the distance of some real sample to its k-th nearest
    real neighbour); recall: fraction of real samples inside the synthetic manifold.
    Returns {"precision": float, "recall": float}.
    """
    from scipy.spatial import cKDTree

    real = np.asarray(real, np.float64)
    synth = np.asarray(synth, np.float64)
    mu, sd = real.mean(0), real.std(0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    a, b = (real - mu) / sd, (synth - mu) / sd

    def inside(ref: np.ndarray, query: np.ndarray) -> float:
        tree = cKDTree(ref)
        radius = tree.query(ref, k + 1)[0][:, -1]  # k-th neighbour (the first is itself)
        d, idx = tree.query(query, min(len(ref), 64))
        return float(np.mean(np.any(d <= radius[idx], axis=1)))

    return {"precision": inside(a, b), "recall": inside(b, a)}


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(p, colour_stats(read_rgb(p)))
