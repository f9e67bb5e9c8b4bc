"""What `wsi-eval` compares: a wsi-run slide folder (`read_prediction`) and the truth files
of the same slide (`find_truth`), and the classes both are scored in (`eval_classes`).

Truth of a slide ``<stem>`` in the truth folder:

* regions, the first of ``<stem>.truth.zarr`` (`wsi-synth`), ``<stem>.geojson`` (QuPath
  polygons), ``<stem>.labels.tif|.tiff|.png`` + ``<stem>.labels.json`` — read by the
  training readers of `wsi_pipeline.annotations`;
* points, the first of ``<stem>.points.csv`` (x_um, y_um[, class]), the Point features of
  ``<stem>.geojson``, the (N, 2) x_um, y_um arrays of ``<stem>.truth.zarr`` (class = the
  array's name in the singular: ``lymphocytes`` -> ``lymphocyte``);
* slide-level numbers, ``<stem>.truth.json`` (`wsi-synth`: diagnosis, counts, areas_mm2,
  scores).

GeoJSON coordinates are level-0 pixels; the slide's MPP is the one its report records,
so the slide file itself is not needed.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..annotations import (
    IGNORE_NAMES,
    MASK_SUFFIXES,
    AnnotationSource,
    GeoJsonSource,
    LabelMaskSource,
    TruthZarrSource,
    _classification,
    _norm,
    _read_geojson,
)
from ..errors import UsageError, WsiError

BACKGROUND_NAMES = frozenset({"background", "unlabelled", "unlabeled", "none", ""})
# store arrays of point detections, in order of preference, with their default class
PRED_POINT_ARRAYS = (("pred/cells", None), ("pred/lymphocytes", "lymphocyte"))


@dataclass
class Prediction:
    """One wsi-run slide folder.

    slide_id      the folder's name
    report        its report.json
    task          the task that made it
    slide_mpp     level-0 um/px the run used (converts GeoJSON pixels)
    size_um       (width, height) of the slide
    classes       the (H, W) uint8 label map ``pred/classes`` (a zarr array, read lazily)
    mpp           its um/px
    legend        its class id -> name
    objects       objects.geojson as (name, polygons in level-0 px) or None (no file)
    points        detected points per class name ((N, 2) x, y um) or None (none stored)
    """

    slide_id: str
    folder: Path
    report: dict[str, Any]
    task: str
    slide_mpp: float
    size_um: tuple[float, float]
    classes: Any
    mpp: float
    legend: dict[int, str]
    objects: list[tuple[str | None, list[list[np.ndarray]]]] | None
    points: dict[str, np.ndarray] | None


@dataclass
class Truth:
    """The truth of one slide (any part None when the truth folder has none)."""

    files: list[str] = field(default_factory=list)
    regions: AnnotationSource | None = None
    points: dict[str, np.ndarray] | None = None
    summary: dict[str, Any] | None = None   # <stem>.truth.json


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WsiError(f"{path}: unreadable JSON ({exc})") from None


# -- predictions -----------------------------------------------------------------------------
def slide_folders(out: Path) -> list[Path]:
    """The wsi-run slide folders (``<slide-id>/report.json``) of ``out``, sorted."""
    if not out.is_dir():
        raise WsiError(f"{out}: no such folder")
    found = sorted(p.parent for p in out.glob("*/report.json"))
    if not found:
        raise WsiError(f"{out}: not a wsi-run output folder (no <slide-id>/report.json in it)")
    return found


def read_prediction(folder: Path) -> Prediction | str:
    """The prediction in one wsi-run slide folder, or the reason it has none to score (a
    run stopped before the measure stage). Unreadable files raise `WsiError`."""
    import zarr

    report = _json(folder / "report.json")
    try:
        slide = report["slide"]
        slide_mpp = float(slide["mpp"])
        size_um = (slide["width_px"] * slide_mpp, slide["height_px"] * slide_mpp)
        task = str(report["task"])
    except (KeyError, TypeError, ValueError):
        raise WsiError(f"{folder / 'report.json'}: not a wsi-run report (no task, slide mpp "
                       "or size)") from None
    if not (folder / "store.zarr").is_dir():
        return "no store.zarr beside report.json"
    try:
        store = zarr.open_group(str(folder / "store.zarr"), mode="r")
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise WsiError(f"{folder / 'store.zarr'}: unreadable ({exc})") from None
    if "pred/classes" not in store:
        return "no prediction map (pred/classes): rerun wsi-run at least --until measure"
    classes = store["pred/classes"]
    try:
        mpp = float(classes.attrs["mpp"])
        legend = {int(k): str(v) for k, v in classes.attrs["legend"].items()}
    except (KeyError, TypeError, ValueError):
        raise WsiError(f"{folder}/store.zarr/pred/classes: no mpp or legend attributes"
                       ) from None
    objects = None
    if (folder / "objects.geojson").is_file():
        names, polygons, _ = _read_geojson(folder / "objects.geojson")
        objects = list(zip(names, polygons, strict=True))
    points = None
    if (folder / "cells.geojson").is_file():
        points = read_geojson_points(folder / "cells.geojson", slide_mpp)
    else:
        for name, default in PRED_POINT_ARRAYS:
            if name in store:
                array = store[name]
                label = str(array.attrs.get("name") or default or "cell")
                points = {_norm(label): np.asarray(array[...], np.float64).reshape(-1, 2)}
                break
    return Prediction(folder.name, folder, report, task, slide_mpp, size_um, classes, mpp,
                      legend, objects, points)


# -- truth -------------------------------------------------------------------------------------
class _GeoJsonTruth(GeoJsonSource):
    """`GeoJsonSource` with the slide's MPP and size given rather than read from the slide
    file (which need not exist where the outputs are scored)."""

    def __init__(self, path: Path, slide_mpp: float, size_um: tuple[float, float]) -> None:
        AnnotationSource.__init__(self, path, size_um)
        self.slide_mpp = float(slide_mpp)
        self.names, self.polygons, self.skipped = _read_geojson(Path(path))
        outlines = [np.concatenate([rings[0] for rings in polys]) for polys in self.polygons]
        self.boxes_um = np.array([np.concatenate([o.min(0), o.max(0)]) for o in outlines]
                                 ).reshape(-1, 4) * self.slide_mpp


def truth_candidates(folder: Path, stem: str) -> list[Path]:
    """Every truth file name looked for, in order."""
    names = [f"{stem}.truth.zarr", f"{stem}.geojson",
             *(f"{stem}.labels{s}" for s in MASK_SUFFIXES), f"{stem}.points.csv",
             f"{stem}.truth.json"]
    return [folder / n for n in names]


def find_truth(folder: Path, stem: str, pred: Prediction) -> Truth | None:
    """The truth of slide ``stem`` in ``folder`` (see the module docstring), or None when
    there is none. Unreadable files raise `WsiError`."""
    zarr_path, geojson, *masks = truth_candidates(folder, stem)[:-2]
    csv_path, json_path = truth_candidates(folder, stem)[-2:]
    truth = Truth()
    geo_points: dict[str, np.ndarray] = {}
    if zarr_path.is_dir():
        truth.regions = TruthZarrSource(zarr_path)
        truth.files.append(zarr_path.name)
    if geojson.is_file():
        geo_points = read_geojson_points(geojson, pred.slide_mpp)
        source = _GeoJsonTruth(geojson, pred.slide_mpp, pred.size_um)
        truth.files.append(geojson.name)
        # polygons, or an empty annotation (all background); not a file of points alone
        if truth.regions is None and (source.polygons or not geo_points):
            truth.regions = source
    for mask in masks:
        if truth.regions is None and mask.is_file():
            truth.regions = LabelMaskSource(mask, pred.report["slide"].get("path", ""),
                                            mpp=pred.slide_mpp)
            truth.files.append(mask.name)
    if csv_path.is_file():
        truth.points = read_points_csv(csv_path)
        truth.files.append(csv_path.name)
    elif geo_points:
        truth.points = geo_points
    elif isinstance(truth.regions, TruthZarrSource):
        truth.points = read_truth_zarr_points(zarr_path) or None
    if json_path.is_file():
        truth.summary = _json(json_path)
        truth.files.append(json_path.name)
    if truth.regions is None and truth.points is None and truth.summary is None:
        return None
    return truth


def read_geojson_points(path: Path, slide_mpp: float) -> dict[str, np.ndarray]:
    """The Point / MultiPoint features of a QuPath GeoJSON as {class name: (N, 2) x, y um}
    (level-0 pixels times ``slide_mpp``); unnamed points are class "point"."""
    data = _json(path)
    if isinstance(data, dict):
        features = data.get("features") or ([data] if data.get("type") == "Feature" else [])
    else:
        features = data if isinstance(data, list) else []
    found: dict[str, list[np.ndarray]] = {}
    for n, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind not in ("Point", "MultiPoint"):
            continue
        coords = geometry.get("coordinates")
        try:
            xy = np.array([c[:2] for c in ([coords] if kind == "Point" else coords)],
                          np.float64).reshape(-1, 2)
        except (ValueError, TypeError, IndexError):
            raise WsiError(f"{path}: feature {n} has malformed {kind} coordinates") from None
        name = _classification(feature.get("properties")) or "point"
        found.setdefault(name, []).append(xy * slide_mpp)
    return {k: np.concatenate(v) for k, v in found.items()}


def read_points_csv(path: Path) -> dict[str, np.ndarray]:
    """``<stem>.points.csv`` (columns x_um, y_um and optionally class) as {class: (N, 2)}."""
    found: dict[str, list[tuple[float, float]]] = {}
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = {(f or "").strip().casefold(): f for f in reader.fieldnames or ()}
            if not {"x_um", "y_um"} <= set(fields):
                raise WsiError(f"{path}: a points CSV needs the columns x_um, y_um (and "
                               "class)")
            for line, row in enumerate(reader, start=2):
                try:
                    xy = (float(row[fields["x_um"]]), float(row[fields["y_um"]]))
                except (TypeError, ValueError):
                    raise WsiError(f"{path}: line {line}: x_um, y_um must be numbers"
                                   ) from None
                name = _norm(row.get(fields.get("class", ""), "") or "point")
                found.setdefault(name, []).append(xy)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WsiError(f"{path}: unreadable CSV ({exc})") from None
    return {k: np.array(v, np.float64).reshape(-1, 2) for k, v in found.items()}


def read_truth_zarr_points(path: Path) -> dict[str, np.ndarray]:
    """The (N, 2) x_um, y_um arrays of a truth.zarr, by singular array name."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    found = {}
    for name in sorted(group.array_keys()):
        array = group[name]
        if list(array.attrs.get("columns") or []) == ["x_um", "y_um"] and array.ndim == 2:
            found[_norm(re.sub(r"s$", "", name))] = np.asarray(array[...], np.float64)
    return found


