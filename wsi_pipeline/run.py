"""One slide through the staged pipeline:
open -> tissue -> stain -> pyramid -> infer -> stitch -> measure -> export.

Each stage reads what the stage before it left in the slide's store, and records itself in
the store's manifest with a checksum of its inputs (the slide's fingerprint, the upstream
stage's checksum and its own parameters). A re-run with the same inputs skips a finished
stage; a changed slide or parameter recomputes it and everything after it.
"""

from __future__ import annotations

import platform
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from . import __version__
from . import stain as stain_mod
from .errors import CheckpointError, NoTissue, UsageError
from .export import class_colors, write_geojson, write_mask_ome_tiff
from .export import write_overlay as export_overlay
from .pyramid import PyramidSpec, super_tile_groups, write_pyramid
from .slide import Slide, open_slide
from .store import SlideStore, atomic_write_bytes, atomic_write_json, checksum, file_fingerprint
from .tasks import MeasureInputs, ModelSpec, TaskSpec, task_rules
from .tissue import TissueParams, detect_tissue, thumbnail_mpp, tile_grid

STAGES: tuple[str, ...] = ("tissue", "stain", "pyramid", "infer", "stitch", "measure",
                           "export")
MODEL_STAGES = STAGES[STAGES.index("infer"):]
STAIN_NAMES = {"he": "H&E", "pas": "PAS"}
Log = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RunOptions:
    """Everything a run needs besides the slide and the task (the CLI's options)."""

    out: Path
    until: str = "export"
    mpp: float | None = None
    backend: str = "auto"
    stain_backend: str = "numpy"
    device: str = "auto"
    workers: int = 2
    batch_size: int = 8
    weights: Path | None = None       # None: the task's bundled demo weights
    model: str = "network"            # "network" or "classical" (weight-free, fls only)
    force: bool = False
    tissue: TissueParams = field(default_factory=TissueParams)
    min_tile_tissue: float = 0.01     # fraction of a tile that must be tissue (edges count)
    stain_sample_tiles: int = 16      # tiles sampled for the once-per-slide stain fit
    seed: int = 0
    show_progress: bool = False
    argv: tuple[str, ...] = ()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one fails."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible to torch")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def run_slide(path: str | Path, task: TaskSpec, slide_id: str, opts: RunOptions,
              log: Log | None = None) -> dict[str, Any]:
    """Run ``task``'s stages up to ``opts.until`` on one slide; write report.json and
    overlay.png under ``opts.out/slide_id``; return the report."""
    if opts.until not in STAGES:
        raise UsageError(f"--until {opts.until}: choose one of {', '.join(STAGES)}")
    if opts.until in MODEL_STAGES and task.model is None:
        raise UsageError(f"task {task.name} has no model stage in this version; run it with "
                         "--until pyramid")
    if opts.model == "classical" and task.name != "fls":
        raise UsageError(f"--model classical exists for the fls task only, not {task.name}")
    log = log or (lambda _: None)
    timings: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    slide = open_slide(path, backend=opts.backend, mpp=opts.mpp)
    timings["open"] = {"seconds": round(time.perf_counter() - started, 3), "reused": False}
    try:
        return _run_stages(slide, path, task, slide_id, opts, log, timings)
    finally:
        slide.close()


