"""One slide through the staged pipeline:
open -> tissue -> stain -> pyramid -> infer -> stitch -> measure -> export.

Each stage records itself in the store's manifest with a checksum of its inputs (the
slide's fingerprint, the upstream stage's checksum and its own parameters). A re-run with
the same inputs skips a finished stage; a changed slide or parameter recomputes it and
everything after it.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import NotBrightfield, NoTissue, TaskConflict, UsageError
from ..export import write_overlay
from ..slide import Slide, open_slide
from ..stain import STAIN_NAMES
from ..store import SlideStore, atomic_write_json, checksum, file_fingerprint
from ..tasks import Task
from ..version import __version__
from .context import LoadedModel, Log, SlideContext
from .options import MODEL_STAGES, STAGES, RunOptions
from .report import build_report
from .stages import EXPORT_FILES, STAGE_LIST, outline_key

OUTPUT_FILES = ("report.json", *EXPORT_FILES)
_LEFTOVER = re.compile(r"\..+\.[0-9a-f]{32}\.tmp|\..+\.levels-[^/]+")


def run_slide(path: str | Path, task: Task, slide_id: str, opts: RunOptions,
              log: Log | None = None) -> dict[str, Any]:
    """Run ``task``'s stages up to ``opts.until`` on one slide; write report.json (and the
    export stage's files) under ``opts.out/slide_id``; return the report."""
    if opts.until not in STAGES:
        raise UsageError(f"--until {opts.until}: choose one of {', '.join(STAGES)}")
    if opts.until in MODEL_STAGES and task.spec.model is None:
        raise UsageError(f"task {task.name} has no model stage; run it with --until pyramid")
    if opts.model != "network" and opts.model not in task.modes:
        choices = ", ".join(("network", *task.modes))
        raise UsageError(f"--model {opts.model}: task {task.name} runs {choices}")
    timings: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    slide = open_slide(path, backend=opts.backend, mpp=opts.mpp)
    timings["open"] = {"seconds": round(time.perf_counter() - started, 3), "reused": False}
    try:
        return _run_stages(slide, path, task, slide_id, opts, log or (lambda _: None),
                           timings)
    finally:
        slide.close()


def _load_models(task: Task, opts: RunOptions) -> tuple[LoadedModel, LoadedModel | None]:
    """The task's model (or the alternative mode ``opts.model``) and its classifier."""
    from ..checkpoint import load_task_model  # torch: only runs that reach the models

    if opts.model != "network":
        mode = task.modes[opts.model]
        model = LoadedModel(None, {"architecture": opts.model, "demo": False, "sha256": None,
                                   "description": mode.description})
    else:
        model = LoadedModel(*load_task_model(task, task.spec.model, opts.weights))
    classifier = (LoadedModel(*load_task_model(task, task.spec.classifier, opts.weights))
                  if task.spec.classifier is not None else None)
    return model, classifier


