"""``wsi-train``: train a task's segmentation model from annotated slides or a synthetic
cohort, and write a checkpoint (safetensors + JSON sidecar) that ``wsi-run`` loads.

    wsi-train --task fls --data slides/ --out weights/fls_lab [--val held_out/]
    wsi-train --task fls --synth 8 --out weights/fls_synth

Each slide goes through the pipeline's own stages up to the pyramid (``run_slide(...,
until="pyramid")`` into ``--work``), so training sees exactly the normalised pixels that
inference sees; annotations are read beside each slide (`wsi_pipeline.annotations`:
``<stem>.truth.zarr``, QuPath ``<stem>.geojson`` or ``<stem>.labels.tif|png``). Patches of
``--patch-px`` at the working MPP come with their concentric context patches
(`wsi_pipeline.infer.read_context`); about half are centred on points inside positive
annotations, the rest anywhere in tissue. Augmentation: the 8 flips/rotations and a
colour jitter in stain space (each stain's concentration in the task's reference basis
scaled by U(0.85, 1.15)). Loss BCEDice, AdamW, linear warm-up then cosine decay; the
validation slides (a slide-level split) give a patch-level Dice every epoch and the best
epoch's weights are kept.

The bundled demo weights (``wsi_pipeline/weights/fls_demo.*``) come from this one command,
on a synthetic cohort of 8 slides (seeds 1000-1007, even seeds positive, odd negative):

    wsi-train --task fls --synth 8 --out wsi_pipeline/weights/fls_demo --demo \\
        --work /tmp/fls_demo.work --epochs 6 --steps-per-epoch 50 --batch-size 8 --seed 0

The kidney demo weights come from the commands below (seeds 1000+ human, 5000+ mouse).
The bundled mesangial classifier is fine-tuned from scratch on every label of its cohort:
SimCLR pretraining (``--stage pretrain``, then ``--init`` for the fine-tuning) did not
leave chance-level NT-Xent within the steps a 2-core CPU affords; see
benchmarks/bench_simclr.py for the pretrained-vs-scratch comparison.

    wsi-train --task glomeruli --synth 8 --synth-size 8000x6000 \
        --out wsi_pipeline/weights/glomeruli_demo --demo --work /tmp/glom_demo.work \
        --epochs 6 --steps-per-epoch 50 --batch-size 8 --patch-px 256 --seed 0
    wsi-train --task kidney-layer --synth 8 --synth-size 8000x4000 --synth-mouse 3 \
        --out wsi_pipeline/weights/kidney_layer_demo --demo --work /tmp/kl_demo.work \
        --epochs 6 --steps-per-epoch 50 --batch-size 8 --patch-px 256 --seed 0
    wsi-train --task mesangial --stage finetune --synth 12 --synth-size 10000x8000 \
        --encoder tu-mobilenetv3_small_100 --epochs 12 --batch-size 16 --lr 1e-3 \
        --seed 0 --out wsi_pipeline/weights/mesangial_demo --demo --work /tmp/mes_demo.work

The liver demo weights: a synthetic cohort of 12 patients (17 slides), 6 patients
pixel-annotated, the other 6 with the diagnosis only (complementary labels, half of every
batch):

    wsi-train --task liver --synth 12 --synth-annotated 6 --synth-size 4096x3072 \
        --out wsi_pipeline/weights/liver_demo --demo --work /tmp/liver_demo.work \
        --epochs 6 --steps-per-epoch 50 --batch-size 8 --patch-px 256 --seed 0

Expected failures print one line ``wsi-train: error: ...`` and exit 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .annotations import AnnotationSource, find_annotations
from .errors import OutputNotWritable, UsageError, WsiError
from .stain import REFERENCES, rgb_to_od
from .tasks import TRAINABLE_NAMES, TaskSpec, get_task

ALIGN_PX = 4               # patch corners on multiples of the coarsest context factor
STAIN_JITTER = 0.15        # stain concentrations scaled by U(1 - j, 1 + j)
SYNTH_SIZE_PX = (6000, 4500)
SYNTH_SEED = 1000
SYNTH_MOUSE_SEED = 5000
# models trained on another task's synthetic slides (the detector on PAS kidney biopsies)
SYNTH_TASK = {"glomeruli": "mesangial"}
Log = Callable[[str], None]


def say(message: str) -> None:
    """The default log: one line on stdout, flushed (progress under a batch scheduler)."""
    print(message, flush=True)


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


# -- slides and sampling ------------------------------------------------------------------------
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


def make_synthetic_cohort(task: TaskSpec, folder: Path, n: int, *, seed: int = SYNTH_SEED,
                          size_px: tuple[int, int] = SYNTH_SIZE_PX, workers: int = 2,
                          species: str = "human", mpp: float = 0.5, log: Log = say
                          ) -> list[Path]:
    """``n`` synthetic slides of ``task`` (via `wsi_pipeline.synth.write_slide`, as
    ``wsi-synth`` writes them) in ``folder``: seeds ``seed``, ``seed + 1``, ...; even
    indices positive, odd negative (mouse kidney sections: all with cortex). A slide
    already there with the same seed, size, label and species is reused."""
    from .synth import truth_paths, write_slide

    synth_task = SYNTH_TASK.get(task.name, task.name)
    labels = _synth_labels(task) if species == "human" else ("adequate", "adequate")
    extra = {} if species == "human" else {"species": species}
    paths = []
    for i in range(n):
        tag = "" if species == "human" else f"{species}_"
        path = folder / f"{task.name}_synth_{tag}{seed + i}.svs"
        label = labels[i % 2]
        truth_json, truth_zarr = truth_paths(path)
        gen = _read_json(truth_json).get("generator", {}) if truth_json.is_file() else {}
        if path.is_file() and truth_zarr.is_dir() and gen.get("seed") == seed + i \
                and [gen.get("width"), gen.get("height")] == list(size_px) \
                and gen.get("options", {}).get("label") == label:
            log(f"synth {path.name}: reused")
        else:
            t0 = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            write_slide(synth_task, path, width=size_px[0], height=size_px[1], seed=seed + i,
                        mpp=mpp, label=label, workers=workers, **extra)
            log(f"synth {path.name}: {species} {label}, {time.perf_counter() - t0:.1f} s")
        paths.append(path)
    return paths


def make_weak_cohort(task: TaskSpec, folder: Path, patients: int, annotated: int, *,
                     seed: int = SYNTH_SEED, size_px: tuple[int, int] = SYNTH_SIZE_PX,
                     log: Log = say) -> Path:
    """A synthetic weak-label cohort (``wsi-synth --task liver --cohort``) in ``folder``:
    ``patients`` patients, ``annotated`` of them with label masks; returns its
    ``cohort.csv``. Reused when the folder already holds the same cohort."""
    from .synth.liver import write_liver_cohort

    if task.name != "liver":
        raise UsageError(f"no synthetic weak-label cohort for task {task.name}")
    if not 0 <= annotated <= patients:
        raise UsageError(f"--synth-annotated {annotated}: must be in 0..{patients}")
    csv_path = folder / "cohort.csv"
    stamp = folder / "cohort.params.json"
    params = {"patients": patients, "annotated": annotated, "seed": seed,
              "size_px": list(size_px)}
    if csv_path.is_file() and _read_json(stamp) == params:
        log(f"synth cohort {folder}: reused")
        return csv_path
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    write_liver_cohort(folder, patients, annotated, seed, size_px[0], size_px[1])
    stamp.write_text(json.dumps(params))
    log(f"synth cohort {folder}: {patients} patients ({annotated} annotated), "
        f"{time.perf_counter() - t0:.0f} s")
    return csv_path


def _synth_labels(task: TaskSpec) -> tuple[str, str]:
    from .synth import get_spec

    labels = tuple(get_spec(SYNTH_TASK.get(task.name, task.name)).labels)
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
    from .synth import truth_paths

    truth_json, _ = truth_paths(path)
    return str(_read_json(truth_json).get("species", "human")) if truth_json.is_file() \
        else "human"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def expand_slides(items: Sequence[str | Path]) -> list[Path]:
    """Slide files from files and folders (folders: their slides, ``*.truth.*`` skipped)."""
    from .slide import find_slides

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
                   complementary: Sequence[int] | None = None) -> list[TrainSlide]:
    """Run each slide through tissue -> stain -> pyramid into ``work/<slide_id>/store.zarr``
    (reused when done before) and find its annotations; a slide whose ``complementary``
    entry is >= 0 is weakly labelled (no annotations read)."""
    import zarr

    from .batch import unique_ids
    from .run import RunOptions, run_slide

    ids = list(ids) if ids is not None else unique_ids([Path(p).stem for p in paths])
    classes = positive_classes(task)
    weak = list(complementary) if complementary is not None else [-1] * len(paths)
    out = []
    for slide_id, path, comp in zip(ids, paths, weak, strict=True):
        # fail before the long work
        source = find_annotations(path, mpp=mpp) if comp < 0 else None
        t0 = time.perf_counter()
        report = run_slide(path, task, slide_id,
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
        from .infer import read_context

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


# -- training -----------------------------------------------------------------------------------
def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, L, H, W, 3) uint8 -> (B, L, 3, H, W) float in [0, 1] on ``device``."""
    x = x.to(device, non_blocking=device.type == "cuda")
    return x.permute(0, 1, 4, 2, 3).float().div_(255)