def _run_stages(slide: Slide, path: str | Path, task: TaskSpec, slide_id: str,
                opts: RunOptions, log: Log, timings: dict[str, dict[str, Any]]
                ) -> dict[str, Any]:
    out_dir = opts.out / slide_id
    if opts.force:
        shutil.rmtree(out_dir / "store.zarr", ignore_errors=True)
    clear_leftovers(out_dir)
    # never left to describe an older run; a reused export stage keeps its files
    for stale in ("report.json",) if opts.until == "export" else OUTPUT_FILES:
        (out_dir / stale).unlink(missing_ok=True)
    store = SlideStore(out_dir / "store.zarr")
    fingerprint = file_fingerprint(path)
    upto = STAGES[: STAGES.index(opts.until) + 1]
    ctx: dict[str, Any] = {"slide": slide, "store": store, "task": task, "opts": opts,
                           "fingerprint": fingerprint, "log": log, "slide_id": slide_id,
                           "out_dir": out_dir}
    if task.input_kind == "case":  # a case missing a modality fails before the slide work
        from .case import read_case

        ctx["case"] = read_case(path)
    results: dict[str, Any] = {}
    if opts.until in MODEL_STAGES:   # a wrong or unreadable checkpoint fails before the work
        _model(ctx)
        _classifier(ctx)
    upstream = checksum(fingerprint, slide.mpp, slide.backend, __version__)
    for stage in upto:
        params = _STAGE_PARAMS[stage](ctx)
        inputs = checksum(stage, upstream, params)
        entry = store.finished(stage, inputs)
        reused = entry is not None
        if entry is None:
            # this stage and those after it are about to change: their entries go first
            store.invalidate(*STAGES[STAGES.index(stage):])
            for stale in EXPORT_FILES:
                (out_dir / stale).unlink(missing_ok=True)
            t0 = time.perf_counter()
            log({"slide": slide_id, "stage": stage, "status": "started"})
            result = _STAGE_RUN[stage](ctx, results, inputs)
            entry = store.record(stage, inputs, params, result, time.perf_counter() - t0)
        results[stage] = entry["result"]
        timings[stage] = {"seconds": entry["seconds"], "reused": reused}
        log({"slide": slide_id, "stage": stage, "status": "reused" if reused else "done",
             "seconds": entry["seconds"]})
        if stage == "tissue" and results["tissue"]["n_tiles"] == 0:
            _write_outputs(store, out_dir, build_report(slide, task, slide_id, opts, results,
                                                        timings, fingerprint))
            raise NoTissue(f"{slide.path}: no tissue found (blank glass?) at "
                           f"{results['tissue']['thumbnail_mpp']:g} um/px")
        upstream = inputs

    model = ctx["model"][1] if "model" in ctx else None
    classifier = ctx["classifier"][1] if ctx.get("classifier") else None
    report = build_report(slide, task, slide_id, opts, results, timings, fingerprint, model,
                          classifier)
    _write_outputs(store, out_dir, report)
    return report


_LEFTOVER = re.compile(r"\..+\.[0-9a-f]{32}\.tmp|\..+\.levels-[^/]+")


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


EXPORT_FILES = ("overlay.png", "mask.ome.tif", "objects.geojson")
OUTPUT_FILES = ("report.json", *EXPORT_FILES)


def _write_outputs(store: SlideStore, out_dir: Path, report: dict[str, Any]) -> None:
    if not report.get("complete"):   # the export stage writes the finished outputs itself
        write_overlay(store, out_dir / "overlay.png")
    atomic_write_json(out_dir / "report.json", report)


# -- stages ----------------------------------------------------------------------------------
def _tissue_params(ctx: dict[str, Any]) -> dict[str, Any]:
    opts, task, slide = ctx["opts"], ctx["task"], ctx["slide"]
    return {"thumbnail_mpp": thumbnail_mpp(slide.size_um, slide.mpp),
            "tile_um": task.tile_um, "min_tile_tissue": opts.min_tile_tissue,
            **asdict(opts.tissue)}


def _run_tissue(ctx: dict[str, Any], results: dict[str, Any], inputs: str) -> dict[str, Any]:
    slide, store, task, opts = ctx["slide"], ctx["store"], ctx["task"], ctx["opts"]
    mpp = thumbnail_mpp(slide.size_um, slide.mpp)
    thumb = slide.thumbnail(mpp)
    found = detect_tissue(thumb, mpp, opts.tissue)
    tiles = tile_grid(found.mask, mpp, slide.size_um, task.tile_um, opts.min_tile_tissue)
    store.write_array("tissue/thumbnail", thumb, {"mpp": mpp})
    labels = np.where(found.mask, 1, np.where(found.pen, 2, 0)).astype(np.uint8)
    store.write_array("tissue/mask", labels,
                      {"mpp": mpp, "legend": {"0": "background", "1": "tissue", "2": "ink"}})
    store.write_array("tiles", tiles, {"mpp": task.mpp, "tile_px": task.tile_px,
                                       "tile_um": task.tile_um, "columns": ["row", "col"]})
    return {"thumbnail_mpp": mpp, "tissue_area_mm2": round(found.area_mm2, 4),
            "n_tiles": int(len(tiles)), "pen_fraction": round(found.info["pen_fraction"], 4),
            "saturation_threshold": round(found.saturation_threshold, 4),
            "od_threshold": round(found.od_threshold, 4)}


def _stain_params(ctx: dict[str, Any]) -> dict[str, Any]:
    opts, task = ctx["opts"], ctx["task"]
    return {"reference": task.stain, "sample_tiles": opts.stain_sample_tiles, "seed": opts.seed,
            "mpp": task.mpp, "tile_px": task.tile_px,
            "reference_fit": stain_mod.REFERENCES[task.stain].to_dict()}


