"""The ``wsi-train`` command line: `build_parser` and `main`. The trainer is the task's
own (`wsi_pipeline.tasks.Task.trainer`), looked up in `TRAINERS`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ..errors import UsageError, WsiError
from ..tasks import Task, get_plugin, task_names
from . import cases, crops, slides
from .common import Log, say
from .data import SYNTH_MOUSE_SEED, SYNTH_SEED, SYNTH_SIZE_PX
from .loop import TrainOptions

Trainer = Callable[[argparse.Namespace, Sequence[str], Task, Log], int]
# Task.trainer -> run(args, argv, task plugin, log) -> exit code
TRAINERS: dict[str, Trainer] = {"slides": slides.run, "crops": crops.run, "cases": cases.run}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The options of every trainer; ``--task`` chooses among the installed trainable tasks."""
    d = TrainOptions()
    p = _Parser(prog="wsi-train", description="Train a task's model from annotated slides "
                "or a synthetic cohort; write a safetensors checkpoint + JSON sidecar.")
    p.add_argument("--task", required=True, metavar="TASK",
                   help=f"{', '.join(task_names(trainable=True))} (glomeruli: the detector "
                        "mesangial and glomerular-dx share)")
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
    """``wsi-train``: returns the exit code (an expected failure prints one line
    ``wsi-train: error: ...`` and returns 1, or 2 for usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except WsiError as exc:
        print(f"wsi-train: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    task = get_plugin(args.task, trainable=True)
    if task.spec.model is None:
        print(f"wsi-train: task {task.name} has no trainer in this version", file=sys.stderr)
        return 2
    if args.stage and task.trainer != "crops":
        crop_tasks = [n for n in task_names(trainable=True)
                      if get_plugin(n, trainable=True).trainer == "crops"]
        raise UsageError(f"--stage is for the {' / '.join(crop_tasks) or 'crop'} task "
                         "(SimCLR pretrain / finetune)")
    trainer = TRAINERS.get(task.trainer)
    if trainer is None:
        raise UsageError(f"task {task.name} declares trainer {task.trainer!r}; wsi-train has "
                         f"{', '.join(TRAINERS)}")
    return trainer(args, argv, task, say)


if __name__ == "__main__":
    sys.exit(main())