def target_index(target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) one-hot targets -> (B, H, W) int64 class index; a pixel of no class
    is background (class 0)."""
    index = target.argmax(1)
    index[target.sum(1) == 0] = 0
    return index


def make_loss(spec: Any, family: str = "cnn") -> tuple[str, Callable[..., torch.Tensor]]:
    """(name, loss(logits, target (B, C, H, W), valid (B, H, W))) for a model of ``spec``
    (`wsi_pipeline.tasks.ModelSpec`): BCEDice for one class; for a softmax model the joint
    loss L_t (weighted focal + Dice) or the hybrid L_s (CE + Dice, weighted per
    architecture ``family``), models.md §1."""
    from .models import losses

    kind = spec.loss if spec.loss != "auto" else ("hybrid" if spec.softmax else "bce_dice")
    if not spec.softmax or kind == "bce_dice":
        return "BCEDice", lambda z, t, v: losses.bce_dice_loss(z, t, valid=v[:, None])
    weights = torch.tensor(spec.class_weights or [1.0] * len(spec.classes))
    if kind == "focal":
        return (f"focal CE (gamma 2, class weights {list(weights.tolist())})",
                lambda z, t, v: losses.weighted_focal_loss(
                    z, target_index(t), weights.to(z.device), alpha=1.0, valid=v))
    if kind == "joint":
        return (f"L_t: weighted focal (class weights {list(weights.tolist())}) + Dice",
                lambda z, t, v: losses.joint_loss(z, target_index(t), weights.to(z.device),
                                                  valid=v))
    if kind == "hybrid":
        return (f"L_s: hybrid CE + Dice ({family})",
                # CNNs: class-weighted CE + Dice; Transformers: 0.5 plain CE + 0.5 Dice
                lambda z, t, v: losses.hybrid_loss(
                    z, target_index(t), family=family, valid=v,
                    class_weights=weights.to(z.device) if family == "cnn" else None))
    raise UsageError(f"unknown loss {kind!r}; choose bce_dice, focal, joint or hybrid")


def confusion_matrix(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
                     ) -> np.ndarray:
    """(C, C) int64 counts of (true class, predicted class) over the valid pixels of a
    softmax model's (B, C, H, W) logits against one-hot (B, C, H, W) targets."""
    c = logits.shape[1]
    true = target_index(target)[valid]
    pred = logits.argmax(1)[valid]
    return np.bincount((true * c + pred).numpy(), minlength=c * c).reshape(c, c)


