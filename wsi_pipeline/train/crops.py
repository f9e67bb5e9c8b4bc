"""The ``crops`` trainer (``wsi-train --task mesangial --stage pretrain|finetune``): the
glomerulus classifier.

    wsi-train --task mesangial --stage pretrain --synth 12 --out weights/mes_simclr
    wsi-train --task mesangial --stage finetune --synth 12 --init weights/mes_simclr.safetensors \\
        --labels-per-class 20 --out weights/mes_m1

Glomerulus crops (512 x 512 at 0.5 um/px, the crops the ``mesangial`` task classifies) are
cut around each annotated glomerulus of the slides, after the pipeline's own stages up to
the pyramid (stain-normalised exactly as at inference). Annotations
(`wsi_pipeline.train.data.annotated_glomeruli`): a synthetic slide's ``truth.json``
(glomeruli with their hypercellular flag) or a QuPath ``<stem>.geojson`` whose glomeruli
are classified ``glomerulus`` (M0-like) or ``glomerulus_hypercellular``. Crops are kept at
``INPUT_PX`` (1 um/px) in memory.

pretrain: SimCLR (docs/models.md §5) on all crops without their labels: two views per crop
(`models.simclr.simclr_view`: random crop, flip, rotation, colour jitter, CLAHE), NT-Xent,
AdamW. Writes a checkpoint of task ``mesangial-pretrain``.
finetune: the classifier (encoder from ``--init`` or from scratch) on labelled crops
(``--labels-per-class`` limits the labels, the seed's few-label setting), flips/rotations,
BCE; the validation slides' crops give the glomerulus-level AUC every epoch and the best
epoch is kept. Writes the ``mesangial`` checkpoint that ``wsi-run`` loads.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import mannwhitneyu

from ..errors import UsageError
from ..models.simclr import classifier_input, images_to_tensor, simclr_view
from ..tasks.mesangial import INPUT_PX
from .common import Log, command_line, parse_size, software_meta, stain_reference_meta
from .data import annotated_glomeruli, expand_slides, make_synthetic_cohort, require_synth

if TYPE_CHECKING:
    from ..tasks import Task

VIEW_PX = 224           # SimCLR views
PRETRAIN_TASK = "mesangial-pretrain"


@dataclass(frozen=True)
class CropSet:
    """crops (N, INPUT_PX, INPUT_PX, 3) uint8; labels (N,) int8 1 hypercellular, 0 not,
    -1 unknown; slide (N,) index into ``slide_ids``."""

    crops: np.ndarray
    labels: np.ndarray
    slide: np.ndarray
    slide_ids: list[str]

    def subset(self, keep: np.ndarray) -> CropSet:
        return CropSet(self.crops[keep], self.labels[keep], self.slide[keep], self.slide_ids)


def collect_crops(paths: Sequence[Path], ids: Sequence[str], work: Path, *, workers: int = 2,
                  mpp: float | None = None, log: Log = print, task: Task | None = None
                  ) -> CropSet:
    """Normalised glomerulus crops of every annotated glomerulus of ``paths`` (see the
    module docstring); pyramids go to ``work/<id>/store.zarr`` and are reused. ``task``
    runs the stages (default: the mesangial plugin)."""
    import zarr

    from ..pipeline import RunOptions, run_slide
    from ..tasks import get_plugin
    from ..tasks.glomeruli import GlomerulusParams, read_crops

    plugin = task or get_plugin("mesangial")
    task = plugin.spec
    params = GlomerulusParams()
    crops, labels, slide_index = [], [], []
    for i, (slide_id, path) in enumerate(zip(ids, paths, strict=True)):
        found = annotated_glomeruli(Path(path))
        run_slide(path, plugin, slide_id, RunOptions(out=work, until="pyramid",
                                                     workers=workers, mpp=mpp))
        image = zarr.open_group(str(work / slide_id / "store.zarr"), mode="r")["image/0"]
        centres = np.array([(x, y) for x, y, _ in found], float).reshape(-1, 2)
        for crop in read_crops(image, task.mpp, centres, params):
            crops.append(classifier_input(crop, INPUT_PX))
        labels += [lab for _, _, lab in found]
        slide_index += [i] * len(found)
        log(f"slide {slide_id}: {len(found)} glomeruli "
            f"({sum(lab for _, _, lab in found)} hypercellular)")
    if not crops:
        raise UsageError("no annotated glomeruli in the training slides")
    return CropSet(np.stack(crops), np.array(labels, np.int8), np.array(slide_index),
                   list(ids))


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U / n1 n0);
    None without both classes."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return None
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def balanced_accuracy(decided: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean of the recall of each class of binary ``labels`` (None without both)."""
    if not (labels == 1).any() or not (labels == 0).any():
        return None
    return float((decided[labels == 1].mean() + (~decided[labels == 0]).mean()) / 2)


@dataclass(frozen=True)
class CropOptions:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    tau: float = 0.5
    labels_per_class: int = 0      # 0: every label
    seed: int = 0


