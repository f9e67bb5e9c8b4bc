"""The ``cases`` trainer (``wsi-train --task glomerular-dx``): CMUS-Net on case folders,
patient-level k-fold CV.

    wsi-train --task glomerular-dx --synth 45 --out weights/gdx_synth
    wsi-train --task glomerular-dx --data cohort/ --folds 5 --out weights/gdx_lab

Cases: ``--data`` case folders (om/, im/, tem/) or folders of case folders; the label of a
case is ``diagnosis.label`` of its ``truth.json`` or its row (``case_id``, ``diagnosis``,
optional ``patient_id``) of a ``cases.csv`` beside it; ``--synth N`` first writes N
synthetic cases (`synth.cases.write_case_cohort`, balanced IgAN / MN / LN) into
``WORK/synth``. OM: every annotated glomerulus of the case's slide (the om slide's
``truth.json`` or a QuPath ``<stem>.geojson``, as `train.data.annotated_glomeruli` reads
them) gives a 512 x 512 crop at 0.5 um/px read from the pipeline's own normalised pyramid
(``run_slide(..., until="pyramid")``), so training sees what inference sees; IM and TEM are
read by `wsi_pipeline.case` (first IM image, first 10 TEM images in sorted order). Every
image is kept in memory at the network's ``image_px`` (what inference sees) and at twice
that (for training's random crops).

Training (docs/models.md §2): Adam (amsgrad), weight decay 5e-5, cosine decay from ``--lr``
to ``--lr`` / 10 over the epochs, batches of 4 cases, loss ``cmus_loss``
(CE fusion + 0.3 OM + 0.5 IM + 0.2 TEM); per step one random annotated OM crop of each case.
Our choices, for tiny randomly initialised encoders on a CPU (the paper: ImageNet Swin-B,
lr 5e-5, 40 epochs), all in `CaseTrainOptions`:

- [choice] lr 3e-3 and 120 epochs (an epoch: one pass over the training cases, last
  partial batch dropped). At 1e-3 and 40-60 epochs the OM and TEM branches stayed near
  chance on held-out cases (the IM branch learns first and the fusion leans on it).
- [choice] augmentation beyond the paper's flips: random square crops of >= 75 % of each
  image's side, the 8 flips/rotations, brightness/contrast jitter of IM and TEM (+-15 %),
  and a random subset of at most 4 real TEM images per case per step (also halves the
  step's cost; inference uses the first 10).
- [choice] BatchNorm statistics are re-estimated on the training images after the last
  step (`recalibrate_bn`).

``--folds K`` (default 5; 0 or 1: none): patient-level K-fold cross-validation, folds
stratified by diagnosis; each fold trains a fresh model and evaluates the held-out cases
as inference does (the fusion probabilities averaged over up to 8 OM crops): accuracy of
the fusion and of each single-modality head per fold, mean and sd. Then the final model is
trained on every case and saved with the CV metrics in its sidecar.

The bundled demo weights (``wsi_pipeline/weights/glomerular_dx_demo.*``) come from:

    OMP_NUM_THREADS=1 nice wsi-train --task glomerular-dx --synth 45 --synth-seed 2000 \\
        --synth-size 2048x1536 --folds 0 --seed 0 --demo \\
        --out wsi_pipeline/weights/glomerular_dx_demo --work /tmp/gdx_demo.work

(the default architecture: ``tu-mobilenetv3_small_050`` encoders at depth 5, token width
64, 128 px inputs; see ``DEMO_ARCH``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import OutputNotWritable, UsageError
from .common import (
    Log,
    command_line,
    make_folders,
    parse_size,
    software_meta,
    stain_reference_meta,
)
from .data import annotated_glomeruli

if TYPE_CHECKING:
    from ..tasks import Task

# [choice] a CPU-sized CMUS-Net: three ~0.3 M-parameter MobileNetV3 encoders (1.8 MB fp16)
DEMO_ARCH = {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 5, "width": 64,
             "image_px": 128}
SYNTH_CASE_SIZE_PX = (2048, 1536)
SYNTH_CASE_SEED = 2000
EVAL_CROPS = 8  # OM crops averaged per case in evaluation (inference: the largest 8)
AUGMENT_SCALE = 2  # training keeps each image at 2 x image_px for its random crops


@dataclass(frozen=True)
class CaseData:
    """One case in memory. At the network's ``image_px`` (what inference sees): om
    (G, px, px, 3) uint8 crops of its annotated glomeruli; im (px, px, 3); tem (T, px, px, 3)
    zero-padded bag with its (T,) bool mask. The same images at ``AUGMENT_SCALE`` times
    that size for training's random crops: om_hi, im_hi, tem_hi (the real images only).
    label: index into the class names."""

    case_id: str
    patient_id: str
    label: int
    om: np.ndarray
    im: np.ndarray
    tem: np.ndarray
    tem_mask: np.ndarray
    om_hi: np.ndarray | None = None
    im_hi: np.ndarray | None = None
    tem_hi: np.ndarray | None = None


@dataclass(frozen=True)
class CaseTrainOptions:
    """epochs, batch_size (cases), lr (peak; cosine down to lr * min_lr_ratio),
    weight_decay; augmentation: random crops of at least ``min_crop`` of each image's side
    (1: none), the 8 flips/rotations (``dihedral``) or only flips, brightness/contrast
    jitter of IM and TEM by up to ``jitter``; ``tem_per_step`` real TEM images per case
    per step at most (a random subset, 0: all)."""

    epochs: int = 120
    batch_size: int = 4
    lr: float = 3e-3
    min_lr_ratio: float = 0.1      # cosine to lr * ratio (paper: 5e-5 -> 5e-6)
    weight_decay: float = 5e-5
    min_crop: float = 0.75
    dihedral: bool = True
    jitter: float = 0.15
    tem_per_step: int = 4
    seed: int = 0


# -- cases ------------------------------------------------------------------------------------
def expand_cases(items: Sequence[str | Path]) -> list[Path]:
    """Case folders from case folders and folders of case folders (sub-folders with om/)."""
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if (p / "om").is_dir():
            found.append(p)
        elif p.is_dir():
            subs = sorted(s for s in p.iterdir() if (s / "om").is_dir())
            if not subs:
                raise UsageError(f"{p}: neither a case folder (om/, im/, tem/) nor a folder "
                                 "of case folders")
            found.extend(subs)
        else:
            raise UsageError(f"{p}: no such case folder")
    return found


def case_label(folder: Path) -> tuple[str, str]:
    """(diagnosis, patient id) of a case: its ``truth.json``, or its row of a ``cases.csv``
    in the folder above (``case_id``, ``diagnosis``, optional ``patient_id``)."""
    listed: dict[str, str] = {}
    table = folder.parent / "cases.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                if row.get("case_id") == folder.name:
                    listed = row
    truth = folder / "truth.json"
    label = listed.get("diagnosis", "")
    if not label and truth.is_file():
        label = (json.loads(truth.read_text()).get("diagnosis") or {}).get("label") or ""
    if not label:
        raise UsageError(f"{folder}: no diagnosis (truth.json or a cases.csv row with "
                         "case_id and diagnosis)")
    return label, listed.get("patient_id") or folder.name


def collect_cases(folders: Sequence[Path], work: Path, class_names: Sequence[str],
                  image_px: int, max_tem: int = 10, *, workers: int = 2,
                  mpp: float | None = None, log: Log = print, task: Task | None = None
                  ) -> list[CaseData]:
    """Every case of ``folders`` in memory (see the module docstring); OM pyramids go to
    ``work/<case id>/store.zarr`` and are reused. ``task`` runs the stages (default: the
    glomerular-dx plugin)."""
    import zarr

    from ..batch import unique_ids
    from ..case import read_case, resize_square, stack_tem
    from ..pipeline import RunOptions, run_slide
    from ..tasks import get_plugin
    from ..tasks.glomeruli import GlomerulusParams, read_crops

    plugin = task or get_plugin("glomerular-dx")
    task = plugin.spec
    params = GlomerulusParams()
    out = []
    for case_id, folder in zip(unique_ids([f.name for f in folders]), folders, strict=True):
        label, patient = case_label(folder)
        if label not in class_names:
            raise UsageError(f"{folder}: diagnosis {label!r} is not one of "
                             f"{', '.join(class_names)}")
        case = read_case(folder, max_tem=max_tem)
        found = annotated_glomeruli(case.om_path)
        if not found:
            raise UsageError(f"{case.om_path}: no annotated glomeruli")
        run_slide(case.om_path, plugin, case_id,
                  RunOptions(out=work, until="pyramid", workers=workers, mpp=mpp))
        image = zarr.open_group(str(work / case_id / "store.zarr"), mode="r")["image/0"]
        centres = np.array([(x, y) for x, y, _ in found], float).reshape(-1, 2)
        crops = read_crops(image, task.mpp, centres, params)
        hi = image_px * AUGMENT_SCALE
        om = np.stack([resize_square(c, image_px) for c in crops])
        tem, mask = stack_tem(case.tem, image_px, max_tem)
        out.append(CaseData(case_id, patient, list(class_names).index(label), om,
                            resize_square(case.im, image_px), tem, mask,
                            om_hi=np.stack([resize_square(c, hi) for c in crops]),
                            im_hi=resize_square(case.im, hi),
                            tem_hi=np.stack([resize_square(t, hi) for t in case.tem])))
        log(f"case {case_id}: {label}, {len(om)} glomeruli, {int(mask.sum())} TEM images")
    return out


# -- folds, batches, training ---------------------------------------------------------------
def patient_folds(labels: Sequence[int], patients: Sequence[str], k: int, seed: int = 0
                  ) -> np.ndarray:
    """(N,) fold index of each case: every case of a patient in the same fold, patients
    dealt round-robin to the folds in a seeded random order within each diagnosis (a
    patient's diagnosis: the most common one of its cases), so folds are stratified."""
    patients = list(patients)
    unique = sorted(set(patients))
    if k < 2 or k > len(unique):
        raise UsageError(f"{k} folds need at least {k} patients (have {len(unique)}) and "
                         "k >= 2")
    rng = np.random.default_rng([seed, 4211])
    by_label: dict[int, list[str]] = {}
    for pat in unique:
        labs = [lab for lab, p in zip(labels, patients, strict=True) if p == pat]
        by_label.setdefault(max(set(labs), key=labs.count), []).append(pat)
    fold_of: dict[str, int] = {}
    turn = 0
    for lab in sorted(by_label):
        for pat in rng.permutation(by_label[lab]).tolist():
            fold_of[pat] = turn % k
            turn += 1
    return np.array([fold_of[p] for p in patients])


def augment(image: np.ndarray, out_px: int, rng: np.random.Generator, opts: CaseTrainOptions,
            jitter: str = "") -> np.ndarray:
    """(out_px, out_px, 3) uint8: a random square crop of at least ``opts.min_crop`` of the
    side of ``image`` (H, W, 3) uint8, resized, then a random flip/rotation; ``jitter``
    "im" scales the intensity by U(1 - j, 1 + j) (dark background stays dark), "tem" also
    shifts it by U(-j, j) * 64 around mid-grey."""
    from ..case import resize_square

    h, w = image.shape[:2]
    side = int(round(min(h, w) * np.sqrt(rng.uniform(opts.min_crop ** 2, 1.0))))
    y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    out = resize_square(np.ascontiguousarray(image[y:y + side, x:x + side]), out_px)
    k = int(rng.integers(8 if opts.dihedral else 4))
    out = np.rot90(out, k % 4) if opts.dihedral else (out[::-1] if k & 2 else out)
    out = out[:, ::-1] if (k >= 4 if opts.dihedral else k & 1) else out
    if jitter and opts.jitter > 0:
        gain = rng.uniform(1 - opts.jitter, 1 + opts.jitter)
        f = out.astype(np.float32)
        f = f * gain if jitter == "im" else \
            (f - 128) * gain + 128 + rng.uniform(-opts.jitter, opts.jitter) * 64
        out = np.clip(f, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def make_batch(cases: Sequence[CaseData], rng: np.random.Generator, device: torch.device,
               opts: CaseTrainOptions | None = None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs of a training batch and the (B,) int64 targets: per case one random
    OM crop, the IM image and its real TEM images (a random subset of ``tem_per_step``),
    each augmented (`augment`, from the ``*_hi`` images); the bag padded to the batch's
    largest real count."""
    from ..tasks.glomerular_dx import _images_to_tensor

    opts = opts or CaseTrainOptions()
    px = cases[0].om.shape[1]
    bags = []
    for c in cases:
        real = c.tem_hi if c.tem_hi is not None else c.tem[c.tem_mask]
        pick = np.arange(len(real))
        if 0 < opts.tem_per_step < len(real):
            pick = np.sort(rng.permutation(len(real))[:opts.tem_per_step])
        bags.append([augment(real[i], px, rng, opts, "tem") for i in pick])
    n_tem = max(len(b) for b in bags)
    tem = np.zeros((len(cases), n_tem, px, px, 3), np.uint8)
    mask = np.zeros((len(cases), n_tem), bool)
    for i, bag in enumerate(bags):
        tem[i, :len(bag)] = bag
        mask[i, :len(bag)] = True
    om = np.stack([augment((c.om_hi if c.om_hi is not None else c.om)[
        rng.integers(len(c.om))], px, rng, opts) for c in cases])
    im = np.stack([augment(c.im_hi if c.im_hi is not None else c.im, px, rng, opts, "im")
                   for c in cases])
    batch = {"om": _images_to_tensor(om, str(device)), "im": _images_to_tensor(im, str(device)),
             "tem": _images_to_tensor(tem, str(device)),
             "tem_mask": torch.from_numpy(mask).to(device)}
    return batch, torch.tensor([c.label for c in cases], device=device)


def train_cmus(model: torch.nn.Module, cases: Sequence[CaseData], opts: CaseTrainOptions,
               device: torch.device, log: Log = print, tag: str = "") -> dict[str, Any]:
    """Train ``model`` in place on ``cases`` (see the module docstring); returns the
    per-epoch mean loss and timings."""
    from ..models.cmus_net import cmus_loss

    rng = np.random.default_rng([opts.seed, 77])
    batch = min(opts.batch_size, len(cases))
    steps_per_epoch = max(len(cases) // batch, 1)
    total = opts.epochs * steps_per_epoch
    optimiser = torch.optim.Adam(model.parameters(), lr=opts.lr, amsgrad=True,
                                 weight_decay=opts.weight_decay)
    floor = opts.min_lr_ratio

    def factor(step: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / max(total - 1, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    model.to(device).train()
    history = []
    started = time.perf_counter()
    for epoch in range(1, opts.epochs + 1):
        order = rng.permutation(len(cases))
        losses = []
        for s in range(steps_per_epoch):
            inputs, target = make_batch([cases[i] for i in order[s * batch:(s + 1) * batch]],
                                        rng, device, opts)
            loss = cmus_loss(model(inputs), target)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
        history.append(round(float(np.mean(losses)), 4))
        if epoch == 1 or epoch % 5 == 0 or epoch == opts.epochs:
            log(f"{tag}epoch {epoch}/{opts.epochs}  loss {history[-1]:.4f}  "
                f"{time.perf_counter() - started:.0f} s")
    recalibrate_bn(model, cases, device)
    seconds = time.perf_counter() - started
    return {"loss": history, "steps": total, "seconds": round(seconds, 1),
            "cases_per_s": round(total * batch / seconds, 2) if seconds else None}


def recalibrate_bn(model: torch.nn.Module, cases: Sequence[CaseData], device: torch.device,
                   batch_size: int = 16) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain mean over the training
    cases' un-augmented images (each encoder on its own modality), and leave the model in
    eval mode. [choice] From-scratch encoders trained with batches of 4 and a high learning
    rate end with running statistics (momentum 0.1) that lag the weights: eval-mode accuracy
    jumped by +-0.2 between neighbouring steps; recalibrated it follows the training loss."""
    from ..tasks.glomerular_dx import _images_to_tensor

    sets = {"enc_om": np.concatenate([c.om for c in cases]),
            "enc_im": np.stack([c.im for c in cases]),
            "enc_tem": np.concatenate([c.tem[c.tem_mask] for c in cases])}
    for name, images in sets.items():
        encoder = getattr(model, name)
        norms = [m for m in encoder.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        encoder.train()
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                encoder(_images_to_tensor(images[i:i + batch_size], str(device)))
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
    model.eval()


def evaluate_cases(model: torch.nn.Module, cases: Sequence[CaseData], device: torch.device
                   ) -> dict[str, Any]:
    """Each case as inference classifies it (`tasks.glomerular_dx.predict_case` on up to
    ``EVAL_CROPS`` OM crops): accuracy of the fusion and of each modality head, and the
    (N, K) fusion probabilities. A head the model lacks (its logits None) scores None."""
    from ..tasks.glomerular_dx import predict_case

    probs: dict[str, list[np.ndarray]] = {h: [] for h in ("fusion", "om", "im", "tem")}
    for c in cases:
        pred = predict_case(model, c.om[:EVAL_CROPS], c.im, c.tem, c.tem_mask, str(device))
        for h in probs:
            probs[h].append(pred[h])
    labels = np.array([c.label for c in cases])
    out: dict[str, Any] = {
        f"accuracy_{h}": None if any(q is None for q in p) else
        round(float((np.argmax(np.stack(p), 1) == labels).mean()), 4)
        for h, p in probs.items()}
    out["probabilities"] = np.stack(probs["fusion"])
    return out


def cross_validate(cases: Sequence[CaseData], k: int, build: Callable[[], torch.nn.Module],
                   opts: CaseTrainOptions, device: torch.device, log: Log = print
                   ) -> dict[str, Any]:
    """Patient-level ``k``-fold CV: per fold a fresh ``build()`` model trained on the other
    folds and evaluated on its own; per-fold accuracies (fusion and each head), mean and
    sd (population sd over folds), and each case's held-out prediction."""
    folds = patient_folds([c.label for c in cases], [c.patient_id for c in cases], k,
                          opts.seed)
    rows, predicted = [], {}
    for f in range(k):
        train = [c for c, g in zip(cases, folds, strict=True) if g != f]
        test = [c for c, g in zip(cases, folds, strict=True) if g == f]
        torch.manual_seed(opts.seed * 100 + f)
        model = build()
        fit = train_cmus(model, train, opts, device, log, tag=f"fold {f + 1}/{k} ")
        ev = evaluate_cases(model, test, device)
        for c, p in zip(test, ev.pop("probabilities"), strict=True):
            predicted[c.case_id] = int(np.argmax(p))
        rows.append({"fold": f + 1, "train_cases": len(train), "test_cases": len(test),
                     **ev, "train_seconds": fit["seconds"]})
        scores = "  ".join(f"{h} {ev[f'accuracy_{h}']:.3f}" for h in ("fusion", "om", "im",
                                                                     "tem")
                           if ev[f"accuracy_{h}"] is not None)
        log(f"fold {f + 1}/{k}: accuracy {scores}  ({len(test)} held-out cases)")
    summary = {}
    for h in ("fusion", "om", "im", "tem"):
        if rows[0][f"accuracy_{h}"] is None:
            continue
        acc = np.array([r[f"accuracy_{h}"] for r in rows])
        summary[h] = {"mean": round(float(acc.mean()), 4), "sd": round(float(acc.std()), 4)}
    return {"folds": k, "per_fold": rows, "accuracy": summary,
            "held_out_prediction": predicted, "level": "patient"}


# -- command line -------------------------------------------------------------------------------
def _given(argv: Sequence[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in argv)


def make_synthetic_cases(folder: Path, n: int, seed: int, size_px: tuple[int, int],
                         log: Log = print) -> list[Path]:
    """``n`` synthetic cases in ``folder`` (reused when the same cohort is already there)."""
    from ..synth.cases import write_case_cohort

    marker = folder / "cohort.json"
    want = {"cases": n, "seed": seed, "om_size_px": list(size_px)}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        log(f"synthetic cohort {folder}: reused ({n} cases)")
    else:
        t0 = time.perf_counter()
        write_case_cohort(folder, n, seed=seed, om_size_px=size_px)
        marker.write_text(json.dumps(want))
        log(f"synthetic cohort {folder}: {n} cases in {time.perf_counter() - t0:.0f} s")
    return [folder / f"case_{i + 1:03d}" for i in range(n)]


def run(args: argparse.Namespace, argv: Sequence[str], plugin: Task, log: Log = print) -> int:
    """``wsi-train`` for a task of the ``cases`` trainer (``args`` from
    `wsi_pipeline.train.cli.build_parser`); returns the exit code."""
    from ..checkpoint import save_checkpoint
    from ..models import build_model, count_parameters
    from ..pipeline import resolve_device

    device = torch.device(resolve_device(args.device))
    task = plugin.spec
    spec = task.classifier
    opts = CaseTrainOptions(
        epochs=args.epochs if _given(argv, "--epochs") else CaseTrainOptions.epochs,
        batch_size=args.batch_size if _given(argv, "--batch-size") else 4,
        lr=args.lr if _given(argv, "--lr") else CaseTrainOptions.lr, seed=args.seed)
    if opts.epochs < 1 or opts.batch_size < 1 or not opts.lr > 0 or args.synth < 0:
        raise UsageError("--epochs and --batch-size must be >= 1, --lr > 0, --synth >= 0")
    try:
        kwargs = {**DEMO_ARCH, **json.loads(args.arch_kwargs)}
    except ValueError:
        raise UsageError(f"--arch-kwargs {args.arch_kwargs!r}: expected a JSON object") from None
    if args.encoder:
        kwargs["encoder_name"] = args.encoder
    kwargs["classes"] = list(spec.classes)
    if args.arch and args.arch != spec.arch:
        raise UsageError(f"glomerular-dx trains {spec.arch}, not {args.arch}")

    def build() -> torch.nn.Module:
        try:
            return build_model(spec.arch, **kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot build {spec.arch} with {kwargs}: {exc}") from None

    if not args.data and not args.synth:
        raise UsageError("nothing to train on: give --data CASE_FOLDERS... and/or --synth N")
    work = make_folders(args.out, args.work)
    started = time.perf_counter()
    folders = expand_cases(args.data)
    synth = None
    if args.synth:
        size = parse_size(args.synth_size, "--synth-size") if _given(argv, "--synth-size") \
            else SYNTH_CASE_SIZE_PX
        seed = args.synth_seed if _given(argv, "--synth-seed") else SYNTH_CASE_SEED
        folders += make_synthetic_cases(work / "synth", args.synth, seed, size, log)
        synth = {"cases": args.synth, "seed": seed, "om_size_px": list(size), "mpp": 0.5,
                 "generator": "wsi_pipeline.synth.cases.write_case_cohort"}
    probe = build()
    cases = collect_cases(folders, work / "stores", spec.classes, probe.image_px,
                          probe.max_tem, workers=args.workers, mpp=args.mpp, log=log,
                          task=plugin)
    prep_s = time.perf_counter() - started
    counts = {c: sum(k.label == i for k in cases) for i, c in enumerate(spec.classes)}
    log(f"{len(cases)} cases ({', '.join(f'{c} {n}' for c, n in counts.items())}); "
        f"CMUS-Net {kwargs['encoder_name']} width {kwargs['width']} "
        f"{kwargs['image_px']} px, {count_parameters(probe):,} parameters on {device}")
    metrics: dict[str, Any] = {"prepare_seconds": round(prep_s, 1)}
    if args.folds >= 2:
        cv = cross_validate(cases, args.folds, build, opts, device, log)
        metrics["cv"] = {k: v for k, v in cv.items() if k != "held_out_prediction"}
        acc = cv["accuracy"]
        log(f"{args.folds}-fold patient-level CV accuracy: fusion {acc['fusion']['mean']:.3f}"
            f" +/- {acc['fusion']['sd']:.3f}; OM head {acc['om']['mean']:.3f}, IM head "
            f"{acc['im']['mean']:.3f}, TEM head {acc['tem']['mean']:.3f}")
    torch.manual_seed(opts.seed)
    model = build()
    fit = train_cmus(model, cases, opts, device, log, tag="final ")
    train_eval = evaluate_cases(model, cases, device)
    train_eval.pop("probabilities")
    metrics |= {"final": fit, "train_accuracy": train_eval,
                "parameters": count_parameters(model),
                "total_seconds": round(time.perf_counter() - started, 1)}
    model.cpu()
    meta = {"task": task.name, "classes": list(spec.classes), "mpp": task.mpp,
            "tile_px": task.tile_px, "demo": bool(args.demo),
            "stain_reference": stain_reference_meta(task),
            "training": {
                "command": command_line(argv), **software_meta(device),
                "synthetic_cohort": synth,
                "cases": {c.case_id: spec.classes[c.label] for c in cases},
                "om_crops": "512 px at 0.5 um/px around each annotated glomerulus, from the "
                            "normalised pyramid; one random crop per case per step",
                "augmentation": "random horizontal / vertical flips of every image",
                "optimiser": {"name": "Adam", "amsgrad": True, "lr": opts.lr,
                              "weight_decay": opts.weight_decay,
                              "schedule": f"cosine to lr x {opts.min_lr_ratio}",
                              "batch_size": opts.batch_size, "epochs": opts.epochs},
                "loss": "CE fusion + 0.3 CE OM + 0.5 CE IM + 0.2 CE TEM", "seed": opts.seed},
            "metrics": metrics}
    try:
        path = save_checkpoint(args.out, model, meta)
    except OSError as exc:
        raise OutputNotWritable(f"cannot write {args.out}: {exc.strerror or exc}") from None
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and its .json, "
        f"{metrics['total_seconds']:.0f} s in all")
    return 0
