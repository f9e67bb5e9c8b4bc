"""Tissue detection on a low-resolution thumbnail, and the tile grid that covers it.

Tissue is told from glass by colour saturation and optical density (stained tissue absorbs
light, glass does not); marker pen is told from stain by hue (H&E and PAS are pink to
purple, pens are blue, green or black). Every morphological threshold is physical
(um, um2), so the result does not depend on the scan resolution.

>>> thumb = slide.thumbnail(mpp=8.0)                                   # doctest: +SKIP
>>> result = detect_tissue(thumb, mpp=8.0)                             # doctest: +SKIP
>>> grid = tile_grid(result.mask, 8.0, slide.size_um, tile_um=256.0)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage import color, filters, morphology
from skimage.filters import rank


@dataclass(frozen=True)
class TissueParams:
    """Thresholds of tissue detection, all physical.

    min_saturation / min_od bound the automatic (Otsu) thresholds from below so that blank
    glass is never split into 'tissue' and 'glass'.
    """

    min_saturation: float = 0.06     # HSV saturation, 0..1
    min_od: float = 0.06             # mean optical density over RGB
    smooth_um: float = 16.0          # median filter radius before thresholding
    close_um: float = 24.0           # closing radius: joins cells of one fragment
    min_object_um2: float = 5_000.0  # smaller objects are dust or debris (~70 um square)
    max_hole_um2: float = 250_000.0  # holes smaller than this (fat, lumina) count as tissue
    fat_close_um: float = 40.0       # closes the faint membrane lattice of adipose tissue
    glass_od_margin: float = 0.03    # faint tissue absorbs at least this much more than glass
    faint_min_width_um: float = 32.0  # faint regions thinner than this are edge halo
    pen_margin_um: float = 40.0      # tissue this close to ink is dropped with the ink
    pen_min_saturation: float = 0.25
    dark_max_rgb: int = 50           # darker than this in every channel: black ink / debris


@dataclass
class TissueResult:
    """Outcome of `detect_tissue`: a boolean mask at ``mpp`` um/px and what was found."""

    mask: np.ndarray                 # (H, W) bool, True = tissue
    mpp: float
    pen: np.ndarray                  # (H, W) bool, marker ink detected (excluded)
    saturation_threshold: float
    od_threshold: float
    info: dict = field(default_factory=dict)

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp / 1000.0) ** 2


def thumbnail_mpp(size_um: tuple[float, float], slide_mpp: float) -> float:
    """MPP for tissue detection: ~8-16 um/px, finer (down to the scan MPP) for small slides
    so that the thumbnail keeps at least ~512 px along its long side."""
    long_um = max(size_um)
    mpp = float(np.clip(long_um / 2048.0, 8.0, 16.0))
    if long_um / mpp < 512:
        mpp = max(slide_mpp, long_um / 512.0)
    return mpp


def detect_tissue(rgb: np.ndarray, mpp: float, params: TissueParams | None = None) -> TissueResult:
    """Tissue mask of a thumbnail.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 thumbnail of the whole slide.
    mpp : its resolution in um/px.

    Returns
    -------
    TissueResult with ``mask`` (H, W) bool.
    """
    p = params or TissueParams()
    px = lambda um: max(1, round(um / mpp))  # noqa: E731 - a unit conversion, read inline
    px2 = lambda um2: max(1, round(um2 / mpp**2))  # noqa: E731

    hsv = color.rgb2hsv(rgb)
    hue_deg, sat = hsv[..., 0] * 360.0, hsv[..., 1]
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)
    sat = median_disk(sat, 1.0, px(p.smooth_um))
    od_s = median_disk(od, MAX_OD, px(p.smooth_um))

    # Marker ink: blue/green hues with clear saturation, or near-black pixels.
    ink = ((hue_deg > 80) & (hue_deg < 265) & (hsv[..., 1] > p.pen_min_saturation)) | (
        rgb.max(axis=-1) < p.dark_max_rgb)
    ink = morphology.remove_small_objects(ink, max_size=px2(p.min_object_um2 / 4))
    pen = dilate_disk(ink, px(p.pen_margin_um))

    candidates = ~pen
    sat_thr = _otsu_floor(sat[candidates], p.min_saturation)
    od_thr = _otsu_floor(od_s[candidates], p.min_od)
    mask = (sat > sat_thr) & (od_s > od_thr) & candidates

    mask = erode_disk(dilate_disk(mask, px(p.close_um)), px(p.close_um))
    mask &= ~pen
    mask = morphology.remove_small_objects(mask, max_size=px2(p.min_object_um2))

    # Fat is white cells framed by thin stained membranes: too faint for the thresholds
    # above, so the faint lattice is closed and kept where it touches stained tissue.
    # "Faint" = absorbing clearly more than this slide's own glass.
    faint = (od > _glass_od_ceiling(od, mask | pen, p.glass_od_margin)) & ~pen
    r = px(p.fat_close_um)
    lattice = erode_disk(dilate_disk(faint | mask, r), r) & ~pen
    # An opening drops the thin halo that blur and JPEG ringing leave around every edge.
    r = px(p.faint_min_width_um / 2)
    lattice = dilate_disk(erode_disk(lattice & ~mask, r), r)
    lattice_labels, _ = ndi.label(lattice | mask)
    keep = np.unique(lattice_labels[mask])
    mask |= np.isin(lattice_labels, keep[keep > 0])
    mask = morphology.remove_small_holes(mask, max_size=px2(p.max_hole_um2))
    return TissueResult(mask=mask, mpp=mpp, pen=pen, saturation_threshold=float(sat_thr),
                        od_threshold=float(od_thr),
                        info={"pen_fraction": float(pen.mean()), "params": p.__dict__})


MAX_OD = 3.0  # optical densities above this are black: clipped before smoothing


def median_disk(values: np.ndarray, top: float, radius_px: int) -> np.ndarray:
    """Median of ``values`` (H, W) in [0, ``top``] over a disk of ``radius_px``, computed
    on 1024 levels (steps of ``top`` / 1023) by skimage's histogram rank filter, whose cost
    grows with the radius rather than with the disk's area; float32."""
    levels = np.round(np.clip(values, 0.0, top) * (1023 / top)).astype(np.uint16)
    smooth = rank.median(levels, morphology.disk(radius_px))
    return smooth.astype(np.float32) * np.float32(top / 1023)