def confusion_scores(matrix: np.ndarray, score_classes: Sequence[int]) -> dict[str, Any]:
    """Per-class Dice and IoU from a confusion matrix, and their means over
    ``score_classes`` (a class absent from both truth and prediction scores 1)."""
    tp = np.diag(matrix).astype(float)
    fp = matrix.sum(0) - tp
    fn = matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 1.0)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), 1.0)
    pick = list(score_classes)
    return {"dice": float(dice[pick].mean()), "iou": float(iou[pick].mean()),
            "dice_per_class": [round(float(v), 4) for v in dice],
            "iou_per_class": [round(float(v), 4) for v in iou]}


def dice_counts(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
                ) -> tuple[float, float, float]:
    """(true positives, predicted positives, true positives + false negatives) of the
    thresholded (p >= 0.5) prediction over valid pixels; Dice = 2 tp / (pred + truth)."""
    v = valid[:, None].expand_as(target)
    pred = (logits >= 0) & v
    truth = (target > 0.5) & v
    return float((pred & truth).sum()), float(pred.sum()), float(truth.sum())


def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader,
             device: torch.device, score_classes: Sequence[int] | None = None
             ) -> dict[str, Any]:
    """Patch-level {"dice", "precision", "recall"} over all valid pixels of the loader's
    patches (each 1.0 when its denominator is empty); for a softmax model (several
    output channels) the mean Dice and IoU over ``score_classes`` (default: all but the
    background) and both per class (`confusion_scores`)."""
    model.eval()
    tp = pred = truth = 0.0
    matrix = None
    with torch.inference_mode():
        for x, target, valid in loader:
            logits = model(to_input(x, device)).float().cpu()
            if logits.shape[1] > 1:
                m = confusion_matrix(logits, target, valid)
                matrix = m if matrix is None else matrix + m
                continue
            a, b, c = dice_counts(logits, target, valid)
            tp, pred, truth = tp + a, pred + b, truth + c
    if matrix is not None:
        return confusion_scores(matrix, score_classes or range(1, len(matrix)))
    return {"dice": 1.0 if pred + truth == 0 else 2 * tp / (pred + truth),
            "precision": 1.0 if pred == 0 else tp / pred,
            "recall": 1.0 if truth == 0 else tp / truth}


