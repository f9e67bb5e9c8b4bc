"""Tissue detection on a low-resolution thumbnail, and the tile grid that covers it.

Marker ink is found first, by colour, and set aside: histological stains (H&E, PAS) are
pink to purple (hue ~250-345 deg), whereas pens are green/blue (hue 70-245 deg), pure red
(hue 345-20 deg, more saturated than eosin) or black. The tissue thresholds (saturation
and optical density, Otsu) are then learnt from the pixels that are not ink, so a slide
covered in ink still gets thresholds that separate its tissue from its glass. Every
morphological threshold is physical (um, um2) and holes are filled only when they are
enclosed by tissue and small beside it and beside the field, so the result does not depend
on the scan resolution or on the field's size.

>>> thumb = slide.thumbnail(mpp=8.0)                                   # doctest: +SKIP
>>> result = detect_tissue(thumb, mpp=8.0)                             # doctest: +SKIP
>>> grid = tile_grid(result.mask, 8.0, slide.size_um, tile_um=256.0)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology
from skimage.filters import rank


@dataclass(frozen=True)
class TissueParams:
    """Thresholds of tissue detection, all physical (um, um2) or colorimetric.

    Saturation is HSV saturation (0..1); OD is optical density, -ln(I / 256), averaged over
    R, G and B unless said otherwise (plain glass ~0.05-0.1, stained tissue 0.2-1.2).
    """

    # Tissue = saturated and absorbing. The automatic (Otsu) thresholds are bounded: from
    # below so that blank glass (saturation ~0.01-0.04) is never split into 'tissue' and
    # 'glass'; from above so that a field of tissue only is not split into light and dark
    # tissue (pale stroma on a thumbnail: saturation ~0.1-0.2, OD ~0.15-0.3).
    min_saturation: float = 0.06
    min_od: float = 0.06
    max_saturation: float = 0.15
    max_od: float = 0.25
    smooth_um: float = 16.0          # median filter radius before thresholding
    close_um: float = 24.0           # closing radius: joins cells of one fragment
    # Smaller objects are dust or debris (~70 um square), unless the field itself is that
    # small (a crop of a few cells): then objects under 2% of the field are.
    min_object_um2: float = 5_000.0
    min_object_field_fraction: float = 0.02
    # Holes (fat, lumina) count as tissue when enclosed by tissue and no larger than this,
    # than the tissue around them (ratio), and than this fraction of the field: glass that a
    # small field (a 0.5 mm tile) shows beside its tissue stays glass.
    max_hole_um2: float = 250_000.0
    max_hole_tissue_ratio: float = 1.0
    max_hole_field_fraction: float = 0.1
    fat_close_um: float = 40.0       # closes the faint membrane lattice of adipose tissue
    glass_od_margin: float = 0.03    # faint tissue absorbs at least this much more than glass
    faint_min_width_um: float = 32.0  # faint regions thinner than this are edge halo
    # Marker ink, read on the image blurred by ink_smooth_um (so that single nuclei and
    # JPEG noise do not count). Stains (H&E, PAS) are pink to purple, hue ~250-345 deg.
    # Green, teal and blue markers: hue 70-245 deg. Red markers: hue 345-20 deg and
    # saturated (eosin at that hue is paler; red blood cells are not, but come in objects
    # far smaller than a pen stroke).
    ink_smooth_um: float = 4.0
    cool_ink_hue_deg: tuple[float, float] = (70.0, 245.0)
    cool_ink_min_saturation: float = 0.2
    red_ink_hue_deg: tuple[float, float] = (345.0, 20.0)  # wraps through 0 deg
    red_ink_min_saturation: float = 0.45
    # Dark ink: darker than dark_max_rgb in every channel; or dark (OD >= ink_dark_od, i.e.
    # transmitting < 37%) and either grey (black marker: saturation < black_max_saturation,
    # where tissue that dark is purple, saturation ~0.45-0.65 on every real fixture) or
    # smooth (dark red-purple ink). Ink lies on the coverslip, out of the focal plane, so it
    # is smooth: its local OD standard deviation (over ~1.5 px) stays below ~0.025 on the
    # real pen fixtures, where tissue's is above ~0.03 from 0.5 to 60 um/px.
    dark_max_rgb: int = 50
    ink_dark_od: float = 1.0
    black_max_saturation: float = 0.25
    ink_max_texture: float = 0.02
    ink_min_um2: float = 1_250.0     # smaller specks are not a pen stroke (~35 um square)
    # An ink region extends (up to ink_grow_um) into smooth pixels of its colour family (hue
    # window widened by 10 deg) that are only faintly tinted (the out-of-focus fringe of
    # ink on the coverslip, the haze of glass beside it) or dark (overlapping inks); tissue
    # is textured, so a stroke that touches tissue does not grow into it. It also extends
    # into pixels darker than ink_over_tissue_od of any texture: ink over tissue absorbs
    # as both together. Tissue alone, blurred by 4 um, stays below it in > 99% of its
    # pixels on every real fixture (above: only the darkest epidermis of CMU-1, 0.7%).
    ink_grow_um: float = 120.0
    ink_grow_saturation: float = 0.08
    ink_over_tissue_od: float = 1.6
    pen_margin_um: float = 40.0      # tissue this close to ink is dropped with the ink


@dataclass
class TissueResult:
    """Outcome of `detect_tissue`: a boolean mask at ``mpp`` um/px and what was found."""

    mask: np.ndarray                 # (H, W) bool, True = tissue
    mpp: float
    pen: np.ndarray                  # (H, W) bool, marker ink and its margin (excluded)
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
    """Tissue mask of a thumbnail, marker ink excluded.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 thumbnail of the whole slide (or of a small field).
    mpp : its resolution in um/px.
    params : thresholds; default `TissueParams()`.

    Returns
    -------
    TissueResult with ``mask`` (H, W) bool (tissue), ``pen`` (H, W) bool (ink and its
    margin), the saturation and OD thresholds, and ``info["pen_fraction"]``.
    """
    p = params or TissueParams()
    rgb = np.asarray(rgb)[..., :3]
    px = lambda um: max(1, round(um / mpp))  # noqa: E731 - a unit conversion, read inline
    px2 = lambda um2: max(1, round(um2 / mpp**2))  # noqa: E731

    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)
    sat = median_disk(hue_saturation(rgb)[1], 1.0, px(p.smooth_um))
    od_s = median_disk(od, MAX_OD, px(p.smooth_um))

    ink = find_ink(rgb, mpp, p)
    pen = dilate_disk(ink, px(p.pen_margin_um))

    # Thresholds from the pixels that are not ink: ink that covers much of the slide would
    # otherwise make the Otsu split 'ink' against 'tissue and glass'.
    candidates = ~pen
    sat_thr = _otsu_bounded(sat[candidates], p.min_saturation, p.max_saturation)
    od_thr = _otsu_bounded(od_s[candidates], p.min_od, p.max_od)
    mask = (sat > sat_thr) & (od_s > od_thr) & candidates

    mask = erode_disk(dilate_disk(mask, px(p.close_um)), px(p.close_um))
    mask &= ~pen
    min_object_px = min(px2(p.min_object_um2), max(1, round(p.min_object_field_fraction * od.size)))
    mask = morphology.remove_small_objects(mask, max_size=min_object_px)

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
    mask = fill_holes(mask, px2(p.max_hole_um2), p.max_hole_tissue_ratio,
                      p.max_hole_field_fraction) & ~pen
    return TissueResult(mask=mask, mpp=mpp, pen=pen, saturation_threshold=float(sat_thr),
                        od_threshold=float(od_thr),
                        info={"pen_fraction": float(pen.mean()),
                              "ink_fraction": float(ink.mean()), "params": p.__dict__})


def find_ink(rgb: np.ndarray, mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Marker ink of every common colour (green, blue, red, black) in an RGB image.

    Confident ink (see `TissueParams`) in objects of at least ``ink_min_um2``, grown into
    faint or dark pixels of the same colour family nearby; no margin added.

    Returns
    -------
    (H, W) bool.
    """
    p = params or TissueParams()
    rgb = np.asarray(rgb)[..., :3]
    od_raw = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)
    mean = ndi.gaussian_filter(od_raw, 1.5)
    smooth = np.sqrt(ndi.gaussian_filter((od_raw - mean) ** 2, 1.5)) < p.ink_max_texture
    sigma = p.ink_smooth_um / mpp
    if sigma >= 0.5:
        rgb = np.stack([ndi.gaussian_filter(rgb[..., c].astype(np.float32), sigma)
                        for c in range(3)], axis=-1)
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    hue, sat = hue_saturation(rgb)

    cool = _in_hue(hue, p.cool_ink_hue_deg, 0.0)
    red = _in_hue(hue, p.red_ink_hue_deg, 0.0)
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)
    dark = od >= p.ink_dark_od
    seeds = {"cool": cool & (sat >= p.cool_ink_min_saturation),
             "red": red & (sat >= p.red_ink_min_saturation),
             "dark": (rgb.max(axis=-1) < p.dark_max_rgb)
             | (dark & (smooth | (sat < p.black_max_saturation)))}
    big = morphology.remove_small_objects(seeds["cool"] | seeds["red"] | seeds["dark"],
                                          max_size=max(1, round(p.ink_min_um2 / mpp**2)))
    if not big.any():
        return big
    # Smooth faint (tinted fringe) or dark (overlapping inks) pixels an ink region may grow
    # into, and very dark ones (ink over tissue) of any texture.
    tinted = sat >= p.ink_grow_saturation
    over = od >= p.ink_over_tissue_od
    loose = {"cool": ((_in_hue(hue, p.cool_ink_hue_deg, 10.0) & tinted) | dark) & smooth,
             "red": ((_in_hue(hue, p.red_ink_hue_deg, 10.0) & tinted) | dark) & smooth,
             "dark": dark & smooth}
    loose = {family: allowed | over for family, allowed in loose.items()}
    near = dilate_disk(big, max(1.0, p.ink_grow_um / mpp))
    ink = np.zeros_like(big)
    for family, seed in seeds.items():
        seed = seed & big
        if seed.any():
            ink |= _grow(seed, loose[family] & near)
    return ink