def dilate_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary dilation of ``mask`` by a disk of ``radius_px`` (the same pixels as
    ``morphology.dilation(mask, morphology.disk(r))``), from a distance transform, so its
    cost does not grow with the radius."""
    return ndi.distance_transform_edt(~mask) <= radius_px if mask.any() else mask.copy()


def erode_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary erosion by a disk (outside the image counts as foreground, as in
    ``morphology.erosion``); see `dilate_disk`."""
    return ndi.distance_transform_edt(mask) > radius_px if not mask.all() else mask.copy()


def _glass_od_ceiling(od: np.ndarray, not_glass: np.ndarray, margin: float) -> float:
    """Highest optical density plain glass reaches on this slide: the median of the
    pixels outside tissue and ink plus 6 robust SDs (MAD), and at least ``margin``."""
    glass = od[~not_glass]
    if glass.size < 100:
        return float("inf")  # no glass to learn from: add no faint tissue
    median = float(np.median(glass))
    mad = float(np.median(np.abs(glass - median)))
    return median + max(6 * 1.4826 * mad, margin)


def _otsu_floor(values: np.ndarray, floor: float) -> float:
    """Otsu threshold of ``values``, never below ``floor`` (blank glass has no bimodality)."""
    if values.size == 0 or np.ptp(values) < 1e-6:
        return floor
    return max(float(filters.threshold_otsu(values)), floor)


def tile_grid(mask: np.ndarray, mask_mpp: float, size_um: tuple[float, float], tile_um: float,
              min_fraction: float = 0.05) -> np.ndarray:
    """Tiles of a regular grid that cover tissue.

    The grid starts at the slide origin with square tiles of ``tile_um`` microns; a tile is
    kept when at least ``min_fraction`` of its area is tissue.

    Returns
    -------
    (N, 2) int32 array of (row, col) grid indices, row-major order. A tile's top-left
    corner is at (col * tile_um, row * tile_um) um.
    """
    fraction = tile_coverage(mask, mask_mpp, size_um, tile_um)
    rows, cols = np.nonzero(fraction >= min_fraction)
    return np.stack([rows, cols], axis=1).astype(np.int32)


def tile_coverage(mask: np.ndarray, mask_mpp: float, size_um: tuple[float, float],
                  tile_um: float) -> np.ndarray:
    """Tissue fraction (0..1) of every tile of the grid, shape (n_rows, n_cols)."""
    n_cols = max(1, int(np.ceil(size_um[0] / tile_um)))
    n_rows = max(1, int(np.ceil(size_um[1] / tile_um)))
    h, w = mask.shape
    # Each mask pixel votes for the tile its centre falls in.
    col_of = np.minimum(((np.arange(w) + 0.5) * mask_mpp / tile_um).astype(np.int64), n_cols - 1)
    row_of = np.minimum(((np.arange(h) + 0.5) * mask_mpp / tile_um).astype(np.int64), n_rows - 1)
    cell = row_of[:, None] * n_cols + col_of[None, :]
    total = np.bincount(cell.ravel(), minlength=n_rows * n_cols)
    tissue = np.bincount(cell.ravel(), weights=mask.ravel().astype(np.float64),
                         minlength=n_rows * n_cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(total > 0, tissue / np.maximum(total, 1), 0.0)
    return frac.reshape(n_rows, n_cols)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks of the same shape (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * (a & b).sum() / denom)
