"""Training data of the slide trainers: annotated and synthetic slides prepared through the
pipeline's own stages (``run_slide(..., until="pyramid")``), cohort lists, the
patient-level split, patch sampling, augmentation and the `PatchDataset`; also the
glomerulus annotations the crop and case trainers read."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..annotations import AnnotationSource, find_annotations
from ..errors import UsageError
from ..stain import REFERENCES, rgb_to_od
from .common import Log, read_json, say

if TYPE_CHECKING:
    from ..tasks import Task, TaskSpec

ALIGN_PX = 4               # patch corners on multiples of the coarsest context factor
STAIN_JITTER = 0.15        # stain concentrations scaled by U(1 - j, 1 + j)
SYNTH_SIZE_PX = (6000, 4500)
SYNTH_SEED = 1000
SYNTH_MOUSE_SEED = 5000


# -- augmentation -------------------------------------------------------------------------------
def stain_concentrations(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (..., 2) float32 concentrations in the stain basis ``matrix``
    ((2, 3) unit OD rows, e.g. haematoxylin and eosin): the least-squares fit of the
    pixel's optical density, OD ~= c @ matrix."""
    pinv = np.linalg.pinv(np.asarray(matrix, np.float64)).astype(np.float32)  # (3, 2)
    return rgb_to_od(rgb) @ pinv