def hue_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue (degrees, 0..360) and saturation (0..1) of an RGB image, float32 (the values
    of ``skimage.color.rgb2hsv`` at a fraction of its cost)."""
    x = np.asarray(rgb, np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    top = np.maximum(np.maximum(r, g), b)
    delta = top - np.minimum(np.minimum(r, g), b)
    with np.errstate(invalid="ignore", divide="ignore"):
        sat = np.where(delta > 0, delta / top, 0.0).astype(np.float32)
        d = np.where(delta > 0, delta, 1.0)
        hue = np.select([b == top, g == top], [4.0 + (r - g) / d, 2.0 + (b - r) / d],
                        (g - b) / d)
    hue = np.where(delta > 0, (hue * 60.0) % 360.0, 0.0).astype(np.float32)
    return hue, sat


def _in_hue(hue_deg: np.ndarray, window: tuple[float, float], widen: float) -> np.ndarray:
    """Whether hue lies in [lo - widen, hi + widen) degrees; a window with lo > hi wraps
    through 0."""
    lo, hi = (window[0] - widen) % 360.0, (window[1] + widen) % 360.0
    if lo <= hi:
        return (hue_deg >= lo) & (hue_deg < hi)
    return (hue_deg >= lo) | (hue_deg < hi)


def _grow(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``seed`` plus the components of ``seed | allowed`` that touch it."""
    labels, _ = ndi.label(seed | allowed)
    keep = np.unique(labels[seed])
    return np.isin(labels, keep[keep > 0])


