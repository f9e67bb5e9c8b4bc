"""One slide through the staged pipeline: open -> tissue -> stain -> pyramid.

Each stage reads what the stage before it left in the slide's store, and records itself in
the store's manifest with a checksum of its inputs (the slide's fingerprint, the upstream
stage's checksum and its own parameters). A re-run with the same inputs skips a finished
stage; a changed slide or parameter recomputes it and everything after it.
"""

from __future__ import annotations

import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from . import __version__
from . import stain as stain_mod
from .errors import NoTissue, UsageError
from .pyramid import PyramidSpec, super_tile_groups, write_pyramid
from .slide import Slide, open_slide
from .store import SlideStore, atomic_write_bytes, atomic_write_json, checksum, file_fingerprint
from .tasks import TaskSpec
from .tissue import TissueParams, detect_tissue, thumbnail_mpp, tile_grid

STAGES: tuple[str, ...] = ("tissue", "stain", "pyramid")
Log = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RunOptions:
    """Everything a run needs besides the slide and the task (the CLI's options)."""

    out: Path
    until: str = "pyramid"
    mpp: float | None = None
    backend: str = "auto"
    stain_backend: str = "numpy"
    device: str = "auto"
    workers: int = 2
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
        raise UsageError(f"--until {opts.until}: this version runs the stages "
                         f"{', '.join(STAGES)}")
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
    for stale in ("report.json", "overlay.png"):  # never left to describe an older run
        (out_dir / stale).unlink(missing_ok=True)
    store = SlideStore(out_dir / "store.zarr")
    fingerprint = file_fingerprint(path)
    upto = STAGES[: STAGES.index(opts.until) + 1]
    ctx: dict[str, Any] = {"slide": slide, "store": store, "task": task, "opts": opts,
                           "fingerprint": fingerprint, "log": log, "slide_id": slide_id}
    results: dict[str, Any] = {}
    upstream = checksum(fingerprint, slide.mpp, slide.backend, __version__)
    for stage in upto:
        params = _STAGE_PARAMS[stage](ctx)
        inputs = checksum(stage, upstream, params)
        entry = store.finished(stage, inputs)
        reused = entry is not None
        if entry is None:
            # this stage and those after it are about to change: their entries go first
            store.invalidate(*STAGES[STAGES.index(stage):])
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

    report = build_report(slide, task, slide_id, opts, results, timings, fingerprint)
    _write_outputs(store, out_dir, report)
    return report


def _write_outputs(store: SlideStore, out_dir: Path, report: dict[str, Any]) -> None:
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
    return {"fit": fit.to_dict(), "reference_name": task.stain,
            "reference": reference.to_dict(),
            "similarity_to_reference": round(float(stain_mod.stain_similarity(fit, reference)), 4),
            "sampled_tiles": int(len(pick)), "sampled_pixels": int(sum(len(p) for p in pixels))}


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


_STAGE_PARAMS = {"tissue": _tissue_params, "stain": _stain_params, "pyramid": _pyramid_params}
_STAGE_RUN = {"tissue": _run_tissue, "stain": _run_stain, "pyramid": _run_pyramid}


def _progress_bar(opts: RunOptions, total: int, desc: str) -> Any:
    if not opts.show_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block", leave=False, dynamic_ncols=True)


# -- outputs ---------------------------------------------------------------------------------
def build_report(slide: Slide, task: TaskSpec, slide_id: str, opts: RunOptions,
                 results: dict[str, Any], timings: dict[str, Any],
                 fingerprint: dict[str, Any]) -> dict[str, Any]:
    """report.json: DESIGN.md's shared keys plus slide, quality and provenance.

    Until a model stage has run, ``diagnosis.label`` is null and ``complete`` is false, so
    a pyramid-only report cannot be mistaken for a finished analysis.
    """
    tissue = results.get("tissue", {})
    stain = results.get("stain")
    w, h = slide.dimensions
    return {
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
                        stain.get("similarity_to_reference") if stain else None},
        "pyramid": results.get("pyramid"),
        "provenance": {
            "package": "wsi_pipeline", "version": __version__,
            "arguments": list(opts.argv), "task_spec": asdict(task),
            "backend": slide.backend, "mpp": slide.mpp, "mpp_source": slide.mpp_source,
            "stain": stain, "stage_timings": timings,
            "python": sys.version.split()[0], "platform": platform.platform(),
        },
    }


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