def _run_stain(ctx: dict[str, Any], results: dict[str, Any], inputs: str) -> dict[str, Any]:
    slide, store, task, opts = ctx["slide"], ctx["store"], ctx["task"], ctx["opts"]
    tiles = store.read_array("tiles")
    rng = np.random.default_rng(opts.seed)
    pick = rng.choice(len(tiles), size=min(len(tiles), opts.stain_sample_tiles), replace=False)
    pixels = [stain_mod.tissue_pixels(slide.read(c * task.tile_um, r * task.tile_um,
                                                 task.tile_px, task.tile_px, task.mpp))
              for r, c in tiles[np.sort(pick)]]
    fit = stain_mod.fit_vahadane(np.concatenate(pixels), seed=opts.seed)
    reference = stain_mod.REFERENCES[task.stain]
    similarity = {name: round(float(stain_mod.stain_similarity(fit, ref)), 4)
                  for name, ref in stain_mod.REFERENCES.items()}
    closest = max(similarity, key=similarity.__getitem__)
    result = {"fit": fit.to_dict(), "reference_name": task.stain,
              "reference": reference.to_dict(),
              "similarity_to_reference": similarity[task.stain],
              "similarity_to_references": similarity, "closest_reference": closest,
              "sampled_tiles": int(len(pick)), "sampled_pixels": int(sum(len(p) for p in pixels))}
    # Stain vectors tell H&E from PAS only weakly (see stain.stain_similarity): this warns
    # when the fit is closer to another reference, and stays silent on a close call.
    if closest != task.stain:
        result["warning"] = (f"the slide's stain estimate matches {STAIN_NAMES[closest]} "
                             f"better than the {STAIN_NAMES[task.stain]} this task expects "
                             f"(similarity {similarity[closest]:.3f} vs "
                             f"{similarity[task.stain]:.3f}): check the stain; results may "
                             "be unreliable")
    return result


def _pyramid_params(ctx: dict[str, Any]) -> dict[str, Any]:
    task, opts = ctx["task"], ctx["opts"]
    return {"mpp": task.mpp, "tile_px": task.tile_px, "context": list(task.context),
            "stain_backend": opts.stain_backend}


