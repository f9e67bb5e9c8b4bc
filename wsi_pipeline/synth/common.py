"""What every synthetic task shares: slide geometry, artefacts, the task registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import scene as sc


@dataclass
class SlideBase:
    """Slide-wide facts every task scene carries (sizes in level-0 pixels and um)."""

    task: str
    seed: int
    width_px: int
    height_px: int
    mpp: float
    stains: sc.StainModel
    label: str
    pen: sc.PenStroke | None = None
    fold: sc.Fold | None = None
    dust: sc.Dust | None = None
    options: dict = field(default_factory=dict)
    randomise: Any = None  # a randomise.Randomisation when the slide is randomised

    @property
    def width_um(self) -> float:
        return self.width_px * self.mpp

    @property
    def height_um(self) -> float:
        return self.height_px * self.mpp


@dataclass(frozen=True)
class SynthSpec:
    """How to build, render, label and score one synthetic task."""

    name: str
    legend: dict[int, str]
    labels: tuple[str, ...]  # values accepted by --label
    default_size_px: tuple[int, int]
    default_mpp: float
    build: Callable  # (task, seed, width_px, height_px, mpp, label, pen, fold) -> scene
    render_tile: Callable  # (scene, x0_px, y0_px, size) -> (size, size, 3) uint8 | None
    label_tile: Callable  # (scene, x0_um, y0_um, px_um, size) -> (size, size) uint8
    truth: Callable  # (scene, areas_mm2: {legend name: mm2}) -> dict
    arrays: Callable  # (scene) -> {name: (array, attrs)}
    tissue_classes: tuple[int, ...] = ()  # legend values that are tissue


def tile_coords(x0_px: int, y0_px: int, size: int, mpp: float):
    """Pixel-centre coordinates (um) of a tile: X (1, size), Y (size, 1), float32."""
    xs = ((x0_px + np.arange(size, dtype=np.float64) + 0.5) * mpp).astype(np.float32)
    ys = ((y0_px + np.arange(size, dtype=np.float64) + 0.5) * mpp).astype(np.float32)
    return xs[None, :], ys[:, None]


def coarse_step(px_um: float, size: int, target_um: float = 4.0) -> int:
    """Coarse-grid step (px, power of two dividing `size`) of about `target_um`."""
    step = 1
    while step * 2 * px_um <= target_um and size % (step * 2) == 0 and step < 16:
        step *= 2
    return step


def window(bbox_um, x0_um: float, y0_um: float, px_um: float, size: int):
    """Pixel slice (rows, cols) of a tile covered by a box (um), or None."""
    bx0, by0, bx1, by1 = bbox_um
    c0 = max(int(np.floor((bx0 - x0_um) / px_um)), 0)
    c1 = min(int(np.ceil((bx1 - x0_um) / px_um)) + 1, size)
    r0 = max(int(np.floor((by0 - y0_um) / px_um)), 0)
    r1 = min(int(np.ceil((by1 - y0_um) / px_um)) + 1, size)
    if c1 <= c0 or r1 <= r0:
        return None
    return slice(r0, r1), slice(c0, c1)


def artefacts_extra_od(base: SlideBase, x0_px: int, y0_px: int, size: int) -> list:
    """Pen ink and dust on a tile as additive absorbers for `beer_lambert`."""
    mpp = base.mpp
    x0, y0 = x0_px * mpp, y0_px * mpp
    x1, y1 = x0 + size * mpp, y0 + size * mpp
    extra = []
    if base.pen is not None and window(base.pen.bbox, x0, y0, mpp, size) is not None:
        cov = pen_coverage(base, x0, y0, mpp, size)
        if cov.any():
            extra.append((cov, sc.PEN_INKS[base.pen.ink]))
    if base.dust is not None:
        ids = sc.dust_in_box(base.dust, x0, y0, x1, y1)
        if len(ids):
            d = base.dust
            alpha = np.zeros((size, size), np.float32)
            sc.stamp_ellipses(alpha, (d.x_um[ids] - x0) / mpp, (d.y_um[ids] - y0) / mpp,
                              d.r_um[ids] / mpp, d.r_um[ids] * 0.7 / mpp, d.r_um[ids],
                              d.od[ids])
            extra.append((alpha, np.array([1.0, 1.05, 1.1], np.float32)))
    return extra


def artefact_touches(base: SlideBase, x0: float, y0: float, x1: float, y1: float) -> bool:
    """Whether pen or dust touches a box (um): such a tile is not plain glass."""
    if base.pen is not None:
        bx0, by0, bx1, by1 = base.pen.bbox
        if bx0 < x1 and bx1 > x0 and by0 < y1 and by1 > y0:
            return True
    return base.dust is not None and len(sc.dust_in_box(base.dust, x0, y0, x1, y1)) > 0


def pen_coverage(base: SlideBase, x0_um: float, y0_um: float, px_um: float,
                 size: int) -> np.ndarray:
    """Pen-ink coverage (size, size) in [0, 1] from coarse fields."""
    pen = base.pen
    F = sc.coarse_fields(lambda gx, gy: pen.fields(base.seed, gx, gy), x0_um, y0_um, px_um,
                         size, coarse_step(px_um, size, 8.0))
    return (sc.smoothstep(1.5, -1.5, F["edge"]) * F["streak"]).astype(np.float32)


def fold_thickness(base: SlideBase, x0_um: float, y0_um: float, px_um: float,
                   size: int) -> np.ndarray | None:
    """Section-thickness factor (size, size) of the fold, or None where it is absent."""
    fold = base.fold
    if fold is None or window(fold.bbox, x0_um, y0_um, px_um, size) is None:
        return None
    F = sc.coarse_fields(fold.fields, x0_um, y0_um, px_um, size,
                         coarse_step(px_um, size, 8.0))
    return fold.thickness_from(F["edge"])


def pen_label(base: SlideBase, lab: np.ndarray, x0_um, y0_um, px_um, value: int):
    """Set `value` in `lab` where pen ink covers more than half of the pixel."""
    size = lab.shape[0]
    if base.pen is None or window(base.pen.bbox, x0_um, y0_um, px_um, size) is None:
        return
    lab[pen_coverage(base, x0_um, y0_um, px_um, size) > 0.5] = value


def render_tissue_tile(s: SlideBase, index: sc.SpatialIndex, salt: int, fields: Callable,
                       paint: Callable, x0_px: int, y0_px: int, size: int) -> np.ndarray | None:
    """RGB uint8 (size, size, 3) of the tile at level-0 pixel (x0_px, y0_px); None = glass.

    The frame every task's tile renderer shares. index: the spatial index of the scene's
    tissue pieces (tiles touching none, and no artefact, are glass); salt: the task's
    tile-seed salt; fields(s, X, Y) -> dict with a signed `tissue` field (um inside the edge,
    > 0 in tissue) plus whatever `paint` reads; paint(s, F, x0_px, y0_px, size, X, Y, rng,
    cH, c2) fills the haematoxylin and second-stain concentrations (size, size) in place.
    The frame then applies the tissue edge, fold thickness, pen and dust, and Beer-Lambert.
    A randomised slide (`s.randomise`) also varies its nuclei, section and artefacts here,
    and renders glass tiles too (the scanner's effects cover the whole slide).
    """
    mpp = s.mpp
    x0, y0 = x0_px * mpp, y0_px * mpp
    x1, y1 = x0 + size * mpp, y0 + size * mpp
    rnd = s.randomise
    pieces = index.query(x0, y0, x1, y1)
    if not len(pieces) and not artefact_touches(s, x0, y0, x1, y1) and rnd is None:
        return None
    rng = np.random.default_rng(sc.tile_seed(s.seed, salt, x0_px, y0_px))
    X, Y = tile_coords(x0_px, y0_px, size, mpp)
    cH = np.zeros((size, size), np.float32)
    c2 = np.zeros((size, size), np.float32)
    alpha = edge = None
    if len(pieces):
        F = sc.coarse_fields(lambda gx, gy: fields(s, gx, gy), x0, y0, mpp, size,
                             coarse_step(mpp, size))
        edge = F["tissue"] + 2.5 * sc.tile_noise(s.seed + 9, x0_px, y0_px, size,
                                                 sc.pow2_cell(12.0, mpp, size))
        alpha = sc.smoothstep(-0.7 * mpp, 0.7 * mpp, edge)
        if alpha.max() > 0:
            with sc.nuclear_variation(None if rnd is None else rnd.nuclei_at(x0_px, y0_px)):
                paint(s, F, x0_px, y0_px, size, X, Y, rng, cH, c2)
            cH *= alpha
            c2 *= alpha
            thick = fold_thickness(s, x0, y0, mpp, size)
            if thick is not None:
                cH *= thick
                c2 *= thick
            if rnd is not None:
                fh, f2 = rnd.section_factors(mpp, x0_px, y0_px, size)
                cH *= fh
                c2 *= f2
        else:
            alpha = None
    extra = artefacts_extra_od(s, x0_px, y0_px, size)
    if rnd is not None:
        extra += rnd.extra_od(mpp, x0_px, y0_px, size, edge)
    elif alpha is None and not extra:
        return None
    return sc.beer_lambert(s.stains, cH, c2, rng, extra)


def choose_counts_for_rate(rate_target: float, area_mm2: float, per_mm2: float,
                           lo: float, hi: float) -> int:
    """Integer count N with N * per_mm2 / area inside [lo, hi] nearest to the target rate."""
    if area_mm2 <= 0:
        return 0
    best = int(round(rate_target * area_mm2 / per_mm2))
    cands = [n for n in range(max(best - 3, 0), best + 4)
             if lo <= n * per_mm2 / area_mm2 <= hi]
    if not cands:
        return max(best, 0)
    return min(cands, key=lambda n: abs(n * per_mm2 / area_mm2 - rate_target))