def read_diagnoses(path: Path) -> dict[str, str]:
    """``--diagnoses``: a CSV of slide, label (a header row naming them is optional)."""
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"--diagnoses {path}: unreadable ({exc})") from None
    if rows and [c.strip().casefold() for c in rows[0][:2]] == ["slide", "label"]:
        rows = rows[1:]
    if any(len(r) < 2 for r in rows):
        raise UsageError(f"--diagnoses {path}: every row needs slide,label")
    return {r[0].strip(): r[1].strip() for r in rows}


# -- classes -----------------------------------------------------------------------------------
def aliases(name: str | None) -> frozenset[str]:
    """The names a prediction class (legend entry, object or cell name) answers to: itself,
    without a parenthesised qualifier, the qualifier alone, and with underscores for
    spaces: "Glomerulus (hypercellular)" -> glomerulus, hypercellular,
    glomerulus_hypercellular."""
    if not name:
        return frozenset()
    full = _norm(name)
    base = re.sub(r"\s*\([^)]*\)", "", full).strip()
    inner = [s.strip() for s in re.findall(r"\(([^)]*)\)", full)]
    found = {full, base, *inner, *(f"{base}_{s}" for s in inner)}
    found |= {n.replace(" ", "_") for n in found} | {n.replace("_", " ") for n in found}
    return frozenset(n for n in found if n)