def _run_pyramid(ctx: dict[str, Any], results: dict[str, Any], inputs: str) -> dict[str, Any]:
    slide, store, task, opts = ctx["slide"], ctx["store"], ctx["task"], ctx["opts"]
    fit = stain_mod.StainFit.from_dict(results["stain"]["fit"])
    device = resolve_device(opts.device) if opts.stain_backend == "torch" else "cpu"
    normalise = stain_mod.make_normaliser(fit, task.stain, backend=opts.stain_backend,
                                          device=device)
    spec = PyramidSpec(mpp=task.mpp, tile_px=task.tile_px, context=task.context)
    tiles = store.read_array("tiles")
    bar = _progress_bar(opts, total=len(super_tile_groups(tiles, spec)),
                        desc=f"{ctx['slide_id']} pyramid")
    try:
        stats = write_pyramid(slide, store, tiles, spec, normalise, inputs,
                              workers=opts.workers, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    # the store describes itself: which stain matrices made these pixels
    store.root["image"].attrs["stain"] = {"fit": fit.to_dict(), "reference_name": task.stain,
                                          "reference": results["stain"]["reference"],
                                          "backend": opts.stain_backend}
    return stats | {"stain_backend": opts.stain_backend, "device": device}


# -- model stages: infer -> stitch -> measure -> export -----------------------------------------
def demo_weights(task: TaskSpec, spec: ModelSpec | None = None) -> Path:
    """The bundled demo checkpoint of ``task``'s model, or of ``spec`` (its classifier)
    (``wsi_pipeline/weights/<stem>.safetensors``)."""
    spec = spec or task.model
    stem = spec.demo_weights if spec else None
    path = Path(__file__).parent / "weights" / f"{stem}.safetensors"
    if stem is None or not path.exists():
        raise CheckpointError(f"no bundled demo weights for task {task.name}; pass --weights "
                              "FILE" + (" or --model classical" if task.name == "fls" else ""))
    return path


def _checkpoint_path(task: TaskSpec, spec: ModelSpec, weights: Path | None) -> Path:
    """Which checkpoint serves ``spec``: ``--weights`` when it is a folder (it must hold
    one for each of the task's models) or a file made for ``spec``; the bundled demo
    weights when no ``--weights`` was given, or when the file is for the task's other model
    (e.g. ``--weights`` names a mesangial classifier: the detector stays the demo one)."""
    if weights is None or weights.is_dir():
        return weights or demo_weights(task, spec)
    from .checkpoint import sidecar_task

    others = [m for m in (task.model, task.classifier) if m is not None and m is not spec]
    named = sidecar_task(weights)
    if named is not None and named != task.checkpoint_task(spec) \
            and any(named == task.checkpoint_task(m) for m in others):
        return demo_weights(task, spec)
    return weights


def _load(ctx: dict[str, Any], spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    from .checkpoint import load_checkpoint

    task, opts = ctx["task"], ctx["opts"]
    path = _checkpoint_path(task, spec, opts.weights)
    network, meta = load_checkpoint(path, task=task.checkpoint_task(spec))
    return network, meta | {"path": str(path)}


def _model(ctx: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(network, sidecar) of the run, loaded once; (None, description) in classical mode."""
    if "model" not in ctx:
        opts, task = ctx["opts"], ctx["task"]
        if opts.model == "classical":
            ctx["model"] = (None, {"architecture": "classical", "demo": False, "sha256": None,
                                   "description": "weight-free: dense aggregates of "
                                                  "lymphocytes found by a nucleus detector"})
        else:
            ctx["model"] = _load(ctx, task.model)
    return ctx["model"]


def _classifier(ctx: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """(network, sidecar) of the task's object classifier, loaded once; None without one."""
    task = ctx["task"]
    if task.classifier is None:
        return None
    if "classifier" not in ctx:
        ctx["classifier"] = _load(ctx, task.classifier)
    return ctx["classifier"]


def _infer_params(ctx: dict[str, Any]) -> dict[str, Any]:
    task, rules = ctx["task"], task_rules(ctx["task"])
    network, meta = _model(ctx)
    if network is None:
        return {"mode": "classical", "lymphocytes": asdict(rules.LymphocyteParams()),
                "aggregates": asdict(rules.AggregateParams())}
    return {"mode": "network", "architecture": meta["architecture"],
            "weights_sha256": meta["sha256"], "tile_px": task.tile_px,
            "overlap_px": task.model.overlap_px, "out_downsample": task.model.out_downsample,
            "level": task.model.level}


def _run_infer(ctx: dict[str, Any], results: dict[str, Any], inputs: str) -> dict[str, Any]:
    slide, store, task, opts = ctx["slide"], ctx["store"], ctx["task"], ctx["opts"]
    network, _ = _model(ctx)
    tiles = store.read_array("tiles")
    if network is None:
        rules = task_rules(task)
        bar = _progress_bar(opts, total=len(tiles), desc=f"{ctx['slide_id']} lymphocytes",
                            unit="tile")
        try:
            return rules.classical_infer(
                slide, store, _stain_fit(results), rules.Params(), rules.LymphocyteParams(),
                rules.AggregateParams(), workers=opts.workers,
                progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
    # torch is imported here, not at the top: runs that stop before inference, or use the
    # classical mode, then start in about 1 s instead of 4 s
    from .infer import EngineOptions, infer_to_store, window_grid

    spec = task.model
    # the network reads level `spec.level`: its windows are tile_px at that level, over the
    # tissue tiles that level's coarser grid covers
    factor = task.context[spec.level]
    level_hw = tuple(store.root[f"image/{spec.level}"].shape[1:])
    grid = np.unique(tiles // factor, axis=0) if factor > 1 and len(tiles) else tiles
    windows = window_grid(grid, task.tile_px, level_hw, spec.overlap_px)
    device = resolve_device(opts.device)
    bar = _progress_bar(opts, total=len(windows), desc=f"{ctx['slide_id']} infer",
                        unit="window")
    try:
        return infer_to_store(
            network, store, "prob", windows, size_px=task.tile_px, overlap_px=spec.overlap_px,
            context=task.context, level0_hw=level_hw, out_downsample=spec.out_downsample,
            options=EngineOptions(device=device, batch_size=opts.batch_size,
                                  workers=_loader_workers(opts.workers, device)),
            inputs=inputs, attrs={"mpp": task.pred_mpp, "classes": list(spec.classes)},
            base_level=spec.level, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()


def _loader_workers(workers: int, device: str) -> int:
    """DataLoader processes: on a CPU-only machine with <= 2 cores the model needs them
    all, and reading in-process measured faster (engine/bare 0.85 vs 0.57 with 2 workers)."""
    import os

    return 0 if device == "cpu" and (os.cpu_count() or 1) <= 2 else workers


def _stitch_params(ctx: dict[str, Any]) -> dict[str, Any]:
    return asdict(task_rules(ctx["task"]).Params())


def _run_stitch(ctx: dict[str, Any], results: dict[str, Any], inputs: str) -> dict[str, Any]:
    rules = task_rules(ctx["task"])
    return rules.stitch(ctx["store"], rules.Params())


def _measure_params(ctx: dict[str, Any]) -> dict[str, Any]:
    params = task_rules(ctx["task"]).measure_params()
    if "case" in ctx:  # the IM and TEM files are inputs of the measure stage
        params["case_files"] = ctx["case"].fingerprint
    classifier = _classifier(ctx)
    if classifier is not None:
        params["classifier_sha256"] = classifier[1]["sha256"]
    return params


def _run_measure(ctx: dict[str, Any], results: dict[str, Any], inputs: str) -> dict[str, Any]:
    opts = ctx["opts"]
    classifier = _classifier(ctx)
    device = resolve_device(opts.device) if classifier is not None else "cpu"
    return task_rules(ctx["task"]).measure(MeasureInputs(
        slide=ctx["slide"], store=ctx["store"], stain=_stain_fit(results),
        areas_mm2=results["stitch"]["areas_mm2"],
        classifier=classifier[0] if classifier is not None else None,
        device=device, batch_size=opts.batch_size))


def _export_params(ctx: dict[str, Any]) -> dict[str, Any]:
    return {"files": ["mask.ome.tif", "objects.geojson", "overlay.png"]}


def _run_export(ctx: dict[str, Any], results: dict[str, Any], inputs: str) -> dict[str, Any]:
    """mask.ome.tif (label map at the working MPP), objects.geojson, overlay.png; the
    report is written after the stage loop, from the manifest."""
    slide, store, task = ctx["slide"], ctx["store"], ctx["task"]
    out_dir = ctx["out_dir"]
    rules = task_rules(task)
    classes = store.root["pred/classes"]
    mpp = float(classes.attrs["mpp"])
    mask = write_mask_ome_tiff(out_dir / "mask.ome.tif", classes, mpp, out_mpp=task.mpp,
                               legend=rules.LEGEND)
    objects = results["measure"]["objects"]
    # ids derived from the stage's inputs: a rerun or a resumed run writes the same file
    n = write_geojson(out_dir / "objects.geojson",
                      [{"polygon_um": o["polygon_um"], "name": o["name"], "color": o["color"],
                        "object_type": "annotation", "measurements": o["measurements"],
                        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"wsi_pipeline:{inputs}:{i}"))}
                       for i, o in enumerate(objects)], slide_mpp=slide.mpp)
    colors = {k: c for k, c in class_colors(rules.LEGEND).items() if k in rules.OVERLAY_CLASSES}
    export_overlay(out_dir / "overlay.png", store.read_array("tissue/thumbnail"),
                   float(store.root["tissue/thumbnail"].attrs["mpp"]), labels=classes,
                   label_mpp=mpp, colors=colors,
                   tissue_outline=store.read_array("tissue/mask") == 1,
                   polygons_um=[(np.asarray(o["polygon_um"]), tuple(o["color"]))
                                for o in objects])
    return {"mask": {k: v for k, v in mask.items() if k != "path"}, "geojson_features": n,
            "files": ["report.json", "mask.ome.tif", "objects.geojson", "overlay.png"]}


def _stain_fit(results: dict[str, Any]) -> stain_mod.StainFit:
    return stain_mod.StainFit.from_dict(results["stain"]["fit"])


_STAGE_PARAMS = {"tissue": _tissue_params, "stain": _stain_params, "pyramid": _pyramid_params,
                 "infer": _infer_params, "stitch": _stitch_params,
                 "measure": _measure_params, "export": _export_params}
_STAGE_RUN = {"tissue": _run_tissue, "stain": _run_stain, "pyramid": _run_pyramid,
              "infer": _run_infer, "stitch": _run_stitch, "measure": _run_measure,
              "export": _run_export}


def _progress_bar(opts: RunOptions, total: int, desc: str, unit: str = "block") -> Any:
    if not opts.show_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


# -- outputs ---------------------------------------------------------------------------------
def build_report(slide: Slide, task: TaskSpec, slide_id: str, opts: RunOptions,
                 results: dict[str, Any], timings: dict[str, Any],
                 fingerprint: dict[str, Any], model: dict[str, Any] | None = None,
                 classifier: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json: DESIGN.md's shared keys plus slide, objects, quality and provenance.

    Until the measure stage has run, ``diagnosis.label`` is null and ``complete`` is
    false, so a partial report cannot be mistaken for a finished analysis.
    """
    tissue = results.get("tissue", {})
    stain = results.get("stain")
    w, h = slide.dimensions
    report = {
        "task": task.name,
        "complete": False,
        "stages_completed": list(results),
        "diagnosis": {"label": None, "adequate": None,
                      "note": "no tissue found" if tissue.get("n_tiles") == 0
                      else f"no model stage run (--until {opts.until})"},
        "scores": {},
        "counts": {"tissue_tiles": tissue.get("n_tiles")},
        "areas_mm2": {"tissue": tissue.get("tissue_area_mm2")},
        "slide": {"id": slide_id, "path": str(slide.path), "vendor": slide.vendor,
                  "width_px": w, "height_px": h, "mpp": slide.mpp,
                  "mpp_source": slide.mpp_source,
                  "size_mm": [round(v / 1000, 4) for v in slide.size_um],
                  "levels": [{"width": lv.width, "height": lv.height,
                              "downsample": round(lv.downsample, 4)} for lv in slide.levels],
                  "fingerprint": fingerprint},
        "quality": {"no_tissue": tissue.get("n_tiles") == 0,
                    "pen_fraction": tissue.get("pen_fraction"),
                    "stain_similarity_to_reference":
                        stain.get("similarity_to_reference") if stain else None,
                    "stain_warning": stain.get("warning") if stain else None},
        "pyramid": results.get("pyramid"),
        "provenance": {
            "package": "wsi_pipeline", "version": __version__,
            "arguments": list(opts.argv), "task_spec": asdict(task),
            "backend": slide.backend, "mpp": slide.mpp, "mpp_source": slide.mpp_source,
            "stain": stain, "stage_timings": timings,
            "python": sys.version.split()[0], "platform": platform.platform(),
        },
    }
    if model is not None:
        report["provenance"]["model"] = _model_provenance(model)
    if classifier is not None:
        report["provenance"]["classifier"] = _model_provenance(classifier)
    measured = results.get("measure")
    if measured is None:
        return report
    report["complete"] = "export" in results or opts.until == "measure"
    report["diagnosis"] = measured["diagnosis"]
    if any(m is not None and m.get("demo") for m in (model, classifier)):
        report["diagnosis"]["note"] += ("; made with the bundled DEMO weights (trained on "
                                        "synthetic slides), not for clinical use")
    if report["quality"]["stain_warning"]:
        report["diagnosis"]["note"] += "; WARNING: " + report["quality"]["stain_warning"]
    report["scores"] = measured["scores"]
    report["counts"] = {**report["counts"], **measured["counts"]}
    report["areas_mm2"] = {**report["areas_mm2"], **measured["areas_mm2"],
                           "tissue_mask": report["areas_mm2"]["tissue"]}
    report["areas_mm2"]["tissue"] = measured["areas_mm2"].get("tissue",
                                                              report["areas_mm2"]["tissue"])
    report["quality"]["adequate"] = measured["diagnosis"].get("adequate")
    report["objects"] = [
        {"id": i, "class": o["kind"], "centroid_um": o["centroid_um"], **o["measurements"]}
        for i, o in enumerate(measured["objects"])]
    if "case" in measured:  # glomerular-dx: files used, per-modality heads, SMIL's picks
        report["case"] = measured["case"]
    report["inference"] = results.get("infer")
    report["outputs"] = (results.get("export") or {}).get("files")
    return report


def _model_provenance(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("architecture", "arch_kwargs", "task", "classes", "levels", "mpp", "tile_px",
            "stain_reference", "sha256", "parameters", "demo", "description", "metrics",
            "training", "path")
    out = {k: meta[k] for k in keys if k in meta}
    if meta.get("demo"):
        out["note"] = "bundled demo weights, trained on synthetic slides: not for diagnosis"
    return out


def write_overlay(store: SlideStore, path: Path) -> None:
    """overlay.png: the tissue-detection thumbnail with the tissue outline in green and
    the outline of excluded marker ink in blue."""
    thumb = store.read_array("tissue/thumbnail")
    labels = store.read_array("tissue/mask")
    out = thumb.copy()
    for value, colour in ((2, (0, 60, 255)), (1, (0, 200, 0))):
        out[find_boundaries(labels == value, mode="thick")] = colour  # 2 px wide, visible
    import io

    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
