"""The ``slides`` trainer: a task's segmentation model on annotated slides and/or a
synthetic cohort (what ``wsi-train`` does for fls, liver, kidney-layer and glomeruli).

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
epoch's weights are kept. A task whose model takes complementary labels (liver) also
trains on weakly labelled slides of a ``--cohort`` list or a synthetic weak cohort.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UsageError
from .common import (
    Log,
    command_line,
    make_folders,
    parse_size,
    say,
    software_meta,
    stain_reference_meta,
)
from .data import (
    ALIGN_PX,
    SYNTH_MOUSE_SEED,
    TrainSlide,
    expand_slides,
    make_synthetic_cohort,
    make_weak_cohort,
    prepare_slides,
    read_cohort,
    require_synth,
    split_slides,
    synth_labels,
)
from .loop import TrainOptions, fit, make_loss

if TYPE_CHECKING:
    from ..tasks import Task, TaskSpec


def run(args: argparse.Namespace, argv: Sequence[str], plugin: Task, log: Log = say) -> int:
    """``wsi-train`` for a task of the ``slides`` trainer (``args`` from
    `wsi_pipeline.train.cli.build_parser`); returns the exit code."""
    task = plugin.spec
    if args.loss != "auto":
        task = replace(task, model=replace(task.model, loss=args.loss))
    if args.synth_mouse and task.name != "kidney-layer":
        raise UsageError("--synth-mouse is for kidney-layer (cross-species training)")
    opts = _options(args)
    synth_size = parse_size(args.synth_size, "--synth-size")
    mouse_size = parse_size(args.mouse_size, "--mouse-size")
    if not args.data and not args.synth and not args.synth_mouse and not args.cohort:
        raise UsageError("nothing to train on: give --data PATH..., --cohort CSV and/or "
                         "--synth N")
    if args.synth and not task.model.complementary:
        require_synth(plugin)
    from ..pipeline import resolve_device

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
                                      seed=args.synth_seed, size_px=synth_size, log=log)
        synth = {"patients": args.synth, "annotated": args.synth_annotated,
                 "seed": args.synth_seed, "size_px": list(synth_size), "mpp": 0.5,
                 "cohort": str(cohort_csv), "generator": "wsi-synth"}
    elif args.synth:
        made = make_synthetic_cohort(plugin, work / "synth", args.synth, seed=args.synth_seed,
                                     size_px=synth_size, workers=opts.workers, log=log)
        labels = synth_labels(plugin)
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
        log(f"cohort {cohort_csv}: {sum(c < 0 for c in listed_comps)} pixel-annotated, "
            f"{sum(c >= 0 for c in listed_comps)} weakly labelled slides"
            + ("" if opts.compl_lambda > 0 else " (left out: --compl-lambda 0)"))
    if args.synth_mouse:
        paths += make_synthetic_cohort(plugin, work / "synth", args.synth_mouse,
                                       seed=SYNTH_MOUSE_SEED, size_px=mouse_size,
                                       workers=opts.workers, species="mouse", mpp=1.0, log=log)
        synth = (synth or {}) | {"mouse": {
            "n": args.synth_mouse,
            "seeds": [SYNTH_MOUSE_SEED + i for i in range(args.synth_mouse)],
            "size_px": list(mouse_size), "mpp": 1.0}}
        comps += [-1] * args.synth_mouse
        groups += [("", "")] * args.synth_mouse
    val_paths = expand_slides(args.val) if args.val else []
    from ..batch import unique_ids

    ids = unique_ids([p.stem for p in [*paths, *val_paths]])
    slides = prepare_slides(paths + val_paths, task, work / "stores", workers=opts.workers,
                            mpp=args.mpp, log=log, ids=ids,
                            complementary=comps + [-1] * len(val_paths), plugin=plugin)
    if val_paths:
        train, val = slides[:len(paths)], slides[len(paths):]
    else:
        train, val = split_slides(slides, args.val_fraction, opts.seed, groups)
    if not any(len(s.positives_px) for s in train):
        names = ", ".join(sorted({n for v in task.model.annotations.values() for n in v}))
        raise UsageError(f"no positive annotations ({names}) in the training slides")
    prep_s = time.perf_counter() - started
    log(f"train {len(train)} slides, validate on {len(val)} "
        f"({', '.join(s.slide_id for s in val) or 'none'}); {_describe(model, arch_kwargs)} "
        f"{_parameters(model):,} parameters on {device}")
    model.to(device)
    metrics = fit(model, task, train, val, opts, device, log)
    metrics |= {"parameters": _parameters(model), "prepare_seconds": round(prep_s, 1),
                "total_seconds": round(time.perf_counter() - started, 1)}
    from ..checkpoint import save_checkpoint

    model.cpu()
    meta = {"task": task.name, "classes": list(task.model.classes), "mpp": task.mpp,
            "tile_px": task.tile_px, "stain_reference": stain_reference_meta(task),
            "demo": bool(args.demo),
            "training": _training_meta(argv, task, opts, train, val, synth, device),
            "metrics": metrics}
    path = save_checkpoint(args.out, model, meta)
    dice = metrics["val_dice"]
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and its .json: val Dice "
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


def _build(task: TaskSpec, args: argparse.Namespace, opts: TrainOptions
           ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model, checked against the patch size with one small forward pass."""
    from ..models import ARCHITECTURES, build_model

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
        from ..checkpoint import load_checkpoint

        model, meta = load_checkpoint(args.init, task=task.checkpoint_task(task.model))
        if args.arch or args.encoder or kwargs != {"classes": len(task.model.classes)}:
            raise UsageError("--init takes the architecture from the checkpoint: drop --arch, "
                             "--encoder and --arch-kwargs")
        return model.train(), dict(meta["arch_kwargs"])
    if "output_stride" in inspect.signature(ARCHITECTURES.get(arch, build_model)).parameters:
        # predict at the resolution the task stores (no decoder layers for pooled pixels)
        kwargs.setdefault("output_stride", task.model.out_downsample)
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
    stride = int(getattr(model, "output_stride", 1))
    if tuple(out.shape[-2:]) != (opts.patch_px // stride,) * 2 or opts.patch_px % stride:
        raise UsageError(f"{arch} returns {tuple(out.shape[-2:])} for a {opts.patch_px} px "
                         f"patch; at output stride {stride} it must return the patch size "
                         f"/ {stride}")
    if task.model.out_downsample % stride:
        raise UsageError(f"output_stride {stride} must divide the task's output downsample "
                         f"{task.model.out_downsample}")
    return model, dict(getattr(model, "arch_kwargs", kwargs))


def _parameters(model: torch.nn.Module) -> int:
    from ..models import count_parameters

    return count_parameters(model)


def _describe(model: torch.nn.Module, kwargs: dict[str, Any]) -> str:
    from ..models.m2cf_net import describe

    return describe(getattr(model, "arch", type(model).__name__), kwargs)


def _training_meta(argv: Sequence[str], task: TaskSpec, opts: TrainOptions,
                   train: Sequence[TrainSlide], val: Sequence[TrainSlide],
                   synth: dict[str, Any] | None, device: torch.device) -> dict[str, Any]:
    def slides(group: Sequence[TrainSlide]) -> list[dict[str, Any]]:
        return [{"id": s.slide_id, "file": s.path.name,
                 "annotations": s.annotations.kind if s.annotations is not None else
                 f"weak: not {task.model.classes[s.complementary]}",
                 "positive_points": int(len(s.positives_px))} for s in group]

    return {"command": command_line(argv), **software_meta(device),
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
