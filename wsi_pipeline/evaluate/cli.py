"""``wsi-eval``: score a folder of wsi-run outputs against annotated truth.

    wsi-eval OUT --truth DIR [--radius-um 4] [--iou 0.5] [--task TASK] [--diagnoses CSV]
             [--bootstrap N] [--seed S] [--quiet]

Exit code 0 when the evaluation was written, 1 for an expected failure (no slide with
truth, an unreadable file, OUT not a wsi-run folder), 2 for a usage error; failures print
one line, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..annotations import IGNORE_NAMES, _norm
from ..errors import UsageError, WsiError
from ..tasks import get_plugin
from .compare import evaluate_slide, pred_diagnosis
from .sources import (
    BACKGROUND_NAMES,
    Prediction,
    Truth,
    aliases,
    eval_classes,
    find_truth,
    read_diagnoses,
    read_prediction,
    slide_folders,
    truth_candidates,
)
from .summary import diagnosis_confusion, pool, write_outputs

PROG = "wsi-eval"
MATCHING = ("optimal one-to-one (Hungarian, scipy.optimize.linear_sum_assignment): the most "
            "pairs, then the smallest total distance (points) or largest total IoU (objects)")
POOLING = ("sums of per-slide statistics over the slides (Dice and IoU from summed pixel "
           "tp/fp/fn, P/R/F1 from summed tp/fp/fn, Bland-Altman mean difference over "
           "slides, accuracy over slides); ci95: percentile bootstrap over slides")
EXTENT_TOLERANCE = 0.02   # truth and slide sizes that differ more than this get a warning


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score wsi-run outputs against a lab's annotated truth: per-class "
                    "Dice/IoU, object and point detection precision/recall/F1, count and "
                    "area agreement (Bland-Altman), diagnosis accuracy, each with a "
                    "bootstrap 95%% interval over slides. Writes OUT/eval.json, "
                    "OUT/eval.csv and plots.",
        epilog="truth files, by slide id (or the slide file's stem) in DIR:\n"
               "  <stem>.truth.json + .truth.zarr   wsi-synth truth\n"
               "  <stem>.geojson                    QuPath polygons and points (level-0 px)\n"
               "  <stem>.labels.png|tif + .json     label mask and its legend\n"
               "  <stem>.points.csv                 x_um, y_um, class\n\n"
               "exit codes: 0 written, 1 failure (no slide with truth, unreadable file), "
               "2 usage error")
    p.add_argument("out", type=Path, metavar="OUT", help="a wsi-run output folder")
    p.add_argument("--truth", type=Path, required=True, metavar="DIR",
                   help="folder of truth files")
    p.add_argument("--radius-um", type=float, default=4.0,
                   help="points within this distance match (default 4 um)")
    p.add_argument("--iou", type=float, default=0.5,
                   help="objects with at least this IoU match (default 0.5)")
    p.add_argument("--task", help="the task whose annotation names map truth classes "
                                  "(default: the one in the reports)")
    p.add_argument("--diagnoses", type=Path, metavar="CSV",
                   help="true diagnoses, rows of slide,label (else truth.json's)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the 95%% intervals (default 1000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no summary on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 with argparse's own message
    try:
        if not args.radius_um > 0:
            raise UsageError("--radius-um must be positive")
        if not 0 < args.iou <= 1:
            raise UsageError("--iou must be in (0, 1]")
        if args.bootstrap < 0:
            raise UsageError("--bootstrap must be 0 or more")
        if not args.truth.is_dir():
            raise UsageError(f"--truth {args.truth}: no such folder")
        diagnoses = read_diagnoses(args.diagnoses) if args.diagnoses else None
        result = evaluate(args.out, args.truth, radius_um=args.radius_um, iou_min=args.iou,
                          task=args.task, n_boot=args.bootstrap, seed=args.seed,
                          diagnoses=diagnoses, warn=_warn)
        written = write_outputs(args.out, result)
    except WsiError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not args.quiet:
        print(summary_text(result))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def evaluate(out: str | Path, truth_dir: str | Path, *, radius_um: float = 4.0,
             iou_min: float = 0.5, task: str | None = None, n_boot: int = 1000, seed: int = 0,
             diagnoses: dict[str, str] | None = None,
             warn: Callable[[str], None] = _warn) -> dict[str, Any]:
    """The evaluation of the slide folders of ``out`` against the truth in ``truth_dir``
    (what eval.json holds; nothing is written). Slides without a prediction map or truth
    are skipped with a ``warn`` line each; none left raises `WsiError`."""
    out, truth_dir = Path(out), Path(truth_dir)
    pairs: list[tuple[Prediction, Truth, str]] = []
    skipped: list[dict[str, str]] = []

    def skip(slide: str, reason: str) -> None:
        skipped.append({"slide": slide, "reason": reason})
        warn(f"skipped: {slide}: {reason}")

    for folder in slide_folders(out):
        pred = read_prediction(folder)
        if isinstance(pred, str):
            skip(folder.name, pred)
            continue
        stems = dict.fromkeys([pred.slide_id, _slide_stem(pred)])
        truth, stem = None, pred.slide_id
        for stem in stems:
            if stem and (truth := find_truth(truth_dir, stem, pred)) is not None:
                break
        if truth is None:
            looked = ", ".join(p.name for p in truth_candidates(truth_dir, pred.slide_id))
            skip(pred.slide_id, f"no truth in {truth_dir} (looked for {looked})")
            continue
        _check_extent(pred, truth, warn)
        pairs.append((pred, truth, stem))
    if not pairs:
        raise WsiError(f"no slide of {out} has truth in {truth_dir} "
                       f"({len(skipped)} skipped)")

    task_name = task or _one_task(pairs)
    spec = get_plugin(task_name, trainable=True).spec
    annotations: dict[str, tuple[str, ...]] = {}
    for model in (spec.model, spec.classifier):
        annotations.update(model.annotations if model is not None else {})
    truth_names = {n for _, t, _ in pairs if t.regions is not None
                   for n in t.regions.class_names()}
    pred_names = {n for p, _, _ in pairs for n in p.legend.values()}
    classes = eval_classes(annotations, truth_names, pred_names)
    unscored = sorted(truth_names - set().union(*classes.values()) - BACKGROUND_NAMES
                      - IGNORE_NAMES)
    if unscored:
        warn(f"note: truth classes not scored (no {task_name} or prediction class of that "
             f"name): {', '.join(unscored)}")
    model_classes = {_norm(k) for k in annotations}
    object_classes = [c for c in classes if c in model_classes
                      or any(p.objects and any(_answers(label, classes[c]) for label, _ in
                                               p.objects) for p, _, _ in pairs)]
    point_classes = sorted({n for _, t, _ in pairs if t.points for n in t.points})

    per_slide, records = [], []
    for pred, truth, stem in pairs:
        label = _true_diagnosis(pred, truth, stem, diagnoses)
        per_slide.append(evaluate_slide(pred, truth, classes, object_classes, point_classes,
                                        radius_um=radius_um, iou_min=iou_min,
                                        diagnosis=label))
        record: dict[str, Any] = {"slide": pred.slide_id, "truth": truth.files, "mpp": pred.mpp}
        if label is not None:
            record["diagnosis"] = {"truth": label, "pred": pred_diagnosis(pred)}
        records.append(record)
    metrics, slide_metrics = pool([p.slide_id for p, _, _ in pairs], per_slide, n_boot, seed)
    if not metrics:
        raise WsiError(f"nothing to score: the truth names none of the {task_name} classes "
                       f"({', '.join(sorted(model_classes - BACKGROUND_NAMES)) or 'none'}), "
                       "no class of the prediction, and holds no points or diagnoses")
    dx = [r["diagnosis"] for r in records if "diagnosis" in r]
    return {
        "slides": len(pairs), "task": task_name, "out": str(out), "truth": str(truth_dir),
        "settings": {"radius_um": radius_um, "iou": iou_min, "bootstrap": n_boot,
                     "seed": seed, "matching": MATCHING, "pooling": POOLING,
                     "grid": "each slide's prediction map (pred/classes) at its own MPP"},
        "classes": {c: sorted(n) for c, n in classes.items()},
        "metrics": metrics,
        "diagnosis_confusion": diagnosis_confusion([d["truth"] for d in dx],
                                                   [d["pred"] for d in dx]),
        "per_slide": [r | {"metrics": m} for r, m in zip(records, slide_metrics, strict=True)],
        "skipped": skipped,
    }


def _answers(label: str | None, names: frozenset[str]) -> bool:
    return bool(aliases(label) & names)


def _slide_stem(pred: Prediction) -> str:
    path = str((pred.report.get("slide") or {}).get("path") or "")
    return Path(path.rstrip("/")).stem if path else ""


def _one_task(pairs: list[tuple[Prediction, Truth, str]]) -> str:
    tasks = sorted({p.task for p, _, _ in pairs})
    if len(tasks) > 1:
        raise UsageError(f"the slides come from several tasks ({', '.join(tasks)}); give "
                         "--task")
    return tasks[0]


def _true_diagnosis(pred: Prediction, truth: Truth, stem: str,
                    diagnoses: dict[str, str] | None) -> str | None:
    if diagnoses is not None:
        for key in (pred.slide_id, stem):
            if key in diagnoses:
                return diagnoses[key]
        return None
    label = ((truth.summary or {}).get("diagnosis") or {}).get("label")
    return None if label is None else str(label)


def _check_extent(pred: Prediction, truth: Truth, warn: Callable[[str], None]) -> None:
    """A warning when the truth's extent is not the slide's (a mask of another slide)."""
    if truth.regions is None:
        return
    (tw, th), (sw, sh) = truth.regions.extent_um, pred.size_um
    if abs(tw - sw) > EXTENT_TOLERANCE * sw or abs(th - sh) > EXTENT_TOLERANCE * sh:
        warn(f"warning: {pred.slide_id}: the truth covers {tw:.0f} x {th:.0f} um, the slide "
             f"{sw:.0f} x {sh:.0f} um")


def summary_text(result: dict[str, Any]) -> str:
    """A line per metric: value, interval and the number of slides."""
    lines = [f"{result['slides']} slide{'s' if result['slides'] != 1 else ''} scored "
             f"({result['task']}) against {result['truth']}"]
    width = max((len(n) for n in result["metrics"]), default=0)
    for name, entry in result["metrics"].items():
        value = "n/a" if entry["value"] is None else f"{entry['value']:.4g}"
        ci = entry["ci95"]
        ci_text = f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
        lines.append(f"  {name:<{width}}  {value}{ci_text}  ({entry['slides']} slides)")
    return "\n".join(lines)
