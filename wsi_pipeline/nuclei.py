"""Classical lymphocyte detection on the haematoxylin channel, and dense-aggregate finding.

Weight-free building blocks of the `fls` task (focal lymphocytic sialadenitis):

* `haematoxylin`: colour deconvolution with the slide's own two-stain matrix (Beer-Lambert
  OD, pseudo-inverse of the fitted (2, 3) matrix, clipped at 0).
* `detect_lymphocytes`: small, round, dark nuclei, in absolute haematoxylin concentration
  (OD units; never relative to a tile's or slide's maximum, which dye or debris can set).
  1. Candidates: peaks of the scale-normalised Laplacian of Gaussian (LoG) of the
     haematoxylin image at a radius just below the smallest lymphocyte (sigma = r / sqrt 2),
     so that touching nuclei in dense foci still give one peak each; non-maximum
     suppression at `min_distance_um`.
  2. Darkness: the darkest placement, within `centre_search_um` of the peak, of a disc of
     the smallest lymphocyte radius: a matched filter that both re-centres the nucleus and
     requires it to be at least that wide and dark throughout.
  3. Prominence: that darkness minus the lower quartile of the haematoxylin in a ring
     around the disc; colour: OD red / OD green of the disc, which rejects blue-green
     marking dye and ink whatever the fitted matrix says (`LymphocyteParams`).
  4. Shape: the blob's characteristic radius (sqrt 2 x the scale of its strongest
     normalised LoG response, Lindeberg 1998) bounds the nucleus size from above; the
     Hessian eigenvalue ratio at that scale (roundness) drops bands and spindles.
  5. Hysteresis: candidates nearly that dark are kept too when they lie among dark ones
     (inside an aggregate nuclei are often cut off-centre or blurred by their neighbours).
  `lymphocyte_candidates` measures, `select_lymphocytes` applies the rules (so a
  calibration measures once and tries many thresholds).
* `detect_lymphocytes_in_region`: the same over a slide region, tile by tile with margins,
  each nucleus found exactly once.
* `find_aggregates`: dense aggregates of detected lymphocytes (DBSCAN on their centres),
  each with its outline polygon and area; by default only those holding >= 50 lymphocytes,
  the focus definition of the 2016 ACR/EULAR criteria for Sjogren's syndrome.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from wsi_pipeline.errors import UsageError
from wsi_pipeline.stain import StainFit, rgb_to_od

if TYPE_CHECKING:
    from wsi_pipeline.slide import Slide

__all__ = [
    "REAL_HE",
    "AggregateParams",
    "LymphocyteParams",
    "detect_lymphocytes",
    "detect_lymphocytes_in_region",
    "detection_context_um",
    "find_aggregates",
    "haematoxylin",
    "lymphocyte_candidates",
    "match_points",
    "select_lymphocytes",
]

_SQRT2 = math.sqrt(2.0)
_RECENTRE_STEPS = 2
_SHAPE_SCALE_MAX = 1.3  # scale space sampled up to this factor above the max radius


# --------------------------------------------------------------------------- haematoxylin


def _haematoxylin_tables(stain: StainFit) -> np.ndarray:
    """(3, 256) float32: haematoxylin contribution of each 8-bit value of R, G and B.

    Deconvolution is linear in OD, so H = T[0][R] + T[1][G] + T[2][B] with T[ch][v] =
    pinv(M)[ch, 0] * OD(v): three gathers per pixel instead of a (N, 3) @ (3, 2) product.
    """
    pinv = np.linalg.pinv(stain.matrix.astype(np.float64))  # (3, 2): OD row @ pinv = (H, E)
    od = rgb_to_od(np.arange(256, dtype=np.uint8)).astype(np.float64)  # (256,)
    return (pinv[:, 0:1] * od[None, :]).astype(np.float32)


def haematoxylin(rgb: np.ndarray, stain: StainFit) -> np.ndarray:
    """Haematoxylin concentration of each pixel: (H, W, 3) uint8 -> (H, W) float32 >= 0.

    Colour deconvolution with the slide's own stain matrix: OD = -ln(max(I, 1) / 255) per
    channel, concentrations = OD @ pinv(matrix) (least squares over the two stains), the
    haematoxylin column clipped at 0. Units: OD units of the unit-norm haematoxylin vector,
    the same scale as `stain.max_conc[0]`.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise UsageError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    tables = _haematoxylin_tables(stain)
    h = tables[0][rgb[..., 0]]
    h += tables[1][rgb[..., 1]]
    h += tables[2][rgb[..., 2]]
    return np.maximum(h, np.float32(0.0), out=h)


