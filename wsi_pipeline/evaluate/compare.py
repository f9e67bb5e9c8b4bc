"""One slide's prediction against its truth: the additive statistics every metric pools
(`evaluate_slide`).

Everything is compared on the prediction map's own grid (``pred/classes``: its MPP, its
pixel (r, c) centred at ((c + 0.5) * mpp, (r + 0.5) * mpp) um from the slide origin): the
truth is rasterised (polygons) or resampled (label grids, nearest) onto it tile by tile
with the training readers' ``crop``, so memory stays bounded on a whole slide.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..annotations import AnnotationSource, GeoJsonSource, _rasterise
from ..labelmaps import connected_components
from .metrics import (
    GridObject,
    detection_counts,
    match_objects,
    match_points,
    pixel_counts,
)
from .sources import Prediction, Truth, aliases, classes_of, pred_ids

TILE_PX = 1024          # prediction-map pixels per side of one pixel-comparison tile
COMPONENT_BAND_PX = 256  # rows per band when truth objects are found on the grid
REPORT_SECTIONS = ("counts", "areas_mm2", "scores")
DETECTION = (("precision", "precision"), ("recall", "recall"), ("f1", "f1"))
UNNAMED_POINTS = "point"  # a truth point class that any predicted point may match

# per slide: statistics group -> (additive statistics, ((metric name, kind), ...))
Stats = dict[str, tuple[np.ndarray, tuple[tuple[str, str], ...]]]


def evaluate_slide(pred: Prediction, truth: Truth, classes: Mapping[str, frozenset[str]],
                   object_classes: list[str], point_classes: list[str], *, radius_um: float,
                   iou_min: float, diagnosis: str | None) -> Stats:
    """The statistics of one slide (see `metrics.STATISTICS` for what each kind pools):

    ``pixels/<class>``   tp, fp, fn pixels -> dice/<class>, iou/<class>
    ``areas/<class>/bland_altman``  predicted and true area, mm2
    ``objects/<class>``  tp, fp, fn objects matched at IoU >= ``iou_min`` -> precision,
                         recall, f1; ``objects`` sums the classes
    ``counts/objects/<class>/bland_altman``  predicted and true object counts
    ``points/<class>``   tp, fp, fn points matched within ``radius_um``
    ``counts/points/<class>/bland_altman``
    ``report/<section>/<name>/bland_altman``  report.json vs truth.json numbers
    ``diagnosis``        correct, 1 -> diagnosis/accuracy
    """
    stats: Stats = {}
    if truth.regions is not None and classes:
        px_mm2 = pred.mpp ** 2 / 1e6
        for name, (tp, fp, fn) in pixel_stats(pred, truth.regions, classes).items():
            stats[f"pixels/{name}"] = (np.array([tp, fp, fn]),
                                       ((f"dice/{name}", "dice"), (f"iou/{name}", "iou")))
            _agreement(stats, f"areas/{name}", (tp + fp) * px_mm2, (tp + fn) * px_mm2)
        if object_classes:
            found = predicted_objects(pred, {c: classes[c] for c in object_classes})
            true = truth_objects(truth.regions, {c: classes[c] for c in object_classes},
                                 pred.classes.shape, pred.mpp)
            total = np.zeros(3, np.int64)
            for name in object_classes:
                p, t = found[name], true[name]
                matched = len(match_objects(p, t, iou_min)[0])
                counts = detection_counts(len(p), len(t), matched)
                total += counts
                stats[f"objects/{name}"] = (counts, _detection(f"objects/{name}"))
                _agreement(stats, f"counts/objects/{name}", len(p), len(t))
            stats["objects"] = (total, _detection("objects"))
    if truth.points is not None and pred.points is not None:
        for name in point_classes:
            true_xy = truth.points.get(name, np.zeros((0, 2)))
            found_xy = _points_of(pred.points, name, classes)
            matched = len(match_points(found_xy, true_xy, radius_um)[0])
            stats[f"points/{name}"] = (detection_counts(len(found_xy), len(true_xy), matched),
                                       _detection(f"points/{name}"))
            _agreement(stats, f"counts/points/{name}", len(found_xy), len(true_xy))
    if truth.summary is not None:
        for section in REPORT_SECTIONS:
            ours, theirs = pred.report.get(section) or {}, truth.summary.get(section) or {}
            for key in sorted(set(ours) & set(theirs)):
                if _number(ours[key]) and _number(theirs[key]):
                    _agreement(stats, f"report/{section}/{key}", ours[key], theirs[key])
    if diagnosis is not None:
        said = pred_diagnosis(pred)
        stats["diagnosis"] = (np.array([float(said == diagnosis), 1.0]),
                              (("diagnosis/accuracy", "accuracy"),))
    return stats


def pred_diagnosis(pred: Prediction) -> str:
    """The report's diagnosis label ("none" when the slide got none)."""
    label = (pred.report.get("diagnosis") or {}).get("label")
    return "none" if label is None else str(label)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and bool(np.isfinite(value))


def _agreement(stats: Stats, name: str, predicted: float, true: float) -> None:
    group = f"{name}/bland_altman"
    stats[group] = (np.array([predicted, true, 1.0], np.float64), ((group, "bland_altman"),))


def _detection(prefix: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}/{name}", kind) for name, kind in DETECTION)