def _complementary_loss(classes: int, weight: float
                        ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(logits, comp (B,), supervised) = supervised + ``weight`` * L_compl over the
    batch's weak patches (comp >= 0), Q of models.md §3's special case (q = 1 - p_y~,
    focal exponent 2); a term with no patches in the batch counts 0."""
    from .models.losses import complementary_loss, complementary_matrix

    q_matrix = complementary_matrix(classes)

    def loss(logits: torch.Tensor, comp: torch.Tensor, supervised: torch.Tensor
             ) -> torch.Tensor:
        weak = comp >= 0
        total = supervised if bool((~weak).any()) else logits.sum() * 0
        if bool(weak.any()) and weight > 0:
            total = total + weight * complementary_loss(logits[weak], comp[weak], q_matrix)
        return total

    return loss


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5 % at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings (the CLI's)."""

    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 8
    patch_px: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_patches: int = 96
    positive_fraction: float = 0.5
    mouse_fraction: float | None = None   # share of mouse patches when the cohort has both
    weak_fraction: float = 0.5    # share of weakly labelled patches when the cohort has both
    compl_lambda: float = 1.0     # weight of the complementary loss of the weak patches
    jitter: float = STAIN_JITTER
    workers: int = 2
    seed: int = 0


def fit(model: torch.nn.Module, task: TaskSpec, train: Sequence[TrainSlide],
        val: Sequence[TrainSlide], opts: TrainOptions, device: torch.device,
        log: Log = say) -> dict[str, Any]:
    """Train ``model`` in place and leave the best validation epoch's weights in it (the
    last epoch's without validation slides). Returns the metrics."""
    loss_name, loss_fn = make_loss(task.model, getattr(model, "family", "cnn"))
    score_classes = task.model.score_classes or None
    levels = tuple(getattr(model, "levels", (0,)))
    rng = np.random.default_rng(opts.seed)
    total = opts.epochs * opts.steps_per_epoch
    if any(s.weak for s in train):
        plan = sample_mixed(train, total * opts.batch_size, opts.patch_px, rng,
                            opts.positive_fraction, opts.weak_fraction, lambda s: s.weak)
        weak_loss = _complementary_loss(len(task.model.classes), opts.compl_lambda)
    else:
        plan = sample_mixed(train, total * opts.batch_size, opts.patch_px, rng,
                            opts.positive_fraction, opts.mouse_fraction)
        weak_loss = None
    # the complementary label of every planned patch (-1: pixel-annotated), batch by batch
    comp_plan = torch.from_numpy(np.array([train[i].complementary for i in plan[:, 0]],
                                          np.int64)).split(opts.batch_size)
    on_gpu = device.type == "cuda"
    loader_kw = {"num_workers": opts.workers, "pin_memory": on_gpu,
                 "prefetch_factor": 4 if opts.workers else None}
    loader = torch.utils.data.DataLoader(
        PatchDataset(train, plan, opts.patch_px, task, levels, augment=True, jitter=opts.jitter),
        batch_size=opts.batch_size, shuffle=False, persistent_workers=opts.workers > 0,
        **loader_kw)
    val_loader = None
    if val:
        val_plan = sample_patches(val, opts.val_patches, opts.patch_px,
                                  np.random.default_rng([opts.seed, 1]), opts.positive_fraction)
        val_loader = torch.utils.data.DataLoader(
            PatchDataset(val, val_plan, opts.patch_px, task, levels, augment=False),
            batch_size=opts.batch_size, shuffle=False, **loader_kw)
    optimiser = torch.optim.AdamW(model.parameters(), lr=opts.lr,
                                  weight_decay=opts.weight_decay)
    warmup = max(1, min(opts.steps_per_epoch, total // 20))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: lr_factor(step, total, warmup))
    amp = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float16
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    started = time.perf_counter()
    batches = iter(loader)
    for epoch in range(1, opts.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        losses = []
        for step in range(opts.steps_per_epoch):
            x, target, valid = next(batches)
            x = to_input(x, device)
            target = target.to(device, non_blocking=on_gpu)
            valid = valid.to(device, non_blocking=on_gpu)
            with torch.autocast(device.type, dtype=amp, enabled=on_gpu):
                logits = model(x).float()
            if weak_loss is None:
                loss = loss_fn(logits, target, valid)
            else:
                comp = comp_plan[(epoch - 1) * opts.steps_per_epoch + step].to(device)
                loss = weak_loss(logits, comp, loss_fn(logits[comp < 0], target[comp < 0],
                                                       valid[comp < 0]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
        scores = (evaluate(model, val_loader, device, score_classes)
                  if val_loader is not None else {})
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4),
               **{f"val_{k}": round(v, 4) if isinstance(v, float) else v
                  for k, v in scores.items()},
               "lr": float(optimiser.param_groups[0]["lr"]), "seconds": round(seconds, 1)}
        history.append(row)
        score = scores["dice"] if scores else float(epoch)
        if best is None or score > best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()))
        if not scores:
            shown = "no validation"
        elif "iou" in scores:
            shown = (f"val Dice {scores['dice']:.4f}, IoU {scores['iou']:.4f} (per class "
                     f"{scores['dice_per_class']})")
        else:
            shown = (f"val Dice {scores['dice']:.4f} (precision {scores['precision']:.3f}, "
                     f"recall {scores['recall']:.3f})")
        log(f"epoch {epoch}/{opts.epochs}  loss {row['loss']:.4f}  {shown}  "
            f"lr {row['lr']:.2e}  {seconds:.1f} s")
    del batches, loader
    assert best is not None
    model.load_state_dict(best[2])
    best_row = history[best[1] - 1]
    return {"val_dice": best_row.get("val_dice"), "val_precision": best_row.get("val_precision"),
            "val_recall": best_row.get("val_recall"), "val_iou": best_row.get("val_iou"),
            "val_dice_per_class": best_row.get("val_dice_per_class"),
            "loss": loss_name, "best_epoch": best[1],
            "epochs": opts.epochs, "steps": total, "patches": total * opts.batch_size,
            "val_patches": opts.val_patches if val else 0,
            "seconds": round(time.perf_counter() - started, 1), "history": history}


# -- command line -------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    d = TrainOptions()
    p = _Parser(prog="wsi-train", description="Train a task's model from annotated slides "
                "or a synthetic cohort; write a safetensors checkpoint + JSON sidecar.")
    p.add_argument("--task", required=True, choices=TRAINABLE_NAMES,
                   help="a task, or glomeruli (the detector mesangial and glomerular-dx share)")
    p.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="slide files or folders; annotations beside each slide")
    p.add_argument("--out", required=True, type=Path,
                   help="checkpoint path without suffix (writes OUT.safetensors, OUT.json)")
    p.add_argument("--work", type=Path, help="work folder for stores and synthetic slides "
                   "(default OUT.work)")
    p.add_argument("--arch", help="architecture (default: the task's)")
    p.add_argument("--encoder", help="encoder name (smp/timm, e.g. tu-mobilenetv3_small_100)")
    p.add_argument("--arch-kwargs", default="{}", metavar="JSON",
                   help='extra architecture arguments, e.g. \'{"encoder_depth": 3}\'')
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--patch-px", type=int, default=d.patch_px,
                   help="training patch edge at the working MPP (inference uses the task's "
                        "tile, 512)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="fraction of patients held out for validation, per diagnosis "
                   "(a --cohort list's patient_id and diagnosis; otherwise each slide is a "
                   "patient, stratified by having positive annotations)")
    p.add_argument("--val", nargs="+", metavar="PATH", help="validation slides or folders "
                   "(instead of --val-fraction)")
    p.add_argument("--val-patches", type=int, default=d.val_patches)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader workers and pyramid threads")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--mpp", type=float, help="override the slides' MPP (um/px)")
    p.add_argument("--demo", action="store_true", help="mark the checkpoint as demo weights")
    p.add_argument("--synth", type=int, default=0, metavar="N",
                   help="first write N synthetic slides into WORK/synth (half positive)")
    p.add_argument("--synth-seed", type=int, default=SYNTH_SEED,
                   help=f"seed of the first synthetic slide (default {SYNTH_SEED})")
    p.add_argument("--synth-size", default="x".join(map(str, SYNTH_SIZE_PX)), metavar="WxH",
                   help="synthetic slide size in pixels at 0.5 um/px")
    p.add_argument("--synth-mouse", type=int, default=0, metavar="M",
                   help="kidney-layer: also write M synthetic mouse kidney sections (seeds "
                        f"from {SYNTH_MOUSE_SEED}) for cross-species training")
    p.add_argument("--mouse-size", default="11000x7000", metavar="WxH",
                   help="synthetic mouse section size in pixels at 1.0 um/px")
    p.add_argument("--mouse-fraction", type=float, default=0.5,
                   help="share of training patches from mouse slides when there are both")
    p.add_argument("--cohort", type=Path, metavar="CSV",
                   help="liver: a cohort list (slide, diagnosis, optional annotated and "
                        "patient_id); slides without annotations train from their "
                        "patient's diagnosis (complementary labels)")
    p.add_argument("--synth-annotated", type=int, default=2, metavar="K",
                   help="liver --synth N: N synthetic patients, K of them pixel-annotated "
                        "(default 2), the rest with the diagnosis only")
    p.add_argument("--weak-fraction", type=float, default=0.5,
                   help="share of weakly labelled patches in each batch (default 0.5)")
    p.add_argument("--compl-lambda", type=float, default=1.0,
                   help="weight of the complementary loss; 0 leaves the weak slides out")
    p.add_argument("--stage", choices=("pretrain", "finetune"),
                   help="mesangial: SimCLR pretraining on glomerulus crops, or fine-tuning "
                        "the M0/M1 classifier (default finetune)")
    p.add_argument("--init", type=Path, metavar="CKPT",
                   help="start from this checkpoint: the task's own (fine-tuning, e.g. the "
                        "detector on a lab's tiles), or for mesangial finetune a SimCLR "
                        "(pretrain) one")
    p.add_argument("--labels-per-class", type=int, default=0, metavar="K",
                   help="mesangial finetune: use at most K labelled glomeruli per class")
    p.add_argument("--tau", type=float, default=0.5, help="SimCLR NT-Xent temperature")
    p.add_argument("--loss", choices=("auto", "bce_dice", "focal", "joint", "hybrid"),
                   default="auto",
                   help="training loss (default: the task's; kidney-layer: joint L_t)")
    p.add_argument("--folds", type=int, default=5, metavar="K",
                   help="glomerular-dx: patient-level K-fold cross-validation before the "
                        "final model (default 5; 0 or 1: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except WsiError as exc:
        print(f"wsi-train: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    task = get_task(args.task, trainable=True)
    if task.model is None:
        print(f"wsi-train: task {task.name} has no trainer in this version", file=sys.stderr)
        return 2
    if args.stage and task.name != "mesangial":
        raise UsageError("--stage is for the mesangial task (SimCLR pretrain / finetune)")
    if task.name == "mesangial":
        from .run import resolve_device
        from .train_crops import run_stage

        return run_stage(args, argv, torch.device(resolve_device(args.device)), say)
    if task.name == "glomerular-dx":
        from .run import resolve_device
        from .train_cases import run_cases

        return run_cases(args, argv, torch.device(resolve_device(args.device)), say)
    if args.loss != "auto":
        task = replace(task, model=replace(task.model, loss=args.loss))
    if args.synth_mouse and task.name != "kidney-layer":
        raise UsageError("--synth-mouse is for kidney-layer (cross-species training)")
    opts = _options(args)
    synth_size = _size(args.synth_size, "--synth-size")
    mouse_size = _size(args.mouse_size, "--mouse-size")
    if not args.data and not args.synth and not args.synth_mouse and not args.cohort:
        raise UsageError("nothing to train on: give --data PATH..., --cohort CSV and/or "
                         "--synth N")
    from .run import resolve_device

    device = torch.device(resolve_device(args.device))
    model, arch_kwargs = _build(task, args, opts)
    work = make_folders(args.out, args.work)
    started = time.perf_counter()
    torch.manual_seed(opts.seed)

    paths = expand_slides(args.data)
    comps = [-1] * len(paths)
    groups = [("", "")] * len(paths)  # (patient_id, diagnosis) for the validation split
    synth: dict[str, Any] | None = None
    cohort_csv = args.cohort
    if args.synth and task.model.complementary:
        cohort_csv = make_weak_cohort(task, work / "synth", args.synth, args.synth_annotated,
                                      seed=args.synth_seed, size_px=synth_size)
        synth = {"patients": args.synth, "annotated": args.synth_annotated,
                 "seed": args.synth_seed, "size_px": list(synth_size), "mpp": 0.5,
                 "cohort": str(cohort_csv), "generator": "wsi-synth"}
    elif args.synth:
        made = make_synthetic_cohort(task, work / "synth", args.synth, seed=args.synth_seed,
                                     size_px=synth_size, workers=opts.workers)
        labels = _synth_labels(task)
        synth = {"n": args.synth, "seeds": [args.synth_seed + i for i in range(args.synth)],
                 "labels": [labels[i % 2] for i in range(args.synth)],
                 "size_px": list(synth_size), "mpp": 0.5, "generator": "wsi-synth"}
        paths += made
        comps += [-1] * len(made)
        groups += [("", "")] * len(made)
    if cohort_csv is not None:
        listed, listed_comps, listed_groups = read_cohort(cohort_csv, task)
        keep = [i for i, c in enumerate(listed_comps) if c < 0 or opts.compl_lambda > 0]
        paths += [listed[i] for i in keep]
        comps += [listed_comps[i] for i in keep]
        groups += [listed_groups[i] for i in keep]
        say(f"cohort {cohort_csv}: {sum(c < 0 for c in listed_comps)} pixel-annotated, "
            f"{sum(c >= 0 for c in listed_comps)} weakly labelled slides"
            + ("" if opts.compl_lambda > 0 else " (left out: --compl-lambda 0)"))
    if args.synth_mouse:
        paths += make_synthetic_cohort(task, work / "synth", args.synth_mouse,
                                       seed=SYNTH_MOUSE_SEED, size_px=mouse_size,
                                       workers=opts.workers, species="mouse", mpp=1.0)
        synth = (synth or {}) | {"mouse": {
            "n": args.synth_mouse,
            "seeds": [SYNTH_MOUSE_SEED + i for i in range(args.synth_mouse)],
            "size_px": list(mouse_size), "mpp": 1.0}}
        comps += [-1] * args.synth_mouse
        groups += [("", "")] * args.synth_mouse
    val_paths = expand_slides(args.val) if args.val else []
    from .batch import unique_ids

    ids = unique_ids([p.stem for p in [*paths, *val_paths]])
    slides = prepare_slides(paths + val_paths, task, work / "stores", workers=opts.workers,
                            mpp=args.mpp, ids=ids, complementary=comps + [-1] * len(val_paths))
    if val_paths:
        train, val = slides[:len(paths)], slides[len(paths):]
    else:
        train, val = split_slides(slides, args.val_fraction, opts.seed, groups)
    if not any(len(s.positives_px) for s in train):
        names = ", ".join(sorted({n for v in task.model.annotations.values() for n in v}))
        raise UsageError(f"no positive annotations ({names}) in the training slides")
    prep_s = time.perf_counter() - started
    say(f"train {len(train)} slides, validate on {len(val)} "
          f"({', '.join(s.slide_id for s in val) or 'none'}); {_describe(model, arch_kwargs)} "
          f"{_parameters(model):,} parameters on {device}")
    model.to(device)
    metrics = fit(model, task, train, val, opts, device)
    metrics |= {"parameters": _parameters(model), "prepare_seconds": round(prep_s, 1),
                "total_seconds": round(time.perf_counter() - started, 1)}
    from .checkpoint import save_checkpoint

    model.cpu()
    meta = {"task": task.name, "classes": list(task.model.classes), "mpp": task.mpp,
            "tile_px": task.tile_px,
            "stain_reference": {"name": task.stain, **REFERENCES[task.stain].to_dict()},
            "demo": bool(args.demo),
            "training": _training_meta(argv, task, opts, train, val, synth, device),
            "metrics": metrics}
    path = save_checkpoint(args.out, model, meta)
    dice = metrics["val_dice"]
    say(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and its .json: val Dice "
          f"{'-' if dice is None else f'{dice:.4f}'} (epoch {metrics['best_epoch']}), "
          f"{metrics['total_seconds']:.0f} s in all")
    return 0


def _options(args: argparse.Namespace) -> TrainOptions:
    for name in ("epochs", "steps_per_epoch", "batch_size", "val_patches"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.patch_px < 32 or args.patch_px % ALIGN_PX:
        raise UsageError(f"--patch-px {args.patch_px}: must be a multiple of {ALIGN_PX}, >= 32")
    for name in ("mouse_fraction", "weak_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.compl_lambda < 0:
        raise UsageError("--compl-lambda must be >= 0")
    if not 0 <= args.val_fraction < 1:
        raise UsageError("--val-fraction must be in [0, 1)")
    if args.workers < 0 or args.synth < 0 or not args.lr > 0:
        raise UsageError("--workers and --synth must be >= 0 and --lr > 0")
    return TrainOptions(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                        batch_size=args.batch_size, patch_px=args.patch_px, lr=args.lr,
                        val_patches=args.val_patches, workers=args.workers, seed=args.seed,
                        mouse_fraction=args.mouse_fraction, weak_fraction=args.weak_fraction,
                        compl_lambda=args.compl_lambda)


def make_folders(out: Path, work: Path | None) -> Path:
    """Create the checkpoint's folder and the work folder (default: ``OUT.work``); returns
    the work folder. Raises OutputNotWritable with one line when either cannot be made."""
    work = work or Path(str(out) + ".work")
    for folder in (out.parent, work):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputNotWritable(f"cannot create {folder}: {exc.strerror or exc}") from None
    return work


def _size(text: str, option: str) -> tuple[int, int]:
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
        assert len(size) == 2 and min(size) > 0
    except (ValueError, AssertionError):
        raise UsageError(f"{option} {text!r}: expected WxH, e.g. 6000x4500") from None
    return size  # type: ignore[return-value]


def _build(task: TaskSpec, args: argparse.Namespace, opts: TrainOptions
           ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model, checked against the patch size with one small forward pass."""
    from .models import build_model

    try:
        kwargs = json.loads(args.arch_kwargs)
        assert isinstance(kwargs, dict)
    except (ValueError, AssertionError):
        raise UsageError(f"--arch-kwargs {args.arch_kwargs!r}: expected a JSON object") from None
    if args.encoder:
        kwargs["encoder_name"] = args.encoder
    kwargs["classes"] = len(task.model.classes)
    arch = args.arch or task.model.arch
    torch.manual_seed(opts.seed)
    if args.init:
        from .checkpoint import load_checkpoint

        model, meta = load_checkpoint(args.init, task=task.checkpoint_task(task.model))
        if args.arch or args.encoder or kwargs != {"classes": len(task.model.classes)}:
            raise UsageError("--init takes the architecture from the checkpoint: drop --arch, "
                             "--encoder and --arch-kwargs")
        return model.train(), dict(meta["arch_kwargs"])
    try:
        model = build_model(arch, **kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise UsageError(f"cannot build {arch} with {kwargs}: {exc}") from None
    x = torch.zeros(1, len(model.levels), 3, opts.patch_px, opts.patch_px)
    try:
        with torch.inference_mode():
            out = model.eval()(x)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--patch-px {opts.patch_px} does not fit {arch}: "
                         f"{str(exc).splitlines()[0]}") from None
    if tuple(out.shape[-2:]) != (opts.patch_px, opts.patch_px):
        raise UsageError(f"{arch} returns {tuple(out.shape[-2:])} for a {opts.patch_px} px "
                         "patch; it must return the patch size")
    return model, dict(getattr(model, "arch_kwargs", kwargs))


def _parameters(model: torch.nn.Module) -> int:
    from .models import count_parameters

    return count_parameters(model)


def _describe(model: torch.nn.Module, kwargs: dict[str, Any]) -> str:
    from .models.m2cf_net import describe

    return describe(getattr(model, "arch", type(model).__name__), kwargs)


def _training_meta(argv: list[str], task: TaskSpec, opts: TrainOptions,
                   train: Sequence[TrainSlide], val: Sequence[TrainSlide],
                   synth: dict[str, Any] | None, device: torch.device) -> dict[str, Any]:
    from . import __version__

    def slides(group: Sequence[TrainSlide]) -> list[dict[str, Any]]:
        return [{"id": s.slide_id, "file": s.path.name,
                 "annotations": s.annotations.kind if s.annotations is not None else
                 f"weak: not {task.model.classes[s.complementary]}",
                 "positive_points": int(len(s.positives_px))} for s in group]

    return {"command": "wsi-train " + shlex.join(argv), "package_version": __version__,
            "torch": torch.__version__, "device": str(device),
            "slides": {"train": slides(train), "validation": slides(val)},
            "synthetic_cohort": synth,
            "annotation_classes": {k: list(v) for k, v in task.model.annotations.items()},
            "sampling": {"patch_px": opts.patch_px, "levels_mpp": list(task.level_mpps),
                         "positive_fraction": opts.positive_fraction,
                         "positive_point_stride_um": 16.0},
            "augmentation": {"flips_rot90": True, "stain_jitter": [1 - opts.jitter,
                                                                    1 + opts.jitter],
                             "stain_basis": task.stain},
            "optimiser": {"name": "AdamW", "lr": opts.lr, "weight_decay": opts.weight_decay,
                          "schedule": "linear warm-up, cosine to 5 %",
                          "batch_size": opts.batch_size, "epochs": opts.epochs,
                          "steps_per_epoch": opts.steps_per_epoch},
            "loss": make_loss(task.model)[0], "mouse_fraction": opts.mouse_fraction,
            "weak_labels": ({"fraction": opts.weak_fraction, "lambda": opts.compl_lambda,
                             "loss": "complementary (Q special case, focal exponent 2)"}
                            if any(s.weak for s in train) else None),
            "seed": opts.seed}


if __name__ == "__main__":
    sys.exit(main())
