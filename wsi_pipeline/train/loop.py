"""The optimisation of the slide trainer: losses (`make_loss`), validation scores
(confusion matrix, Dice, IoU), `evaluate`, the learning-rate schedule and `fit`."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import UsageError
from .common import Log, say
from .data import STAIN_JITTER, PatchDataset, TrainSlide, sample_mixed, sample_patches

if TYPE_CHECKING:
    from ..tasks import TaskSpec


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, L, H, W, 3) uint8 -> (B, L, 3, H, W) float in [0, 1] on ``device``."""
    x = x.to(device, non_blocking=device.type == "cuda")
    return x.permute(0, 1, 4, 2, 3).float().div_(255)


def at_output_stride(target: torch.Tensor, valid: torch.Tensor, stride: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (B, C, H, W) and valid mask (B, H, W) on the grid of a model that predicts
    at ``stride``: each cell's target is the class fractions of its stride x stride pixels
    (what the engine's pooled probabilities estimate), and a cell is valid only when all of
    its pixels are."""
    if stride == 1:
        return target, valid
    target = F.avg_pool2d(target.float(), stride)
    valid = F.avg_pool2d(valid[:, None].float(), stride)[:, 0] > 1 - 1e-6
    return target, valid


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
    architecture ``family``), docs/models.md §1."""
    from ..models import losses

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
    stride = int(getattr(model, "output_stride", 1))
    with torch.inference_mode():
        for x, target, valid in loader:
            logits = model(to_input(x, device)).float().cpu()
            target, valid = at_output_stride(target, valid, stride)
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
    batch's weak patches (comp >= 0), Q of docs/models.md §3's special case (q = 1 - p_y~,
    focal exponent 2); a term with no patches in the batch counts 0."""
    from ..models.losses import complementary_loss, complementary_matrix

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
    stride = int(getattr(model, "output_stride", 1))
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
            target, valid = at_output_stride(target.to(device, non_blocking=on_gpu),
                                             valid.to(device, non_blocking=on_gpu), stride)
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
