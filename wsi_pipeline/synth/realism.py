"""Colour statistics to compare synthetic slides with real scans.

The same simple tissue rule is applied to both (saturation > 0.07 with max < 250, or
summed OD > 0.6), so the numbers compare like with like:

    python -m wsi_pipeline.synth.realism SLIDE_OR_PNG [...]
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


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(p, colour_stats(read_rgb(p)))