# -- pixels ------------------------------------------------------------------------------------
def pixel_stats(pred: Prediction, regions: AnnotationSource,
                classes: Mapping[str, frozenset[str]]) -> dict[str, np.ndarray]:
    """Per class, (tp, fp, fn) pixels of the prediction map against the truth on its grid,
    over the pixels the truth marks valid (inside the annotated extent, not an ignore
    class)."""
    labels, mpp = pred.classes, pred.mpp
    height, width = labels.shape
    ids = {c: pred_ids(pred.legend, names) for c, names in classes.items()}
    wanted = {c: tuple(names) for c, names in classes.items()}
    totals = {c: np.zeros(3, np.int64) for c in classes}
    for y0 in range(0, height, TILE_PX):
        for x0 in range(0, width, TILE_PX):
            block = np.asarray(labels[y0:y0 + TILE_PX, x0:x0 + TILE_PX])
            h, w = block.shape
            target, valid = regions.crop(x0 * mpp, y0 * mpp, w, h, mpp, wanted)
            for k, name in enumerate(classes):
                totals[name] += pixel_counts(np.isin(block, ids[name]), target[k] > 0, valid)
    return totals


# -- objects -----------------------------------------------------------------------------------
def polygon_object(polys: list[list[np.ndarray]], slide_mpp: float, mpp: float,
                   shape: tuple[int, int]) -> GridObject | None:
    """A polygon feature (rings of (K, 2) x, y level-0 px) rasterised onto the grid of
    ``shape`` at ``mpp`` (pixels whose centres lie inside; holes cut out), or None when
    no pixel centre of the grid lies inside it."""
    scale = slide_mpp / mpp
    pts = np.concatenate([rings[0] for rings in polys]) * scale - 0.5
    x0, y0 = np.maximum(np.floor(pts.min(0)).astype(int), 0)
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
    x1, y1 = min(x1, shape[1]), min(y1, shape[0])
    if x1 <= x0 or y1 <= y0:
        return None
    mask = _rasterise(polys, scale, np.array([x0 + 0.5, y0 + 0.5]), (y1 - y0, x1 - x0))
    return ((int(y0), int(x0), int(y1), int(x1)), mask) if mask.any() else None


def predicted_objects(pred: Prediction, classes: Mapping[str, frozenset[str]]
                      ) -> dict[str, list[GridObject]]:
    """Per class, the predicted objects on the grid: objects.geojson's polygons, each in
    every class its name answers to (`sources.aliases`); without objects.geojson (a run
    stopped after measure), the connected components of the class in the map."""
    found: dict[str, list[GridObject]] = {c: [] for c in classes}
    shape = pred.classes.shape
    if pred.objects is None:
        for name, names in classes.items():
            ids = pred_ids(pred.legend, names)
            found[name] = connected_components(pred.classes, lambda b, i=ids: np.isin(b, i))
        return found
    for label, polys in pred.objects:
        members = classes_of(label, classes, predicted=True)
        obj = polygon_object(polys, pred.slide_mpp, pred.mpp, shape) if members else None
        for name in members if obj is not None else ():
            found[name].append(obj)
    return found


class _ClassOnGrid:
    """One truth class on the prediction grid as a lazily read (H, W) boolean array, the
    interface `labelmaps.connected_components` walks (``shape``, ``chunks``, slicing)."""

    ndim = 2

    def __init__(self, source: AnnotationSource, names: frozenset[str],
                 shape: tuple[int, int], mpp: float) -> None:
        self.source, self.names, self.shape, self.mpp = source, tuple(names), shape, mpp
        self.chunks = (COMPONENT_BAND_PX, shape[1])

    def __getitem__(self, key: tuple[Any, ...]) -> np.ndarray:
        rows, cols = key[-2], key[-1]
        y0, y1, _ = rows.indices(self.shape[0])
        x0, x1, _ = cols.indices(self.shape[1])
        target, valid = self.source.crop(x0 * self.mpp, y0 * self.mpp, x1 - x0, y1 - y0,
                                         self.mpp, {"class": self.names})
        return (target[0] > 0) & valid


def truth_objects(regions: AnnotationSource, classes: Mapping[str, frozenset[str]],
                  shape: tuple[int, int], mpp: float) -> dict[str, list[GridObject]]:
    """Per class, the true objects on the prediction grid: GeoJSON polygons one by one
    (touching annotations stay apart), else the connected components (8-connected) of the
    class in a label grid."""
    if isinstance(regions, GeoJsonSource):
        found: dict[str, list[GridObject]] = {c: [] for c in classes}
        for label, polys in zip(regions.names, regions.polygons, strict=True):
            members = classes_of(label, classes, predicted=False)
            obj = polygon_object(polys, regions.slide_mpp, mpp, shape) if members else None
            for name in members if obj is not None else ():
                found[name].append(obj)
        return found
    return {c: connected_components(_ClassOnGrid(regions, names, shape, mpp), lambda b: b)
            for c, names in classes.items()}


# -- points ------------------------------------------------------------------------------------
def _points_of(points: Mapping[str, np.ndarray], name: str,
               classes: Mapping[str, frozenset[str]]) -> np.ndarray:
    """The predicted points of truth point class ``name``: those whose class answers to it
    (by `sources.aliases`, or through a scored class); every point for the unnamed class."""
    wanted = {name} | set(classes.get(name, ()))
    picked = [xy for label, xy in points.items()
              if name == UNNAMED_POINTS or aliases(label) & wanted]
    return np.concatenate(picked).reshape(-1, 2) if picked else np.zeros((0, 2))