def _run_stages(slide: Slide, path: str | Path, task: Task, slide_id: str,
                opts: RunOptions, log: Log, timings: dict[str, dict[str, Any]]
                ) -> dict[str, Any]:
    out_dir = opts.out / slide_id
    other = _task_of(out_dir)
    if other is not None and other != task.name and not opts.force:
        raise TaskConflict(f"{out_dir}: holds results of task {other}; use another --out, or "
                           f"--force to replace them with {task.name}")
    if opts.force:
        shutil.rmtree(out_dir / "store.zarr", ignore_errors=True)
    clear_leftovers(out_dir)
    # never left to describe an older run; a reused export stage keeps its files
    for stale in ("report.json",) if opts.until == "export" else OUTPUT_FILES:
        (out_dir / stale).unlink(missing_ok=True)
    store = SlideStore(out_dir / "store.zarr")
    store.root.attrs["task"] = task.name
    fingerprint = file_fingerprint(path)
    # a case missing a modality, or a wrong checkpoint, fails before the slide work
    extra = task.read_inputs(path) if task.read_inputs is not None else None
    model = classifier = None
    if opts.until in MODEL_STAGES:
        model, classifier = _load_models(task, opts)
    ctx = SlideContext(slide=slide, store=store, task=task, opts=opts, slide_id=slide_id,
                       out_dir=out_dir, fingerprint=fingerprint, log=log, model=model,
                       classifier=classifier, extra_inputs=extra)
    results: dict[str, Any] = {}
    upstream = checksum(fingerprint, slide.mpp, slide.backend, __version__)
    for stage in STAGE_LIST[: STAGES.index(opts.until) + 1]:
        params = stage.params(ctx)
        inputs = checksum(stage.name, upstream, params)
        entry = store.finished(stage.name, inputs)
        reused = entry is not None
        if entry is None:
            # this stage and those after it are about to change: their entries go first
            store.invalidate(*STAGES[STAGES.index(stage.name):])
            for stale in EXPORT_FILES:
                (out_dir / stale).unlink(missing_ok=True)
            t0 = time.perf_counter()
            log({"slide": slide_id, "stage": stage.name, "status": "started"})
            result = stage.run(ctx, results, inputs)
            entry = store.record(stage.name, inputs, params, result, time.perf_counter() - t0)
        results[stage.name] = entry["result"]
        timings[stage.name] = {"seconds": entry["seconds"], "reused": reused}
        log({"slide": slide_id, "stage": stage.name, "status": "reused", "seconds": 0.0,
             "first_run_seconds": entry["seconds"]} if reused else
            {"slide": slide_id, "stage": stage.name, "status": "done",
             "seconds": entry["seconds"]})
        if stage.name == "tissue" and results["tissue"].get("brightfield") is False:
            _write_outputs(store, out_dir, build_report(slide, task, slide_id, opts, results,
                                                        timings, fingerprint))
            evidence = results["tissue"]["brightfield_evidence"]
            raise NotBrightfield(f"{slide.path}: fluorescence or dark-field slide: task "
                                 f"{task.name} needs a brightfield "
                                 f"{STAIN_NAMES[task.spec.stain]} slide (median L* "
                                 f"{evidence['median_lstar']:g} of 100: the background is "
                                 "dark, not bright glass)")
        if stage.name == "tissue" and results["tissue"]["n_tiles"] == 0:
            _write_outputs(store, out_dir, build_report(slide, task, slide_id, opts, results,
                                                        timings, fingerprint))
            raise NoTissue(f"{slide.path}: no tissue found (blank glass?) at "
                           f"{results['tissue']['thumbnail_mpp']:g} um/px")
        upstream = inputs

    report = build_report(slide, task, slide_id, opts, results, timings, fingerprint,
                          model.meta if model else None,
                          classifier.meta if classifier else None)
    _write_outputs(store, out_dir, report)
    return report


def _task_of(out_dir: Path) -> str | None:
    """The task whose results ``out_dir`` holds (its store's, else its report's), or None."""
    import json

    for path in (out_dir / "store.zarr" / "zarr.json", out_dir / "report.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        task = (data.get("attributes") or {}).get("task") if path.name == "zarr.json" \
            else data.get("task")
        if task:
            return str(task)
    return None


def clear_leftovers(out_dir: Path) -> None:
    """Delete what writes cut short by a kill left in ``out_dir`` and its store's root:
    hidden temporary files (``.NAME.<uuid>.tmp``, see `store.atomic_write_bytes`) and mask
    level folders (``.NAME.levels-*``). Callers work on a slide folder one at a time (the
    batch holds its lock), so none of these can belong to a live writer."""
    for folder in (out_dir, out_dir / "store.zarr"):
        for path in folder.glob(".*") if folder.is_dir() else ():
            if not _LEFTOVER.fullmatch(path.name):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _write_outputs(store: SlideStore, out_dir: Path, report: dict[str, Any]) -> None:
    if not report.get("complete"):   # the export stage writes the finished outputs itself
        labels = store.read_array("tissue/mask")
        stages = report["stages_completed"]
        write_overlay(out_dir / "overlay.png", store.read_array("tissue/thumbnail"),
                      float(store.root["tissue/thumbnail"].attrs["mpp"]),
                      tissue_outline=labels == 1, ink_outline=labels == 2,
                      title=f"{report['slide']['id']}  |  {report['task']}  |  stopped after "
                            f"{stages[-1] if stages else 'opening'}",
                      legend=outline_key(labels), scale_bar=True)
    atomic_write_json(out_dir / "report.json", report)