def fill_holes(mask: np.ndarray, max_px: float, tissue_ratio: float,
               field_fraction: float) -> np.ndarray:
    """``mask`` with its holes filled: background components enclosed by one tissue object
    (not touching the image border) of at most ``max_px`` pixels, at most ``tissue_ratio``
    times that object's tissue area and at most ``field_fraction`` of the image."""
    filled = ndi.binary_fill_holes(mask)
    holes = filled & ~mask
    if not holes.any():
        return mask
    hole_labels, n = ndi.label(holes)
    object_labels, _ = ndi.label(filled)
    hole_area = np.bincount(hole_labels.ravel(), minlength=n + 1)[1:]
    tissue_area = np.bincount(object_labels.ravel(), weights=mask.ravel())
    _, first = np.unique(hole_labels.ravel(), return_index=True)
    around = tissue_area[object_labels.ravel()[first[1:]]]   # first[0] is the background
    limit = min(max_px, field_fraction * mask.size)
    fill = (hole_area <= limit) & (hole_area <= tissue_ratio * around)
    return mask | np.isin(hole_labels, np.flatnonzero(fill) + 1)


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


def _otsu_bounded(values: np.ndarray, floor: float, ceiling: float) -> float:
    """Otsu threshold of ``values`` clipped to [``floor``, ``ceiling``]: blank glass has no
    bimodality to split, nor has a field of tissue only."""
    if values.size == 0 or values.max() - values.min() < 1e-6:
        return floor
    return float(np.clip(filters.threshold_otsu(values), floor, ceiling))


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