def pretrain(model: torch.nn.Module, crops: np.ndarray, opts: CropOptions,
             device: torch.device, log: Log = print) -> dict[str, Any]:
    """SimCLR: ``opts.epochs`` passes over ``crops`` in batches of two views each,
    NT-Xent; trains ``model`` (`models.simclr.SimCLR`) in place; returns the metrics."""
    from ..models.losses import nt_xent_loss

    rng = np.random.default_rng(opts.seed)
    batch = min(opts.batch_size, len(crops))
    if batch < 2:
        raise UsageError("SimCLR needs at least two glomerulus crops")
    optimiser = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    history, seen, model_s = [], 0, 0.0
    started = time.perf_counter()
    model.train()
    for epoch in range(1, opts.epochs + 1):
        order = rng.permutation(len(crops))
        losses = []
        for b in range(0, len(order) - batch + 1, batch):
            pick = crops[order[b:b + batch]]
            v1 = images_to_tensor([simclr_view(c, rng, VIEW_PX) for c in pick]).to(device)
            v2 = images_to_tensor([simclr_view(c, rng, VIEW_PX) for c in pick]).to(device)
            t0 = time.perf_counter()
            # both views in one pass: they share BatchNorm statistics, as in SimCLR
            z1, z2 = model(torch.cat([v1, v2])).chunk(2)
            loss = nt_xent_loss(z1, z2, tau=opts.tau)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            model_s += time.perf_counter() - t0
            losses.append(float(loss.detach()))
            seen += 2 * len(pick)
        history.append(round(float(np.mean(losses)), 4))
        log(f"pretrain epoch {epoch}/{opts.epochs}  NT-Xent {history[-1]:.4f}")
    seconds = time.perf_counter() - started
    return {"nt_xent": history, "images": seen, "seconds": round(seconds, 1),
            "images_per_s": round(seen / seconds, 2),
            "model_images_per_s": round(seen / model_s, 2) if model_s else None}


def few_labels(crops: CropSet, per_class: int, seed: int) -> CropSet:
    """At most ``per_class`` labelled crops of each class (all when 0), drawn at random."""
    labelled = np.nonzero(crops.labels >= 0)[0]
    if per_class <= 0:
        return crops.subset(labelled)
    rng = np.random.default_rng([seed, 7])
    keep = np.concatenate([rng.permutation(labelled[crops.labels[labelled] == c])[:per_class]
                           for c in (0, 1)])
    return crops.subset(np.sort(keep))


def _augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The 8 flips/rotations of each crop, drawn at random."""
    out = np.empty_like(batch)
    for i, crop in enumerate(batch):
        k = int(rng.integers(8))
        crop = np.rot90(crop, k % 4)
        out[i] = crop[:, ::-1] if k >= 4 else crop
    return out


def predict(model: torch.nn.Module, crops: np.ndarray, device: torch.device,
            batch_size: int = 64) -> np.ndarray:
    """(N,) probability of hypercellularity of (N, INPUT_PX, INPUT_PX, 3) crops."""
    model.eval()
    out = []
    with torch.inference_mode():
        for b in range(0, len(crops), batch_size):
            x = images_to_tensor(crops[b:b + batch_size]).to(device)
            out.append(torch.sigmoid(model(x).float()).reshape(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def finetune(model: torch.nn.Module, train: CropSet, val: CropSet | None, opts: CropOptions,
             device: torch.device, log: Log = print) -> dict[str, Any]:
    """Binary cross-entropy on the labelled ``train`` crops (class-balanced by weighting),
    AUC on ``val`` every epoch; leaves the best epoch's weights in ``model``."""
    rng = np.random.default_rng(opts.seed)
    y = train.labels.astype(np.float32)
    pos = max(float(y.sum()), 1.0)
    pos_weight = torch.tensor([(len(y) - pos) / pos], device=device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    batch = min(opts.batch_size, len(y))
    history, best = [], None
    started = time.perf_counter()
    for epoch in range(1, opts.epochs + 1):
        model.train()
        order = rng.permutation(len(y))
        losses = []
        for b in range(0, len(order), batch):
            pick = order[b:b + batch]
            x = images_to_tensor(_augment(train.crops[pick], rng)).to(device)
            target = torch.from_numpy(y[pick]).to(device)[:, None]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(x).float(), target, pos_weight=pos_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        p = predict(model, val.crops, device) if val else None
        score = auc(p, val.labels) if val else None
        # AUC ignores the threshold the task applies (0.5): ties go to the epoch whose
        # decisions at 0.5 are right most often (balanced accuracy)
        bacc = balanced_accuracy(p >= 0.5, val.labels) if val else None
        history.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 4),
                        "val_auc": None if score is None else round(score, 4),
                        "val_balanced_accuracy": None if bacc is None else round(bacc, 4)})
        log(f"finetune epoch {epoch}/{opts.epochs}  loss {history[-1]['loss']:.4f}  "
            f"val AUC {'-' if score is None else f'{score:.4f}'}  balanced accuracy "
            f"{'-' if bacc is None else f'{bacc:.4f}'}")
        key = (score or 0.0, bacc or 0.0) if val else (float(epoch), 0.0)
        if best is None or key > best[0]:
            best = (key, epoch, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[2])
    return {"val_auc": history[best[1] - 1]["val_auc"],
            "val_balanced_accuracy": history[best[1] - 1]["val_balanced_accuracy"],
            "best_epoch": best[1],
            "train_labels": {"M0": int((y == 0).sum()), "M1": int((y == 1).sum())},
            "val_glomeruli": int(len(val.labels)) if val else 0,
            "seconds": round(time.perf_counter() - started, 1), "history": history}