# --------------------------------------------------------------------------- lymphocytes


@dataclass(frozen=True)
class LymphocyteParams:
    """Physical rules of the lymphocyte detector: lengths in um, darkness in absolute
    haematoxylin concentration (OD units of the slide's unit-norm haematoxylin vector, see
    `haematoxylin`); never relative to a tile's or slide's maximum, which marking dye, ink
    or debris can set.

    radius_um: (min, max) nucleus radius. A disc of the min radius, placed on the
        candidate, is the matched filter whose mean haematoxylin is the nucleus' darkness:
        a smaller or thinner nucleus takes in its paler surround. The max bounds the
        blob's characteristic radius (sqrt 2 x the scale of its strongest normalised LoG
        response), dropping large nuclei.
    detect_radius_um: radius of the LoG that proposes candidates (sigma = r / sqrt 2);
        below the smallest lymphocyte so that touching nuclei in dense foci give separate
        peaks.
    min_distance_um: least distance between two detected centres.
    min_response: least normalised LoG response of a candidate (OD units).
    centre_search_um: the darkness disc may move this far from the LoG peak (re-centring
        the nucleus; peaks of crowded nuclei are pushed off centre by their neighbours).
    min_darkness: least mean haematoxylin over that disc (OD units): the dense chromatin
        of a lymphocyte.
    min_prominence: least excess of that darkness over the lower quartile of the
        haematoxylin in the surround ring (OD units): a lymphocyte stands out against a
        pale gap somewhere around it, even in a packed focus, while a dark clump inside a
        larger nucleus, or a dark patch of tissue, does not.
    surround_um: (inner, outer) distance of that ring beyond the disc's edge.
    max_red_green: most OD_red / OD_green of the disc's mean colour: haematoxylin and eosin
        absorb green at least as much as red (Macenko's reference haematoxylin 0.78,
        Ruifrok's 0.93, eosin ~0.3; lymphocytes on real H&E 0.55-0.85), the blue-green
        tissue-marking dye and blue, green or black ink absorb more red (1.0-3.2). A check on
        the colour itself, not the fitted matrix, since dye in the sampled tissue pulls the
        slide's own haematoxylin vector towards it (CMU-1-Small-Region: 1.49).
    cluster_darkness, cluster_radius_um, cluster_neighbours: hysteresis. A candidate
        darker than cluster_darkness (but not min_darkness) that passes the other rules is
        a lymphocyte too when at least cluster_neighbours lymphocytes passing min_darkness
        lie within cluster_radius_um: inside an aggregate, nuclei sectioned off their
        equator or blurred by their neighbours look paler than isolated ones.
    cluster_size, cluster_any_shape: a candidate with cluster_neighbours lymphocytes near
        may be up to cluster_size times radius_um[1] and (cluster_any_shape) of any
        roundness: packed nuclei are squeezed out of round and their LoG scale blurs into
        their neighbours' (synthetic fls foci: 7 of 55 lymphocytes were lost to shape).
    min_roundness: least ratio of the smaller to the larger Hessian eigenvalue at the
        blob's scale (1 = round; a band or spindle ~0). Low, because crowding in foci
        distorts it, but not 0: on CMU-1-Small-Region thin dark keratin lamellae otherwise
        pass and form false foci.

    The defaults are the constants that keep the synthetic fls slides' targets (P and R
    >= 0.8) and, within that, do best on real H&E (MoNuSAC, leave-slides-out: see
    benchmarks/bench_nuclei.py --real and `REAL_HE`).
    """

    radius_um: tuple[float, float] = (2.5, 4.0)
    detect_radius_um: float = 2.0
    min_distance_um: float = 2.5
    min_response: float = 0.2
    centre_search_um: float = 1.0
    min_darkness: float = 2.1
    min_prominence: float = 0.4
    surround_um: tuple[float, float] = (1.0, 3.0)
    max_red_green: float = 1.0
    cluster_darkness: float = 1.1
    cluster_radius_um: float = 10.0
    cluster_neighbours: int = 3
    min_roundness: float = 0.1
    cluster_size: float = 1.35
    cluster_any_shape: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.radius_um
        if not 0 < lo < hi:
            raise UsageError(f"radius_um must be (min, max) with 0 < min < max, got "
                             f"{self.radius_um}")
        inner, outer = self.surround_um
        if not 0 <= inner < outer:
            raise UsageError(f"surround_um must be (inner, outer) with 0 <= inner < outer, "
                             f"got {self.surround_um}")
        for name in ("detect_radius_um", "min_distance_um", "cluster_radius_um",
                     "max_red_green"):
            if not getattr(self, name) > 0:
                raise UsageError(f"LymphocyteParams.{name} must be > 0")
        if self.centre_search_um < 0 or self.cluster_neighbours < 1:
            raise UsageError("LymphocyteParams: centre_search_um must be >= 0 and "
                             "cluster_neighbours >= 1")