def stain_jitter(rgb: np.ndarray, matrix: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Scale each stain's concentration by ``factors`` (2,): (..., 3) uint8 -> same.

    OD = c @ M + r, with r the part of the OD outside the stain plane (kept unchanged);
    the result is OD' = (c * factors) @ M + r back in RGB, so re-projecting it onto
    ``matrix`` gives c * factors (up to 8-bit rounding and clipping)."""
    m = np.asarray(matrix, np.float32)
    od = rgb_to_od(rgb)
    c = od @ np.linalg.pinv(m.astype(np.float64)).astype(np.float32)
    od += (c * (np.asarray(factors, np.float32) - 1)) @ m
    out = np.exp(-od)
    out *= 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def augment(patch: np.ndarray, target: np.ndarray, valid: np.ndarray,
            rng: np.random.Generator, matrix: np.ndarray, jitter: float = STAIN_JITTER
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """One random flip/rot90 (the same for every level of ``patch`` (L, H, W, 3) uint8, for
    ``target`` (C, H, W) and ``valid`` (H, W)) and a stain-space colour jitter of the image
    (each stain scaled by U(1 - jitter, 1 + jitter), the same factors on every level).

    Concentric square patches rotate about their common centre, so the levels stay
    aligned. Returns the augmented arrays and the drawn parameters
    {"rot90": k, "flip": bool, "stain_factors": [h, e]}.
    """
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    factors = rng.uniform(1 - jitter, 1 + jitter, 2) if jitter > 0 else np.ones(2)

    def geo(a: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
        a = np.rot90(a, k, axes=axes)
        return np.flip(a, axis=axes[1]) if flip else a

    patch = geo(patch, (1, 2))
    if jitter > 0:
        patch = stain_jitter(patch, matrix, factors)
    params = {"rot90": k, "flip": flip, "stain_factors": [float(f) for f in factors]}
    return (np.ascontiguousarray(patch), np.ascontiguousarray(geo(target, (1, 2))),
            np.ascontiguousarray(geo(valid, (0, 1))), params)


# -- slides -------------------------------------------------------------------------------------
@dataclass
class TrainSlide:
    """A prepared slide: its store (normalised pyramid), tissue tiles and annotations.

    tiles         (N, 2) (row, col) tissue tiles of the ``tile_px`` grid at level 0
    positives_px  (M, 2) (y, x) level-0 pixels inside positive annotations
    level0_hw     (H, W) of the store's level 0
    complementary the class a weakly labelled slide's pixels cannot be (from its patient's
                  diagnosis; no pixel annotations, ``annotations`` None), -1 = annotated
    """

    slide_id: str
    path: Path
    store_path: Path
    annotations: AnnotationSource | None
    tiles: np.ndarray
    positives_px: np.ndarray
    level0_hw: tuple[int, int]
    tile_px: int
    species: str = "human"
    complementary: int = -1

    @property
    def weak(self) -> bool:
        return self.complementary >= 0


def make_synthetic_cohort(task: Task, folder: Path, n: int, *, seed: int = SYNTH_SEED,
                          size_px: tuple[int, int] = SYNTH_SIZE_PX, workers: int = 2,
                          species: str = "human", mpp: float = 0.5, log: Log = say
                          ) -> list[Path]:
    """``n`` synthetic slides of the task plugin ``task`` (its ``synth``, as ``wsi-synth``
    writes them) in ``folder``: seeds ``seed``, ``seed + 1``, ...; even indices get the
    first of its ``synth_labels`` (positive), odd ones the second (mouse kidney sections:
    all with cortex). A slide already there with the same seed, size, label and species is
    reused. A task without ``synth`` raises a UsageError."""
    from ..synth import truth_paths

    require_synth(task)
    labels = synth_labels(task) if species == "human" else ("adequate", "adequate")
    extra = {} if species == "human" else {"species": species}
    paths = []
    for i in range(n):
        tag = "" if species == "human" else f"{species}_"
        path = folder / f"{task.name}_synth_{tag}{seed + i}.svs"
        label = labels[i % 2]
        truth_json, truth_zarr = truth_paths(path)
        gen = read_json(truth_json).get("generator", {}) if truth_json.is_file() else {}
        if path.is_file() and truth_zarr.is_dir() and gen.get("seed") == seed + i \
                and [gen.get("width"), gen.get("height")] == list(size_px) \
                and gen.get("options", {}).get("label") == label:
            log(f"synth {path.name}: reused")
        else:
            t0 = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            task.synth(path, width=size_px[0], height=size_px[1], seed=seed + i, mpp=mpp,
                       label=label, workers=workers, **extra)
            log(f"synth {path.name}: {species} {label}, {time.perf_counter() - t0:.1f} s")
        paths.append(path)
    return paths


def make_weak_cohort(task: TaskSpec, folder: Path, patients: int, annotated: int, *,
                     seed: int = SYNTH_SEED, size_px: tuple[int, int] = SYNTH_SIZE_PX,
                     log: Log = say) -> Path:
    """A synthetic weak-label cohort (``wsi-synth --task liver --cohort``) in ``folder``:
    ``patients`` patients, ``annotated`` of them with label masks; returns its
    ``cohort.csv``. Reused when the folder already holds the same cohort."""
    from ..synth.liver import write_liver_cohort

    if task.name != "liver":
        raise UsageError(f"no synthetic weak-label cohort for task {task.name}")
    if not 0 <= annotated <= patients:
        raise UsageError(f"--synth-annotated {annotated}: must be in 0..{patients}")
    csv_path = folder / "cohort.csv"
    stamp = folder / "cohort.params.json"
    params = {"patients": patients, "annotated": annotated, "seed": seed,
              "size_px": list(size_px)}
    if csv_path.is_file() and read_json(stamp) == params:
        log(f"synth cohort {folder}: reused")
        return csv_path
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    write_liver_cohort(folder, patients, annotated, seed, size_px[0], size_px[1])
    stamp.write_text(json.dumps(params))
    log(f"synth cohort {folder}: {patients} patients ({annotated} annotated), "
        f"{time.perf_counter() - t0:.0f} s")
    return csv_path


def require_synth(task: Task) -> None:
    """A one-line UsageError when the plugin ``task`` writes no synthetic slides."""
    if task.synth is None:
        raise UsageError(f"--synth: task {task.name} has no synthetic slide generator")


def synth_labels(task: Task) -> tuple[str, str]:
    """The two labels a synthetic cohort of ``task`` alternates (its ``synth_labels``,
    positive first; a task with one label repeats it)."""
    labels = tuple(task.synth_labels)
    if not labels:
        raise UsageError(f"--synth: task {task.name} declares no synth_labels")
    return (labels[0], labels[1]) if len(labels) > 1 else (labels[0], labels[0])


def positive_classes(task: TaskSpec) -> dict[str, tuple[str, ...]]:
    """Annotation classes that class-balanced sampling centres patches on: all of a
    one-class model's, all but the background (class 0) of a softmax model's."""
    classes = dict(task.model.annotations)
    if task.model.softmax:
        classes.pop(task.model.classes[0], None)
    return classes


def _species(path: Path) -> str:
    """"mouse" for a synthetic mouse section (its truth.json says so), else "human"."""
    from ..synth import truth_paths

    truth_json, _ = truth_paths(path)
    return str(read_json(truth_json).get("species", "human")) if truth_json.is_file() \
        else "human"


def expand_slides(items: Sequence[str | Path]) -> list[Path]:
    """Slide files from files and folders (folders: their slides, ``*.truth.*`` skipped)."""
    from ..slide import find_slides

    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            slides = find_slides(p)
            if not slides:
                raise UsageError(f"{p}: folder holds no slide files")
            found.extend(slides)
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"{p}: no such file or folder")
    return found


def prepare_slides(paths: Sequence[Path], task: TaskSpec, work: Path, *, workers: int = 2,
                   mpp: float | None = None, log: Log = say,
                   ids: Sequence[str] | None = None,
                   complementary: Sequence[int] | None = None,
                   plugin: Task | None = None) -> list[TrainSlide]:
    """Run each slide through tissue -> stain -> pyramid into ``work/<slide_id>/store.zarr``
    (reused when done before) and find its annotations; a slide whose ``complementary``
    entry is >= 0 is weakly labelled (no annotations read). ``plugin`` runs the stages
    (default: the task registered under ``task.name``); ``task`` is the spec training uses
    (e.g. with another loss)."""
    import zarr

    from ..batch import unique_ids
    from ..pipeline import RunOptions, run_slide
    from ..tasks import get_plugin

    plugin = plugin or get_plugin(task.name, trainable=True)
    ids = list(ids) if ids is not None else unique_ids([Path(p).stem for p in paths])
    classes = positive_classes(task)
    weak = list(complementary) if complementary is not None else [-1] * len(paths)
    out = []
    for slide_id, path, comp in zip(ids, paths, weak, strict=True):
        # fail before the long work
        source = find_annotations(path, mpp=mpp) if comp < 0 else None
        t0 = time.perf_counter()
        report = run_slide(path, plugin, slide_id,
                           RunOptions(out=work, until="pyramid", workers=workers, mpp=mpp))
        store_path = work / slide_id / "store.zarr"
        root = zarr.open_group(str(store_path), mode="r")
        tiles = np.asarray(root["tiles"][...]).reshape(-1, 2).astype(np.int64)
        level0_hw = tuple(int(v) for v in root["image/0"].shape[1:])
        points_um = (source.positive_points_um(classes) if source is not None
                     else np.zeros((0, 2)))
        positives = np.round(points_um[:, ::-1] / task.mpp).astype(np.int64).reshape(-1, 2)
        reused = all(t["reused"] for k, t in report["provenance"]["stage_timings"].items()
                     if k != "open")
        kind = source.kind if source is not None else \
            f"weak: not {task.model.classes[comp]}"
        log(f"slide {slide_id}: {len(tiles)} tissue tiles, {len(positives)} positive points "
            f"({kind}), {'reused' if reused else f'{time.perf_counter() - t0:.1f} s'}")
        out.append(TrainSlide(slide_id, Path(path), store_path, source, tiles, positives,
                              level0_hw, task.tile_px, _species(Path(path)), comp))
    return out


def read_cohort(csv_path: Path, task: TaskSpec
                ) -> tuple[list[Path], list[int], list[tuple[str, str]]]:
    """Slides of a cohort list, the complementary class of each (-1: pixel-annotated) and
    each slide's (patient_id, diagnosis) for the validation split ("" when not given).

    Columns: ``slide`` or ``path`` (relative to the list), ``diagnosis`` (a key of the
    task's ``complementary`` map, e.g. HCC or CCA), optional ``annotated`` (1/0; without
    it, a slide is annotated when annotations lie beside it) and ``patient_id``. A weakly
    labelled slide's patches all carry the complementary label of its diagnosis."""
    import csv

    comp_map = task.model.complementary
    if not comp_map:
        raise UsageError(f"--cohort: task {task.name} does not train from weak labels")
    try:
        rows = list(csv.DictReader(csv_path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{csv_path}: cannot read the cohort list ({exc})") from None
    paths, comps, groups = [], [], []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        raw = row.get("slide") or row.get("path")
        if not raw:
            raise UsageError(f"{csv_path} line {line}: no 'slide' (or 'path') value")
        path = Path(raw) if Path(raw).is_absolute() else csv_path.parent / raw
        if not path.is_file():
            raise UsageError(f"{path}: no such slide (listed in {csv_path} line {line})")
        annotated = row.get("annotated", "")
        if annotated in ("1", "true", "yes"):
            comp = -1
        else:
            try:
                find_annotations(path)
                has_annotations = annotated == ""
            except UsageError:
                has_annotations = False
            if has_annotations:
                comp = -1
            else:
                diagnosis = row.get("diagnosis", "").upper()
                if diagnosis not in comp_map:
                    raise UsageError(f"{csv_path} line {line}: diagnosis {diagnosis!r} of a "
                                     f"slide without annotations; expected one of "
                                     f"{', '.join(comp_map)}")
                comp = task.model.classes.index(comp_map[diagnosis])
        paths.append(path)
        comps.append(comp)
        groups.append((row.get("patient_id", ""), row.get("diagnosis", "").upper()))
    if not paths:
        raise UsageError(f"{csv_path}: the cohort list has no rows")
    return paths, comps, groups


def annotated_glomeruli(path: Path) -> list[tuple[float, float, int]]:
    """(x_um, y_um, label) of each glomerulus annotated beside slide ``path``: from a
    synthetic ``truth.json`` or a QuPath ``<stem>.geojson`` (centroid of each polygon
    classified glomerulus / glomerulus_hypercellular; the slide's MPP converts pixels)."""
    from ..synth import truth_paths

    truth_json, _ = truth_paths(path)
    if truth_json.is_file():
        truth = json.loads(truth_json.read_text())
        return [(o["x_um"], o["y_um"], int(bool(o.get("hypercellular"))))
                for o in truth.get("objects", []) if o.get("type") == "glomerulus"]
    geojson = path.with_suffix(".geojson")
    if not geojson.is_file():
        raise UsageError(f"{path}: no annotations ({truth_json.name} or {geojson.name})")
    from ..slide import open_slide

    slide = open_slide(path)
    mpp = slide.mpp
    slide.close()
    data = json.loads(geojson.read_text())
    features = data.get("features", data) if isinstance(data, dict) else data
    found = []
    for f in features:
        cls = ((f.get("properties") or {}).get("classification") or {})
        name = str(cls.get("name", cls) if isinstance(cls, dict) else cls).strip().casefold()
        if name not in ("glomerulus", "glomerulus_hypercellular"):
            continue
        geometry = f.get("geometry") or {}
        rings = geometry.get("coordinates") or []
        if geometry.get("type") == "MultiPolygon":
            rings = rings[0] if rings else []
        if not rings:
            continue
        xy = np.asarray(rings[0], float)
        found.append((float(xy[:, 0].mean() * mpp), float(xy[:, 1].mean() * mpp),
                      int(name == "glomerulus_hypercellular")))
    return found


# -- split and sampling -------------------------------------------------------------------------
def split_slides(slides: Sequence[TrainSlide], val_fraction: float, seed: int,
                 groups: Sequence[tuple[str, str]] | None = None
                 ) -> tuple[list[TrainSlide], list[TrainSlide]]:
    """Patient-level split: all slides of a patient on the same side, patients stratified
    so that every stratum with at least two patients gives validation one or more.

    ``groups`` holds each slide's (patient_id, stratum), e.g. the patient's diagnosis; an
    empty patient_id makes the slide its own patient, an empty stratum stands for "has
    positive annotations" (or not). Without ``groups`` every slide is its own patient,
    stratified by positives. Mouse slides (the cross-species helpers of kidney-layer) and
    weakly labelled slides always train: validation is on pixel-annotated human slides."""
    if val_fraction <= 0:
        return list(slides), []
    groups = list(groups) if groups is not None else [("", "")] * len(slides)
    if len(groups) != len(slides):
        raise ValueError(f"{len(groups)} groups for {len(slides)} slides")
    rng = np.random.default_rng(seed)
    train: list[TrainSlide] = [s for s in slides if s.species != "human" or s.weak]
    candidates = [i for i, s in enumerate(slides) if s.species == "human" and not s.weak]
    patients: dict[str, list[int]] = {}  # first-appearance order
    for i in candidates:
        patients.setdefault(groups[i][0] or f"slide:{slides[i].slide_id}", []).append(i)
    # strata in a fixed order: with positives, without, then the named ones
    strata: dict[tuple[int, str], list[str]] = {}
    for patient, members in patients.items():
        named = groups[members[0]][1]
        positive = any(len(slides[i].positives_px) for i in members)
        stratum = (2, named) if named else (0, "positive") if positive else (1, "negative")
        strata.setdefault(stratum, []).append(patient)
    val_ids: set[int] = set()
    for stratum in sorted(strata):
        group = strata[stratum]
        order = rng.permutation(len(group))
        n_val = min(len(group) - 1, round(val_fraction * len(group))) if len(group) > 1 else 0
        if n_val == 0 and len(group) > 1:
            n_val = 1
        for j in order[:n_val]:
            val_ids.update(patients[group[j]])
    val = [slides[i] for i in candidates if i in val_ids]
    train += [slides[i] for i in candidates if i not in val_ids]
    if not val:
        raise UsageError(f"{len(slides)} slide(s) cannot be split for validation: give at least "
                         "two slides (patients), --val, or --val-fraction 0")
    return train, val


def sample_patches(slides: Sequence[TrainSlide], n: int, patch_px: int,
                   rng: np.random.Generator, positive_fraction: float = 0.5) -> np.ndarray:
    """A plan of ``n`` patches: (n, 5) int64 rows (slide index, y0, x0, positive-centred,
    augmentation seed), (y0, x0) the level-0 corner (multiple of ``ALIGN_PX``).

    With probability ``positive_fraction`` a patch is centred on a point drawn uniformly
    from all positive annotation points (larger annotations are sampled more); otherwise
    on a uniform position inside a tissue tile drawn uniformly from all tissue tiles."""
    pos_counts = np.array([len(s.positives_px) for s in slides])
    tile_counts = np.array([len(s.tiles) for s in slides])
    if tile_counts.sum() == 0:
        raise UsageError("the training slides hold no tissue tiles")
    positive = rng.random(n) < (positive_fraction if pos_counts.sum() else 0.0)
    plan = np.zeros((n, 5), np.int64)
    plan[:, 3] = positive
    plan[:, 4] = rng.integers(0, 2**62, n)
    pos_index = rng.integers(0, max(pos_counts.sum(), 1), n)
    tile_index = rng.integers(0, tile_counts.sum(), n)
    pos_start, tile_start = np.cumsum(pos_counts) - pos_counts, np.cumsum(tile_counts) - tile_counts
    for i in range(n):
        if positive[i]:
            s = int(np.searchsorted(pos_start, pos_index[i], side="right") - 1)
            cy, cx = slides[s].positives_px[pos_index[i] - pos_start[s]]
        else:
            s = int(np.searchsorted(tile_start, tile_index[i], side="right") - 1)
            r, c = slides[s].tiles[tile_index[i] - tile_start[s]]
            t = slides[s].tile_px
            cy, cx = r * t + rng.integers(t), c * t + rng.integers(t)
        plan[i, 0] = s
        plan[i, 1] = (cy - patch_px // 2) // ALIGN_PX * ALIGN_PX
        plan[i, 2] = (cx - patch_px // 2) // ALIGN_PX * ALIGN_PX
    return plan


def sample_mixed(slides: Sequence[TrainSlide], n: int, patch_px: int, rng: np.random.Generator,
                 positive_fraction: float = 0.5, mouse_fraction: float | None = None,
                 helper: Callable[[TrainSlide], bool] = lambda s: s.species == "mouse"
                 ) -> np.ndarray:
    """`sample_patches` with a fixed share of the patches (``mouse_fraction``) from the
    helper slides (by default the mouse slides; for the liver the weakly labelled ones)
    and the rest from the others, shuffled together, so each batch mixes both whatever
    the slides' sizes; plain `sample_patches` when the cohort has one kind or
    ``mouse_fraction`` is None."""
    mouse = [i for i, s in enumerate(slides) if helper(s)]
    human = [i for i, s in enumerate(slides) if not helper(s)]
    if mouse_fraction is None or not mouse or not human:
        return sample_patches(slides, n, patch_px, rng, positive_fraction)
    n_mouse = int(round(n * mouse_fraction))
    plans = []
    for group, k in ((human, n - n_mouse), (mouse, n_mouse)):
        plan = sample_patches([slides[i] for i in group], k, patch_px, rng, positive_fraction)
        plan[:, 0] = np.asarray(group)[plan[:, 0]]
        plans.append(plan)
    plan = np.concatenate(plans)
    return plan[rng.permutation(len(plan))]


class PatchDataset(torch.utils.data.Dataset):
    """Training or validation patches of a plan (`sample_patches`).

    Item: (x (L, P, P, 3) uint8 -- the level-0 patch and its concentric context patches,
    target (C, P, P) float32, valid (P, P) bool). Each DataLoader worker opens its own
    store handles on first use."""

    def __init__(self, slides: Sequence[TrainSlide], plan: np.ndarray, patch_px: int,
                 task: TaskSpec, levels: tuple[int, ...], *, augment: bool,
                 jitter: float = STAIN_JITTER) -> None:
        self.slides = list(slides)
        self.plan = plan
        self.patch_px = patch_px
        self.mpp = task.mpp
        self.classes = dict(task.model.annotations)
        self.levels = levels
        self.factors = tuple(task.context[k] for k in levels)
        self.augment = augment
        self.jitter = jitter
        self.matrix = REFERENCES[task.stain].matrix
        self._arrays: dict[int, list[Any]] = {}

    def __len__(self) -> int:
        return len(self.plan)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_arrays": {}}   # handles never cross processes

    def _levels(self, s: int) -> list[Any]:
        if s not in self._arrays:
            import zarr

            image = zarr.open_group(str(self.slides[s].store_path), mode="r")["image"]
            self._arrays[s] = [image[str(k)] for k in self.levels]
        return self._arrays[s]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from ..infer import read_context

        s, y0, x0, _, aug_seed = (int(v) for v in self.plan[i])
        p = self.patch_px
        patch = read_context(self._levels(s), self.factors, y0, x0, p)
        source = self.slides[s].annotations
        if source is None:  # weakly labelled: no pixel counts in the supervised loss
            target = np.zeros((len(self.classes), p, p), np.float32)
            valid = np.zeros((p, p), bool)
        else:
            target, valid = source.crop(x0 * self.mpp, y0 * self.mpp, p, p, self.mpp,
                                        self.classes)
        if self.augment:
            patch, target, valid, _ = augment(patch, target, valid,
                                              np.random.default_rng(aug_seed), self.matrix,
                                              self.jitter)
        return torch.from_numpy(patch), torch.from_numpy(target), torch.from_numpy(valid)