def run(args: argparse.Namespace, argv: Sequence[str], plugin: Task, log: Log = print) -> int:
    """``wsi-train`` for a task of the ``crops`` trainer, ``--stage pretrain|finetune``
    (``args`` from `wsi_pipeline.train.cli.build_parser`); returns the exit code."""
    from ..batch import unique_ids
    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..models import build_model, count_parameters
    from ..models.simclr import GlomerulusClassifier
    from ..pipeline import resolve_device

    device = torch.device(resolve_device(args.device))
    task = plugin.spec
    if args.synth:
        require_synth(plugin)
    stage = args.stage or "finetune"
    opts = CropOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       tau=args.tau, labels_per_class=args.labels_per_class, seed=args.seed)
    work = args.work or Path(str(args.out) + ".work")
    work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = expand_slides(args.data)
    synth = None
    if args.synth:
        size = parse_size(args.synth_size, "--synth-size")
        paths += make_synthetic_cohort(plugin, work / "synth", args.synth, seed=args.synth_seed,
                                       size_px=size, workers=args.workers, log=log)
        synth = {"n": args.synth, "seeds": [args.synth_seed + i for i in range(args.synth)],
                 "size_px": list(size), "mpp": 0.5, "labels": "M0/M1 alternating"}
    val_paths = expand_slides(args.val) if args.val else []
    ids = unique_ids([p.stem for p in [*paths, *val_paths]])
    crops = collect_crops([*paths, *val_paths], ids, work / "stores", workers=args.workers,
                          mpp=args.mpp, log=log, task=plugin)
    n_train_slides = len(paths)
    if not val_paths and stage == "finetune" and args.val_fraction > 0 and len(paths) > 1:
        rng = np.random.default_rng(args.seed)
        n_val = max(1, round(args.val_fraction * len(paths)))
        val_slides = set(rng.permutation(len(paths))[:n_val].tolist())
    else:
        val_slides = set(range(n_train_slides, len(ids)))
    is_val = np.isin(crops.slide, sorted(val_slides))
    torch.manual_seed(opts.seed)
    meta_common = {"mpp": task.mpp, "tile_px": 512,
                   "stain_reference": stain_reference_meta(task),
                   "demo": bool(args.demo), "input_px": INPUT_PX}
    training = {"command": command_line(argv), "stage": stage, **software_meta(device),
                "synthetic_cohort": synth,
                "slides": {"train": [ids[i] for i in range(len(ids)) if i not in val_slides],
                           "validation": [ids[i] for i in sorted(val_slides)]},
                "epochs": opts.epochs, "batch_size": opts.batch_size, "lr": opts.lr,
                "seed": opts.seed}
    encoder = {"encoder_name": args.encoder} if args.encoder else {}
    if stage == "pretrain":
        model = build_model("simclr", **encoder).to(device)
        log(f"SimCLR on {len(crops.crops)} unlabelled glomerulus crops, "
            f"{count_parameters(model):,} parameters on {device}")
        metrics = pretrain(model, crops.crops, opts, device, log)
        model.cpu()
        meta = meta_common | {"task": PRETRAIN_TASK,
                              "classes": [f"z{i}" for i in range(model.classes)],
                              "training": training | {"tau": opts.tau, "views": VIEW_PX},
                              "metrics": metrics}
    else:
        if args.init:
            simclr, _ = load_checkpoint(args.init, task=PRETRAIN_TASK)
            model = GlomerulusClassifier.from_simclr(simclr)
        else:
            model = build_model("glomerulus_classifier", **encoder)
        model.to(device)
        train = few_labels(crops.subset(~is_val), opts.labels_per_class, opts.seed)
        val = crops.subset(is_val & (crops.labels >= 0)) if is_val.any() else None
        log(f"fine-tune on {len(train.labels)} labelled crops ({int(train.labels.sum())} "
            f"hypercellular), validate on {0 if val is None else len(val.labels)}; encoder "
            f"{'from ' + str(args.init) if args.init else 'from scratch'}")
        metrics = finetune(model, train, val, opts, device, log)
        model.cpu()
        meta = meta_common | {"task": "mesangial", "classes": ["hypercellular"],
                              "training": training | {"init": str(args.init) if args.init
                                                      else None,
                                                      "labels_per_class": opts.labels_per_class},
                              "metrics": metrics}
    metrics["total_seconds"] = round(time.perf_counter() - started, 1)
    path = save_checkpoint(args.out, model, meta)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and its .json, "
        f"{metrics['total_seconds']:.0f} s in all")
    return 0