def eval_classes(task_annotations: Mapping[str, Iterable[str]],
                 truth_names: Iterable[str], pred_names: Iterable[str]
                 ) -> dict[str, frozenset[str]]:
    """The classes to score, each with the truth names that mean it: the task's model (and
    classifier) classes, through their annotation names, then any other class the
    prediction legends and the truth share by name; only classes some truth declares,
    never background or an ignore class."""
    declared = {_norm(n) for n in truth_names}
    skip = BACKGROUND_NAMES | IGNORE_NAMES
    classes: dict[str, frozenset[str]] = {}
    for name, names in task_annotations.items():
        accepted = (frozenset(_norm(n) for n in names) | {_norm(name)}) - skip
        if accepted & declared:
            classes[_norm(name)] = classes.get(_norm(name), frozenset()) | accepted
    covered = frozenset().union(*classes.values()) if classes else frozenset()
    for name in sorted({_norm(n) for n in pred_names} & declared - skip - covered):
        classes[name] = frozenset({name})
    return classes


def pred_ids(legend: Mapping[int, str], names: frozenset[str]) -> np.ndarray:
    """Label-map ids of the prediction classes that answer to one of ``names``."""
    return np.array([k for k, v in legend.items() if k != 0 and aliases(v) & names], np.int64)


def classes_of(name: str | None, classes: Mapping[str, frozenset[str]], *,
               predicted: bool) -> list[str]:
    """The scored classes an object of class ``name`` belongs to (a predicted name by its
    `aliases`, a truth name exactly)."""
    keys = aliases(name) if predicted else frozenset({_norm(name)} if name else ())
    return [c for c, names in classes.items() if keys & names]