# Calibrated on real H&E alone (MoNuSAC, 12 TCGA slides; the thresholds chosen on all of
# them by benchmarks/bench_nuclei.py --real, whose leave-one-slide-out figures are the
# honest ones): a smaller darkness disc for the ~4.6 um nuclear profiles of real
# lymphocytes, a tighter size bound and more prominence. Not the default: on the synthetic
# fls slides, whose lymphocytes are 7 um across and whose acinar nuclei are the size and
# darkness of real lymphocytes, it misses the lymphocytes and takes the acinar nuclei.
REAL_HE = LymphocyteParams(radius_um=(2.0, 2.6), detect_radius_um=1.75, min_darkness=1.8,
                           min_prominence=1.25, cluster_darkness=0.6, cluster_neighbours=2,
                           min_roundness=0.2, cluster_size=1.0, cluster_any_shape=False)


def _grid(half: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) integer offsets -half..half on a square grid, float64."""
    d = np.arange(-half, half + 1, dtype=np.float64)
    return np.meshgrid(d, d, indexing="ij")


def _patches(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, half: int) -> np.ndarray:
    """(N, (2 half + 1)^2) float64 copies of the image around (rows, cols), edges
    reflected."""
    padded = np.pad(image, half, mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * half + 1, 2 * half + 1))
    return windows[rows, cols].reshape(len(rows), (2 * half + 1) ** 2).astype(np.float64)


def _filter_patches(patches: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """patches (N, K) @ kernels (M, K).T, rounded to 1e-9: BLAS may sum in another order
    for another N, and a detection must not depend on which tile (with how many other
    candidates) it was measured in."""
    return np.round(patches @ kernels.T, 9)


def _log_response(h: np.ndarray, sigma_px: float) -> np.ndarray:
    """Scale-normalised -LoG of h (dark blobs positive): Gaussian, then the 5-point
    Laplacian (half the cost of scipy's gaussian_laplace, same values within ~1 %)."""
    g = ndi.gaussian_filter(h, sigma_px, truncate=3.0, mode="reflect")
    lap = np.pad(g, 1, mode="edge")
    out = lap[:-2, 1:-1] + lap[2:, 1:-1]
    out += lap[1:-1, :-2]
    out += lap[1:-1, 2:]
    out -= 4.0 * g
    out *= np.float32(-(sigma_px**2))
    return out


def _local_maxima(image: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of pixels above threshold and >= their 8 neighbours."""
    padded = np.pad(image, 1, mode="constant", constant_values=-np.inf)
    h, w = image.shape
    peak = image > threshold
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy != 1 or dx != 1:
                peak &= image >= padded[dy:dy + h, dx:dx + w]
    return np.nonzero(peak)


def _suppress(y: np.ndarray, x: np.ndarray, score: np.ndarray,
              min_dist_px: float) -> np.ndarray:
    """Non-maximum suppression: bool mask of the points with no better-scoring point closer
    than min_dist_px (ties: the first in raster order wins). Unlike greedy NMS a point
    suppressed itself still suppresses, so no chain of suppressions runs through a dense
    focus and a detection depends only on its neighbourhood (not on the tile)."""
    from scipy.spatial import cKDTree

    keep = np.ones(len(y), bool)
    if len(y) < 2:
        return keep
    pairs = cKDTree(np.stack([y, x], axis=1)).query_pairs(min_dist_px - 1e-9,
                                                          output_type="ndarray")
    if not len(pairs):
        return keep
    # raster order breaks ties the same way in any tile
    order = np.lexsort((x, y, -score))
    rank = np.empty(len(y), np.intp)
    rank[order] = np.arange(len(y))
    worse = np.where(rank[pairs[:, 0]] > rank[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
    keep[worse] = False
    return keep


def _best_disc(
    h: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius_px: float, search_px: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Darkest placement of a disc of `radius_px` within `search_px` of each (row, col).

    Returns (mean of h over the disc there, row and col offsets in px (fractional)) per
    point: a matched filter for a dark nucleus of at least that radius, which also
    re-centres the point.
    """
    search = int(math.floor(search_px + 1e-9))
    half = int(math.ceil(radius_px)) + search
    y, x = _grid(half)
    offsets = np.array([(dy, dx) for dy in range(-search, search + 1)
                        for dx in range(-search, search + 1)
                        if dy * dy + dx * dx <= search_px**2 + 1e-9], np.intp)
    discs = np.stack([((y - dy) ** 2 + (x - dx) ** 2 <= radius_px**2 + 1e-9).ravel()
                      for dy, dx in offsets]).astype(np.float64)
    discs /= discs.sum(axis=1, keepdims=True)
    means = _filter_patches(_patches(h, rows, cols, half), discs)  # (N, offsets)
    best = means.max(axis=1, initial=0.0)
    # centre: mean of the placements within 1 % of the best (a flat nucleus has many)
    near = means >= 0.99 * best[:, None]
    n_near = np.maximum(near.sum(axis=1), 1)
    return best, near @ offsets[:, 0] / n_near, near @ offsets[:, 1] / n_near


def _shape(
    h: np.ndarray, rows: np.ndarray, cols: np.ndarray, mpp: float, params: LymphocyteParams
) -> tuple[np.ndarray, np.ndarray]:
    """Characteristic radius (um) and Hessian roundness of the blobs at (rows, cols) of h.

    The normalised -LoG (sigma^2 times the negated Laplacian of the Gaussian-smoothed
    image) is sampled at radii r = sqrt 2 sigma in ~15 % steps from below the smallest to
    above the largest accepted radius; the best scale is refined by a parabola in log r.
    """
    lo = min(params.radius_um[0], params.detect_radius_um) / 1.5
    hi = params.radius_um[1] * _SHAPE_SCALE_MAX
    radii_um = np.geomspace(lo, hi, max(3, int(math.ceil(math.log(hi / lo) / 0.14)) + 1))
    sigmas = radii_um / mpp / _SQRT2
    y, x = _grid(int(math.ceil(3.0 * sigmas.max())))
    s2 = (sigmas**2)[:, None, None]
    g = np.exp(-(x * x + y * y)[None] / (2 * s2))
    g /= g.sum(axis=(1, 2), keepdims=True)
    kernels = np.concatenate([-(x * x / s2 - 1.0) * g, -(y * y / s2 - 1.0) * g,
                              -(x * y / s2) * g])  # -sigma^2 Gxx, Gyy, Gxy at every scale
    # sampling and truncation leave a small sum; remove it within each Gaussian's footprint
    kernels -= np.tile(g, (3, 1, 1)) * kernels.sum(axis=(1, 2), keepdims=True)
    n = len(radii_um)
    patches = _patches(h, rows, cols, y.shape[0] // 2)
    hxx, hyy, hxy = np.split(_filter_patches(patches, kernels.reshape(3 * n, -1)), 3, axis=1)
    log = hxx + hyy  # (N, scales)
    best = np.argmax(log, axis=1)
    at = np.arange(len(rows))
    i = np.clip(best, 1, n - 2)
    y0, y1, y2 = log[at, i - 1], log[at, i], log[at, i + 1]
    curv = y0 - 2 * y1 + y2
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where((best == i) & (curv < 0), 0.5 * (y0 - y2) / curv, 0.0)
    step = math.log(radii_um[1] / radii_um[0])
    radius = radii_um[best] * np.exp(np.clip(shift, -0.5, 0.5) * step)
    a, b, c = hxx[at, best], hyy[at, best], hxy[at, best]
    mean, diff = 0.5 * (a + b), np.sqrt(0.25 * (a - b) ** 2 + c * c)
    roundness = np.clip(mean - diff, 0, None) / np.maximum(mean + diff, 1e-12)
    return radius, roundness


def _disc_kernel(radius_px: float, half: int) -> np.ndarray:
    """(1, (2 half + 1)^2) float64: the mean over a centred disc of radius_px."""
    y, x = _grid(half)
    disc = (y * y + x * x <= radius_px**2 + 1e-9).ravel().astype(np.float64)
    return (disc / disc.sum())[None]


def _surround(h: np.ndarray, rows: np.ndarray, cols: np.ndarray, inner_px: float,
              outer_px: float) -> np.ndarray:
    """Lower quartile of h over the ring inner_px..outer_px around each (row, col)."""
    half = int(math.ceil(outer_px))
    y, x = _grid(half)
    d2 = (y * y + x * x).ravel()
    ring = (d2 >= inner_px**2 - 1e-9) & (d2 <= outer_px**2 + 1e-9)
    return np.quantile(_patches(h, rows, cols, half)[:, ring], 0.25, axis=1)


def lymphocyte_candidates(
    rgb: np.ndarray,
    mpp: float,
    stain: StainFit,
    params: LymphocyteParams = LymphocyteParams(),  # noqa: B008 (frozen dataclass)
    *,
    mask: np.ndarray | None = None,
    measure_all: bool = False,
) -> dict[str, np.ndarray]:
    """Candidate nuclei of an RGB tile with the measurements `select_lymphocytes` applies.

    Returns arrays of equal length: x_um, y_um (centres from the tile's top-left corner),
    darkness, prominence (OD units), red_green, radius_um, roundness. The shape
    (radius_um, roundness) is measured only where darkness >= min(min_darkness,
    cluster_darkness), prominence >= min_prominence and red_green <= max_red_green (NaN
    elsewhere), or everywhere with measure_all (for calibration: the shape is most of the
    cost). See `detect_lymphocytes` for the arguments.
    """
    if not mpp > 0:
        raise UsageError(f"mpp must be > 0, got {mpp}")
    h = haematoxylin(rgb, stain)
    min_dist_px = params.min_distance_um / mpp
    r0_px = params.radius_um[0] / mpp
    response = _log_response(h, params.detect_radius_um / _SQRT2 / mpp)
    rows, cols = _local_maxima(response, params.min_response)
    keep = _suppress(rows, cols, response[rows, cols], min_dist_px)
    rows, cols = rows[keep], cols[keep]
    if mask is not None and len(rows):
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2:
            raise UsageError(f"mask must be 2-D, got shape {mask.shape}")
        mr = np.minimum((rows + 0.5) * mask.shape[0] / h.shape[0], mask.shape[0] - 1)
        mc = np.minimum((cols + 0.5) * mask.shape[1] / h.shape[1], mask.shape[1] - 1)
        keep = mask[mr.astype(np.intp), mc.astype(np.intp)]
        rows, cols = rows[keep], cols[keep]
    # a LoG peak below the nucleus scale sits near the nucleus edge (flat chromatin gives
    # a ring of them): move each to the middle of its darkest disc placements, twice
    y, x = rows.astype(np.float64), cols.astype(np.float64)
    darkness = np.zeros(0)
    for _ in range(_RECENTRE_STEPS):
        # round half up, not to even: the same nucleus must land on the same pixel
        # whatever the parity of its position in the tile
        r = np.clip(np.floor(y + 0.5), 0, h.shape[0] - 1).astype(np.intp)
        c = np.clip(np.floor(x + 0.5), 0, h.shape[1] - 1).astype(np.intp)
        darkness, dr, dc = _best_disc(h, r, c, r0_px, params.centre_search_um / mpp)
        y = np.clip(r + dr, 0, h.shape[0] - 1)  # fractional pixel positions
        x = np.clip(c + dc, 0, h.shape[1] - 1)
    # re-centring can bring two peaks of one nucleus together: keep the darker
    keep = _suppress(y, x, darkness, min_dist_px)
    y, x, darkness = y[keep], x[keep], darkness[keep]
    rows = np.floor(y + 0.5).astype(np.intp)
    cols = np.floor(x + 0.5).astype(np.intp)

    inner, outer = params.surround_um
    prominence = darkness - _surround(h, rows, cols, r0_px + inner / mpp,
                                      r0_px + outer / mpp)
    # the colour of the disc at the nucleus centre: mean OD in red and green
    half = int(math.ceil(r0_px))
    disc = _disc_kernel(r0_px, half)
    od = rgb_to_od(np.asarray(rgb)[..., :2])
    od_red = _filter_patches(_patches(od[..., 0], rows, cols, half), disc)[:, 0]
    od_green = _filter_patches(_patches(od[..., 1], rows, cols, half), disc)[:, 0]
    red_green = od_red / np.maximum(od_green, 1e-6)

    n = len(y)
    f = {"x_um": (x + 0.5) * mpp, "y_um": (y + 0.5) * mpp, "darkness": darkness,
         "prominence": prominence, "red_green": red_green,
         "radius_um": np.full(n, np.nan), "roundness": np.full(n, np.nan)}
    todo = np.ones(n, bool) if measure_all else (
        (darkness >= min(params.min_darkness, params.cluster_darkness))
        & (prominence >= params.min_prominence) & (red_green <= params.max_red_green))
    if todo.any():
        f["radius_um"][todo], f["roundness"][todo] = _shape(h, rows[todo], cols[todo], mpp,
                                                            params)
    return f


def select_lymphocytes(f: dict[str, np.ndarray], params: LymphocyteParams) -> np.ndarray:
    """Bool mask of the candidates (`lymphocyte_candidates`) that are lymphocytes.

    Every lymphocyte has prominence >= min_prominence and red_green <= max_red_green. A
    lone one also has a characteristic radius <= radius_um[1], roundness >=
    min_roundness and darkness >= min_darkness; one with at least cluster_neighbours of
    those within cluster_radius_um needs only darkness >= cluster_darkness and a radius
    <= cluster_size * radius_um[1], any roundness: packed nuclei in a focus are squeezed
    out of round, and their LoG scale blurs into their neighbours'.
    """
    with np.errstate(invalid="ignore"):  # NaN shape: not measured, fails
        colour = ((f["prominence"] >= params.min_prominence)
                  & (f["red_green"] <= params.max_red_green))
        ok = (colour & (f["radius_um"] <= params.radius_um[1])
              & (f["roundness"] >= params.min_roundness))
        crowded = (colour & (f["radius_um"] <= params.cluster_size * params.radius_um[1])
                   & ((f["roundness"] >= params.min_roundness) | params.cluster_any_shape))
    strong = ok & (f["darkness"] >= params.min_darkness)
    weak = crowded & ~strong & (f["darkness"] >= params.cluster_darkness)
    if weak.any() and strong.sum() >= params.cluster_neighbours:
        from scipy.spatial import cKDTree

        xy = np.stack([f["x_um"], f["y_um"]], axis=1)
        near = cKDTree(xy[strong]).query_ball_point(xy[weak], params.cluster_radius_um,
                                                    return_length=True)
        weak[weak] = near >= params.cluster_neighbours
    else:
        weak[:] = False
    return strong | weak


def detect_lymphocytes(
    rgb: np.ndarray,
    mpp: float,
    stain: StainFit,
    params: LymphocyteParams = LymphocyteParams(),  # noqa: B008 (frozen dataclass)
    *,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Lymphocyte nucleus centres in an RGB tile: (N, 2) float64 (x_um, y_um).

    rgb: (H, W, 3) uint8 at `mpp` um/px; centres are relative to the tile's top-left corner
    (pixel (0, 0) spans [0, mpp) um). stain: the slide's own `StainFit` (its matrix; the
    thresholds are absolute, `max_conc` is not used). mask: optional 2-D bool array covering
    the same field of view at any resolution (e.g. a tissue mask); candidates where it is
    False are dropped.
    """
    f = lymphocyte_candidates(rgb, mpp, stain, params, mask=mask)
    keep = select_lymphocytes(f, params)
    return np.stack([f["x_um"][keep], f["y_um"][keep]], axis=1).astype(np.float64)


def detection_context_um(params: LymphocyteParams = LymphocyteParams()) -> float:  # noqa: B008
    """How far (um) pixels can influence a detection: the hysteresis radius plus the
    support of a neighbour's measurement (the widest scale-space kernel, 3 sigma, the LoG,
    the re-centred darkness disc or the surround ring), plus the re-centring moves."""
    sigma_max = params.radius_um[1] * _SHAPE_SCALE_MAX / _SQRT2
    own = max(3.0 * sigma_max, 3.0 * params.detect_radius_um / _SQRT2,
              params.radius_um[0] + params.centre_search_um,
              params.radius_um[0] + params.surround_um[1])
    return params.cluster_radius_um + own + _RECENTRE_STEPS * params.centre_search_um


def detect_lymphocytes_in_region(
    slide: Slide,
    x_um: float,
    y_um: float,
    w_um: float,
    h_um: float,
    mpp: float,
    stain: StainFit,
    params: LymphocyteParams = LymphocyteParams(),  # noqa: B008 (frozen dataclass)
    *,
    tile_px: int = 512,
    margin_um: float | None = None,
) -> np.ndarray:
    """Lymphocyte centres in a slide region: (N, 2) float64 (x_um, y_um) slide coordinates.

    The region [x_um, x_um + w_um) x [y_um, y_um + h_um) is read at `mpp` um/px in tiles of
    `tile_px`^2 core pixels, each read with a `margin_um` border so that a nucleus on a
    tile edge is measured whole, with its neighbours; a detection is kept only by the tile
    whose core holds its centre, so each is found exactly once. The default margin is the
    detector's whole context (`detection_context_um(params)`, ~25 um), with which the
    result does not depend on the tiling; a region corner on the slide's pixel grid avoids
    resampling. Memory: one (tile_px + 2 margin)^2 tile.
    """
    if not mpp > 0:
        raise UsageError(f"mpp must be > 0, got {mpp}")
    if not (w_um > 0 and h_um > 0):
        return np.zeros((0, 2), np.float64)
    if tile_px < 16:
        raise UsageError(f"tile_px must be >= 16, got {tile_px}")
    if margin_um is None:
        margin_um = detection_context_um(params)
    margin_px = int(math.ceil(margin_um / mpp))
    step_um = tile_px * mpp
    x_end, y_end = x_um + w_um, y_um + h_um
    found = []
    for ty in range(int(math.ceil(h_um / step_um))):
        for tx in range(int(math.ceil(w_um / step_um))):
            cx0, cy0 = x_um + tx * step_um, y_um + ty * step_um  # core corner
            cx1, cy1 = min(cx0 + step_um, x_end), min(cy0 + step_um, y_end)
            core_w = int(math.ceil((cx1 - cx0) / mpp))
            core_h = int(math.ceil((cy1 - cy0) / mpp))
            ox, oy = cx0 - margin_px * mpp, cy0 - margin_px * mpp
            rgb = slide.read(ox, oy, core_w + 2 * margin_px, core_h + 2 * margin_px, mpp)
            pts = detect_lymphocytes(rgb, mpp, stain, params)
            pts[:, 0] += ox
            pts[:, 1] += oy
            keep = ((pts[:, 0] >= cx0) & (pts[:, 0] < cx1)
                    & (pts[:, 1] >= cy0) & (pts[:, 1] < cy1))
            found.append(pts[keep])
    return np.concatenate(found) if found else np.zeros((0, 2), np.float64)


# --------------------------------------------------------------------------- aggregates


@dataclass(frozen=True)
class AggregateParams:
    """Dense aggregates of lymphocytes (um unless stated).

    neighbour_um: two lymphocytes closer than this are neighbours (DBSCAN eps; ~2 nuclear
        diameters: packed foci have centres ~7 um apart, scattered cells ~100 um).
    min_neighbours: a lymphocyte with at least this many neighbours is inside an aggregate
        (DBSCAN core point; its neighbours join the aggregate too).
    min_count: aggregates with fewer lymphocytes are dropped (50: the ACR/EULAR focus);
        None keeps all.
    nucleus_radius_um: each lymphocyte is drawn as a disc of this radius for the outline.
    close_um: radius of the morphological closing that joins neighbouring discs into one
        region (>= (neighbour_um - 2 nucleus_radius_um) / 2 bridges every neighbour gap).
    """

    neighbour_um: float = 12.0
    min_neighbours: int = 3
    min_count: int | None = 50
    nucleus_radius_um: float = 4.0
    close_um: float = 4.0

    def __post_init__(self) -> None:
        if not (self.neighbour_um > 0 and self.nucleus_radius_um > 0 and self.close_um >= 0):
            raise UsageError("AggregateParams distances must be positive")
        if self.min_neighbours < 1:
            raise UsageError("AggregateParams.min_neighbours must be >= 1")


def _disc(radius_px: float) -> np.ndarray:
    r = int(math.floor(radius_px))
    d = np.arange(-r, r + 1)
    return (d[:, None] ** 2 + d[None, :] ** 2) <= radius_px**2 + 1e-9


def _outline(points_um: np.ndarray, params: AggregateParams, mpp: float) -> dict[str, Any]:
    """Filled region of one cluster rasterised at `mpp` in its own box: polygon, area,
    centroid (um)."""
    from skimage.measure import approximate_polygon, find_contours

    pad_px = int(math.ceil((params.nucleus_radius_um + params.close_um) / mpp)) + 2
    x0 = points_um[:, 0].min() - pad_px * mpp
    y0 = points_um[:, 1].min() - pad_px * mpp
    w = int(math.ceil((points_um[:, 0].max() - x0) / mpp)) + pad_px + 1
    h = int(math.ceil((points_um[:, 1].max() - y0) / mpp)) + pad_px + 1
    canvas = np.zeros((h, w), bool)
    cols = ((points_um[:, 0] - x0) / mpp).astype(np.intp)
    rows = ((points_um[:, 1] - y0) / mpp).astype(np.intp)
    canvas[rows, cols] = True
    canvas = ndi.binary_dilation(canvas, _disc(params.nucleus_radius_um / mpp))
    if params.close_um > 0:
        canvas = ndi.binary_closing(canvas, _disc(params.close_um / mpp))
    canvas = ndi.binary_fill_holes(canvas)
    labels, n = ndi.label(canvas)
    if n > 1:  # keep the piece holding most points (the closing joins all of them normally)
        votes = np.bincount(labels[rows, cols], minlength=n + 1)
        votes[0] = 0
        canvas = labels == int(np.argmax(votes))
    contours = find_contours(np.pad(canvas, 1).astype(np.float32), 0.5)
    ring = max(contours, key=len)  # holes are filled: the longest is the outer ring
    ring = approximate_polygon(ring, tolerance=0.25)
    # contour coordinates are in (row, col) index units of the padded canvas, whose pixel
    # (r, c) centre lies at x0 + (c - 1 + 0.5) * mpp
    polygon = np.stack([x0 + (ring[:, 1] - 0.5) * mpp, y0 + (ring[:, 0] - 0.5) * mpp], axis=1)
    rr, cc = np.nonzero(canvas)
    centroid = (x0 + (cc.mean() + 0.5) * mpp, y0 + (rr.mean() + 0.5) * mpp)
    return {"polygon_um": polygon, "area_um2": float(len(rr) * mpp * mpp),
            "centroid_um": (float(centroid[0]), float(centroid[1]))}


def find_aggregates(
    points_um: np.ndarray,
    params: AggregateParams = AggregateParams(),  # noqa: B008 (frozen dataclass)
    *,
    mpp: float = 2.0,
) -> list[dict[str, Any]]:
    """Dense aggregates of lymphocyte centres, largest first.

    points_um: (N, 2) x_um, y_um. Clusters are DBSCAN's (eps = neighbour_um, min_samples =
    min_neighbours + 1), with `min_count` applied. Each aggregate is a dict: points ((M,)
    int indices into points_um), count (M), polygon_um ((K, 2) closed outer ring, x_um,
    y_um, first point repeated last), area_um2 (of the filled region), centroid_um
    ((x, y) of that region). The outline is the union of nucleus discs closed over the
    gaps between neighbours and hole-filled, rasterised at `mpp` um/px in the cluster's own
    bounding box (memory bounded by the aggregate, never the slide).
    """
    from sklearn.cluster import DBSCAN

    pts = np.asarray(points_um, dtype=np.float64)
    if pts.size == 0:
        return []
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise UsageError(f"points_um must be (N, 2) x_um, y_um; got shape {pts.shape}")
    if not mpp > 0:
        raise UsageError(f"mpp must be > 0, got {mpp}")
    labels = DBSCAN(eps=params.neighbour_um, min_samples=params.min_neighbours + 1,
                    algorithm="kd_tree").fit(pts).labels_
    n_clusters = int(labels.max()) + 1
    counts = np.bincount(labels[labels >= 0], minlength=n_clusters)
    order = np.argsort(-counts, kind="stable")
    min_count = params.min_count or 0
    out = []
    for k in order:
        if counts[k] < min_count:
            break
        idx = np.flatnonzero(labels == k)
        out.append({"points": idx, "count": int(len(idx)), **_outline(pts[idx], params, mpp)})
    return out


# --------------------------------------------------------------------------- evaluation


def match_points(found_um: np.ndarray, true_um: np.ndarray, tol_um: float = 3.0
                 ) -> np.ndarray:
    """One-to-one matching of detected to annotated centres ((N, 2), (M, 2) um) within
    ``tol_um``, minimising the summed distance (Hungarian): (K, 2) index pairs
    (found, true). Precision = K / N, recall = K / M."""
    from scipy.optimize import linear_sum_assignment

    if not len(found_um) or not len(true_um):
        return np.zeros((0, 2), np.intp)
    d = np.hypot(*(found_um[:, None, :] - true_um[None, :, :]).transpose(2, 0, 1))
    cost = np.where(d <= tol_um, d, 1e6)
    rows, cols = linear_sum_assignment(cost)
    ok = cost[rows, cols] <= tol_um
    return np.stack([rows[ok], cols[ok]], axis=1)
