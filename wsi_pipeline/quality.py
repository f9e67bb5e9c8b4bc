"""Slide-quality checks that come before any analysis: is this a bright-field slide at all,
and is it stained the way the task expects?

* `is_brightfield` tells a bright-field scan (light through the slide: glass is bright,
  stain absorbs) from fluorescence, dark-field or multiplex fluorescence (the background is
  dark, tissue emits), from the luminance of the whole-slide thumbnail.
* `stain_identity` tells H&E from PAS, and flags DAB immunohistochemistry, from the colour
  of the slide's own counterstained pixels: each pixel's optical density is unmixed into the
  slide's fitted haematoxylin and the two candidate chromogens, and the share of the
  non-haematoxylin absorbance each chromogen explains decides.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .stain import REFERENCES, STAIN_NAMES, StainFit, luminosity, rgb_to_od

__all__ = ["DAB_OD", "is_brightfield", "stain_identity"]

# -- bright field ------------------------------------------------------------------------------

# Bright-field thumbnails, measured: median L* 55-100 (CMU-1 96, a TCGA lung slide 64, a tile
# half covered by red pen 55, synthetic slides 83-96); the real fluorescence NDPI and Vectra
# QPTIFF: 1.3. Half the slide darker than L* 25 (RGB ~60 grey) is no bright-field scan.
MIN_BRIGHTFIELD_MEDIAN_LSTAR = 25.0


def is_brightfield(thumbnail: np.ndarray) -> tuple[bool, dict[str, Any]]:
    """Whether a whole-slide thumbnail is a bright-field scan, and the evidence.

    In bright field light passes through the slide: glass is bright and stained tissue
    absorbs, so most of a thumbnail is light. In fluorescence, dark-field and multiplex
    fluorescence (e.g. Vectra QPTIFF channel planes) only the tissue emits and the
    background is black. Rule: bright field iff the median CIE L* of the thumbnail is at
    least MIN_BRIGHTFIELD_MEDIAN_LSTAR. Pure black pixels (0, 0, 0) are left out as
    scanner padding; a thumbnail of nothing else counts as bright field (nothing to refuse).

    Parameters
    ----------
    thumbnail : (H, W, 3) uint8 RGB.

    Returns
    -------
    (brightfield, evidence): evidence holds ``median_lstar``, ``p90_lstar`` and
    ``dark_fraction`` (share of pixels darker than L* 25) of the non-padding pixels, and the
    ``rule``.
    """
    px = np.asarray(thumbnail, dtype=np.uint8).reshape(-1, 3)
    px = px[px.max(axis=1) > 0]
    rule = f"median L* >= {MIN_BRIGHTFIELD_MEDIAN_LSTAR:g} (bright glass)"
    if len(px) == 0:
        return True, {"median_lstar": None, "p90_lstar": None, "dark_fraction": None,
                      "rule": rule}
    if len(px) > 1_000_000:
        px = px[np.random.default_rng(0).choice(len(px), 1_000_000, replace=False)]
    lstar = luminosity(px) * 100.0
    median = float(np.median(lstar))
    evidence = {"median_lstar": round(median, 2),
                "p90_lstar": round(float(np.percentile(lstar, 90)), 2),
                "dark_fraction": round(float(np.mean(lstar < MIN_BRIGHTFIELD_MEDIAN_LSTAR)), 4),
                "rule": rule}
    return median >= MIN_BRIGHTFIELD_MEDIAN_LSTAR, evidence


# -- stain identity --------------------------------------------------------------------------

# DAB (3,3'-diaminobenzidine) optical density, Ruifrok & Johnston, Anal Quant Cytol Histol
# 23:291 (2001), the vector of scikit-image's rgb_from_hed / rgb_from_hdx. Brown: it
# absorbs blue most, eosin and PAS magenta absorb green most.
DAB_OD = np.array([0.268, 0.570, 0.776]) / np.linalg.norm([0.268, 0.570, 0.776])

# Share of the non-haematoxylin absorbance that eosin explains rather than PAS magenta
# (`eosin_share`). Calibrated per slide on half the real slides (MoNuSAC TCGA H&E slides and
# AIDPATH PAS glomerulus slides, alternate slide ids) and the two kidney-pas tiles: PAS at
# most 0.27, H&E at least 0.50 but for one breast slide with purple eosin (0.13). The
# threshold is the midpoint; within EOSIN_SHARE_BAND of it (about twice the spread between
# repeated 16-tile samples of one slide) the stain is "unknown".
EOSIN_SHARE_THRESHOLD = 0.40
EOSIN_SHARE_BAND = 0.05
# Share explained by DAB rather than eosin: H&E and PAS images at most 0.64 (slides 0.21),
# haematoxylin-DAB images 0.99.
DAB_SHARE_THRESHOLD = 0.80
# The non-haematoxylin stain must lie within ~25 degrees of eosin, PAS magenta or DAB
# (cosine 0.9); anything else (a special stain) is "unknown".
MIN_CHROMOGEN_COSINE = 0.90
MAX_PIXELS = 200_000


def _share(od: np.ndarray, haematoxylin: np.ndarray, first: np.ndarray,
           second: np.ndarray) -> float:
    """Share of the non-haematoxylin absorbance that `second` explains: each pixel's OD is
    split exactly into the three vectors, negative parts are dropped, and the parts of
    `first` and `second` are summed over the pixels."""
    basis = np.stack([haematoxylin, first, second]).astype(np.float64)
    if abs(np.linalg.det(basis)) < 1e-6:
        return float("nan")
    parts = np.clip(np.linalg.solve(basis.T, od.T).T, 0.0, None)
    total = float(parts[:, 1].sum() + parts[:, 2].sum())
    return float(parts[:, 2].sum()) / total if total > 0 else float("nan")


def stain_identity(pixels: np.ndarray, fit: StainFit, expected: str | None = None,
                   *, seed: int = 0) -> dict[str, Any]:
    """Which stain a slide carries: "H&E", "PAS", "IHC" (DAB) or "unknown".

    pixels: (N, 3) uint8 stained pixels of the slide (e.g. `stain.stain_pixels` of the
    sampled tiles); fit: the slide's `StainFit` on them (row 0 haematoxylin); expected:
    the task's reference name ("he", "pas") or None.

    Rules, in order:
    1. IHC when DAB explains at least DAB_SHARE_THRESHOLD of the non-haematoxylin
       absorbance (pixels unmixed into haematoxylin, eosin and DAB): brown chromogen.
    2. unknown when the fitted second stain is not within MIN_CHROMOGEN_COSINE of eosin,
       PAS magenta or DAB.
    3. H&E when eosin explains at least EOSIN_SHARE_THRESHOLD + EOSIN_SHARE_BAND of it
       (pixels unmixed into haematoxylin, eosin and PAS magenta: eosin is redder, PAS
       magenta absorbs more red and less blue), PAS at most the threshold minus the band,
       else unknown.

    Returns {"label", "confidence" (0..1: distance from the deciding threshold, 1 far
    from it), "expected" (e.g. "H&E", or None), "eosin_share", "dab_share"}.
    """
    px = np.asarray(pixels, dtype=np.uint8).reshape(-1, 3)
    if len(px) > MAX_PIXELS:
        px = px[np.random.default_rng(seed).choice(len(px), MAX_PIXELS, replace=False)]
    od = rgb_to_od(px).astype(np.float64)
    h = fit.matrix[0].astype(np.float64)
    second = fit.matrix[1].astype(np.float64)
    eosin = REFERENCES["he"].matrix[1].astype(np.float64)
    pas = REFERENCES["pas"].matrix[1].astype(np.float64)
    dab_share = _share(od, h, eosin, DAB_OD)
    eosin_share = 1.0 - _share(od, h, eosin, pas)
    result = {"expected": STAIN_NAMES.get(expected) if expected else None,
              "eosin_share": _round(eosin_share), "dab_share": _round(dab_share)}
    if dab_share >= DAB_SHARE_THRESHOLD:
        confidence = (dab_share - DAB_SHARE_THRESHOLD) / (1.0 - DAB_SHARE_THRESHOLD)
        return {"label": "IHC", "confidence": round(min(1.0, 0.5 + confidence / 2), 3),
                **result}
    cosine = max(float(second @ v) for v in (eosin, pas, DAB_OD))
    if not np.isfinite(eosin_share) or cosine < MIN_CHROMOGEN_COSINE:
        return {"label": "unknown", "confidence": 0.0, **result}
    margin = eosin_share - EOSIN_SHARE_THRESHOLD
    confidence = round(min(1.0, abs(margin) / 0.3), 3)
    if abs(margin) < EOSIN_SHARE_BAND:
        return {"label": "unknown", "confidence": confidence, **result}
    return {"label": "H&E" if margin > 0 else "PAS", "confidence": confidence, **result}


def _round(value: float) -> float | None:
    return round(value, 4) if np.isfinite(value) else None
