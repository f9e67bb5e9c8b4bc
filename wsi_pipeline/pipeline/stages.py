"""The seven stages as records: a name, the parameters its output depends on, and the
function that runs it. Each reads what the stages before it left in the slide's store (and
their results), and returns a JSON-able summary that the manifest records.

The task-specific parts come from the task plugin (`wsi_pipeline.tasks.Task`): its
stitch and measure hooks, its legend, its alternative model modes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .. import quality
from .. import stain as stain_mod
from ..export import (
    INK_OUTLINE_RGB,
    TISSUE_OUTLINE_RGB,
    class_colors,
    polygons_from_mask,
    region_objects,
    write_geojson,
    write_mask_ome_tiff,
    write_overlay,
)
from ..labelmaps import nearest_index
from ..pyramid import PyramidSpec, super_tile_groups, write_pyramid
from ..tasks import MeasureInputs
from ..tissue import detect_tissue, thumbnail_mpp, tile_grid
from .context import SlideContext
from .options import resolve_device

Results = dict[str, Any]


@dataclass(frozen=True)
class Stage:
    """One stage: ``params(ctx)`` is what its output depends on besides the upstream
    stage (part of its inputs checksum); ``run(ctx, results, inputs)`` does the work and
    returns the summary the manifest records (``results`` holds the earlier stages')."""

    name: str
    params: Callable[[SlideContext], dict[str, Any]]
    run: Callable[[SlideContext, Results, str], dict[str, Any]]


# -- tissue ----------------------------------------------------------------------------------
def _tissue_params(ctx: SlideContext) -> dict[str, Any]:
    spec, slide = ctx.task.spec, ctx.slide
    return {"thumbnail_mpp": thumbnail_mpp(slide.size_um, slide.mpp),
            "tile_um": spec.tile_um, "min_tile_tissue": ctx.opts.min_tile_tissue,
            "brightfield_min_lstar": quality.MIN_BRIGHTFIELD_MEDIAN_LSTAR,
            **asdict(ctx.opts.tissue)}


def _run_tissue(ctx: SlideContext, results: Results, inputs: str) -> dict[str, Any]:
    """Tissue mask and tile grid; first of all, whether the slide is bright field at all (a
    fluorescence or dark-field slide gets no tissue search, no tiles, and the runner
    refuses it with `NotBrightfield`)."""
    slide, store, spec, opts = ctx.slide, ctx.store, ctx.task.spec, ctx.opts
    mpp = thumbnail_mpp(slide.size_um, slide.mpp)
    thumb = slide.thumbnail(mpp)
    store.write_array("tissue/thumbnail", thumb, {"mpp": mpp})
    brightfield, evidence = quality.is_brightfield(thumb)
    legend = {"0": "background", "1": "tissue", "2": "ink"}
    tile_attrs = {"mpp": spec.mpp, "tile_px": spec.tile_px, "tile_um": spec.tile_um,
                  "columns": ["row", "col"]}
    if not brightfield:
        store.write_array("tissue/mask", np.zeros(thumb.shape[:2], np.uint8),
                          {"mpp": mpp, "legend": legend})
        store.write_array("tiles", np.zeros((0, 2), np.int32), tile_attrs)
        return {"thumbnail_mpp": mpp, "brightfield": False, "brightfield_evidence": evidence,
                "tissue_area_mm2": None, "n_tiles": 0, "pen_fraction": None,
                "saturation_threshold": None, "od_threshold": None}
    found = detect_tissue(thumb, mpp, opts.tissue)
    tiles = tile_grid(found.mask, mpp, slide.size_um, spec.tile_um, opts.min_tile_tissue)
    labels = np.where(found.mask, 1, np.where(found.pen, 2, 0)).astype(np.uint8)
    store.write_array("tissue/mask", labels, {"mpp": mpp, "legend": legend})
    store.write_array("tiles", tiles, tile_attrs)
    return {"thumbnail_mpp": mpp, "brightfield": True, "brightfield_evidence": evidence,
            "tissue_area_mm2": round(found.area_mm2, 4),
            "n_tiles": int(len(tiles)), "pen_fraction": round(found.info["pen_fraction"], 4),
            "saturation_threshold": round(found.saturation_threshold, 4),
            "od_threshold": round(found.od_threshold, 4)}


# -- stain -----------------------------------------------------------------------------------
def _stain_params(ctx: SlideContext) -> dict[str, Any]:
    spec, opts = ctx.task.spec, ctx.opts
    return {"reference": spec.stain, "sample_tiles": opts.stain_sample_tiles, "seed": opts.seed,
            "mpp": spec.mpp, "tile_px": spec.tile_px,
            "reference_fit": stain_mod.REFERENCES[spec.stain].to_dict(),
            # what leaves a pixel out of the fit, and the stain-identity rule
            "non_stain": {"max_red_green_od": stain_mod.MAX_RED_GREEN_OD,
                          "min_brightest_rgb": stain_mod.MIN_BRIGHTEST_RGB,
                          "ink_mask": True},
            "identity": {"eosin_share": quality.EOSIN_SHARE_THRESHOLD,
                         "band": quality.EOSIN_SHARE_BAND, "dab_share": quality.DAB_SHARE_THRESHOLD,
                         "min_chromogen_cosine": quality.MIN_CHROMOGEN_COSINE,
                         "dab_od": quality.DAB_OD.round(6).tolist()}}


def _ink_in_tile(labels: np.ndarray, mask_mpp: float, row: int, col: int, tile_px: int,
                 mpp: float) -> np.ndarray:
    """(tile_px, tile_px) bool: the pixels of tile (row, col) that the tissue stage's mask
    (``labels`` at ``mask_mpp``) marks as ink (label 2), by nearest neighbour."""
    ys = nearest_index(tile_px, mpp, mask_mpp, labels.shape[0], start=row * tile_px)
    xs = nearest_index(tile_px, mpp, mask_mpp, labels.shape[1], start=col * tile_px)
    return labels[np.ix_(ys, xs)] == 2


def _run_stain(ctx: SlideContext, results: Results, inputs: str) -> dict[str, Any]:
    """The slide's stain fit on sampled tissue tiles, and which stain the slide carries.

    Pixels that no stain makes are left out of the fit: glass (L*/100 >= 0.8), pixels
    under the tissue stage's ink mask (any pen colour), and ink, marking dye or black
    debris by colour (`stain.non_stain`)."""
    slide, store, spec, opts = ctx.slide, ctx.store, ctx.task.spec, ctx.opts
    tiles = store.read_array("tiles")
    labels = store.read_array("tissue/mask")
    mask_mpp = float(store.root["tissue/mask"].attrs["mpp"])
    rng = np.random.default_rng(opts.seed)
    pick = rng.choice(len(tiles), size=min(len(tiles), opts.stain_sample_tiles), replace=False)
    pixels, n_ink, n_non_stain = [], 0, 0
    for r, c in tiles[np.sort(pick)]:
        tile = slide.read(c * spec.tile_um, r * spec.tile_um, spec.tile_px, spec.tile_px,
                          spec.mpp)
        ink = _ink_in_tile(labels, mask_mpp, int(r), int(c), spec.tile_px, spec.mpp)
        tissue = stain_mod.tissue_pixels(tile[~ink])
        keep = ~stain_mod.non_stain(tissue)
        pixels.append(tissue[keep])
        n_ink += int(ink.sum())
        n_non_stain += int(len(keep) - keep.sum())
    sample = np.concatenate(pixels) if pixels else np.zeros((0, 3), np.uint8)
    # the sample is already glass- and ink-free: the fit need not sift it again
    fit = stain_mod.fit_vahadane(sample, seed=opts.seed, exclude_non_stain=False)
    identity = quality.stain_identity(sample, fit, spec.stain, seed=opts.seed)
    reference = stain_mod.REFERENCES[spec.stain]
    similarity = {name: round(float(stain_mod.stain_similarity(fit, ref)), 4)
                  for name, ref in stain_mod.REFERENCES.items()}
    result = {"fit": fit.to_dict(), "reference_name": spec.stain,
              "reference": reference.to_dict(),
              "similarity_to_reference": similarity[spec.stain],
              "similarity_to_references": similarity,
              "closest_reference": max(similarity, key=similarity.__getitem__),
              "identity": identity,
              "sampled_tiles": int(len(pick)), "sampled_pixels": int(len(sample)),
              "excluded_pixels": {"ink_mask": n_ink, "non_stain": n_non_stain}}
    # The identity reads the colour of the slide's own chromogen (quality.stain_identity);
    # stain vectors alone tell H&E from PAS only weakly (stain.stain_similarity).
    expected, label = stain_mod.STAIN_NAMES[spec.stain], identity["label"]
    if label not in ("unknown", expected):
        looks, share = (("DAB-immunostained (IHC)", f"DAB share {identity['dab_share']:.2f}")
                        if label == "IHC" else
                        (f"{label}-stained", f"eosin share {identity['eosin_share']:.2f}"))
        result["warning"] = (f"the slide looks {looks}, not {expected} as task "
                             f"{ctx.task.name} expects (confidence "
                             f"{identity['confidence']:.2f}, {share}): check the stain; "
                             "results may be unreliable")
    return result


def stain_fit(results: Results) -> stain_mod.StainFit:
    """The slide's fitted stain matrices, from the stain stage's result."""
    return stain_mod.StainFit.from_dict(results["stain"]["fit"])


# -- pyramid ---------------------------------------------------------------------------------
def _pyramid_params(ctx: SlideContext) -> dict[str, Any]:
    spec = ctx.task.spec
    return {"mpp": spec.mpp, "tile_px": spec.tile_px, "context": list(spec.context),
            "stain_backend": ctx.opts.stain_backend}


def _run_pyramid(ctx: SlideContext, results: Results, inputs: str) -> dict[str, Any]:
    slide, store, spec, opts = ctx.slide, ctx.store, ctx.task.spec, ctx.opts
    fit = stain_fit(results)
    device = resolve_device(opts.device) if opts.stain_backend == "torch" else "cpu"
    normalise = stain_mod.make_normaliser(fit, spec.stain, backend=opts.stain_backend,
                                          device=device)
    pyramid = PyramidSpec(mpp=spec.mpp, tile_px=spec.tile_px, context=spec.context)
    tiles = store.read_array("tiles")
    bar = progress_bar(ctx, "pyramid", total=len(super_tile_groups(tiles, pyramid)))
    try:
        stats = write_pyramid(slide, store, tiles, pyramid, normalise, inputs,
                              workers=opts.workers, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    # the store describes itself: which stain matrices made these pixels
    store.root["image"].attrs["stain"] = {"fit": fit.to_dict(), "reference_name": spec.stain,
                                          "reference": results["stain"]["reference"],
                                          "backend": opts.stain_backend}
    return stats | {"stain_backend": opts.stain_backend, "device": device}


# -- infer -----------------------------------------------------------------------------------
def _infer_params(ctx: SlideContext) -> dict[str, Any]:
    spec = ctx.task.spec
    if ctx.opts.model != "network":
        return ctx.task.modes[ctx.opts.model].params()
    meta = ctx.model.meta
    return {"mode": "network", "architecture": meta["architecture"],
            "weights_sha256": meta["sha256"], "tile_px": spec.tile_px,
            "overlap_px": spec.model.overlap_px, "out_downsample": spec.model.out_downsample,
            "level": spec.model.level}


def _run_infer(ctx: SlideContext, results: Results, inputs: str) -> dict[str, Any]:
    store, spec, opts = ctx.store, ctx.task.spec, ctx.opts
    tiles = store.read_array("tiles")
    if opts.model != "network":
        mode = ctx.task.modes[opts.model]
        bar = progress_bar(ctx, "infer", total=len(tiles), unit="tile")
        try:
            return mode.infer(ctx.slide, store, stain_fit(results), workers=opts.workers,
                              progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
    # torch is imported here, not at the top: runs that stop before inference, or use an
    # alternative mode, then start in about 1 s instead of 4 s
    from ..infer import EngineOptions, infer_to_store, window_grid

    model = spec.model
    # the network reads level `model.level`: its windows are tile_px at that level, over
    # the tissue tiles that level's coarser grid covers
    factor = spec.context[model.level]
    level_hw = tuple(store.root[f"image/{model.level}"].shape[1:])
    grid = np.unique(tiles // factor, axis=0) if factor > 1 and len(tiles) else tiles
    windows = window_grid(grid, spec.tile_px, level_hw, model.overlap_px)
    device = resolve_device(opts.device)
    bar = progress_bar(ctx, "infer", total=len(windows), unit="window")
    try:
        return infer_to_store(
            ctx.model.network, store, "prob", windows, size_px=spec.tile_px,
            overlap_px=model.overlap_px, context=spec.context, level0_hw=level_hw,
            out_downsample=model.out_downsample,
            options=EngineOptions(device=device, batch_size=opts.batch_size,
                                  runtime=opts.runtime,
                                  workers=_loader_workers(opts.workers, device)),
            inputs=inputs, attrs={"mpp": spec.pred_mpp, "classes": list(model.classes)},
            base_level=model.level, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()


def _loader_workers(workers: int, device: str) -> int:
    """DataLoader processes: on a CPU-only machine with <= 2 cores the model needs them
    all, and reading in-process measured faster (engine/bare 0.85 vs 0.57 with 2 workers)."""
    import os

    return 0 if device == "cpu" and (os.cpu_count() or 1) <= 2 else workers


# -- stitch, measure -------------------------------------------------------------------------
def _stitch_params(ctx: SlideContext) -> dict[str, Any]:
    return asdict(ctx.task.params())


def _run_stitch(ctx: SlideContext, results: Results, inputs: str) -> dict[str, Any]:
    return ctx.task.stitch(ctx.store, ctx.task.params())


def _measure_params(ctx: SlideContext) -> dict[str, Any]:
    params = ctx.task.measure_params()
    if ctx.extra_inputs is not None:   # e.g. a case's image files
        params["case_files"] = ctx.extra_inputs
    if ctx.classifier is not None:
        params["classifier_sha256"] = ctx.classifier.meta["sha256"]
    return params


def _run_measure(ctx: SlideContext, results: Results, inputs: str) -> dict[str, Any]:
    classifier = ctx.classifier.network if ctx.classifier is not None else None
    device = resolve_device(ctx.opts.device) if classifier is not None else "cpu"
    return ctx.task.measure(MeasureInputs(
        slide=ctx.slide, store=ctx.store, stain=stain_fit(results),
        areas_mm2=results["stitch"]["areas_mm2"], classifier=classifier,
        device=device, batch_size=ctx.opts.batch_size))


# -- export ----------------------------------------------------------------------------------
EXPORT_FILES = ("overlay.png", "mask.ome.tif", "objects.geojson", "regions.geojson",
                "cells.geojson")
REGION_MIN_UM2 = 400.0   # smaller islands of a class are not exported as regions
CELLS = "pred/cells"   # (N, 2) x, y um of detected cells, attrs name and color (optional)


def _export_params(ctx: SlideContext) -> dict[str, Any]:
    return {"files": ["mask.ome.tif", "objects.geojson", "overlay.png"]}


def _run_export(ctx: SlideContext, results: Results, inputs: str) -> dict[str, Any]:
    """mask.ome.tif (label map at the working MPP), objects.geojson, overlay.png, and
    cells.geojson when the measure stage left cell detections in ``pred/cells``; the
    report is written after the stage loop, from the manifest."""
    store, task, out_dir = ctx.store, ctx.task, ctx.out_dir
    classes = store.root["pred/classes"]
    mpp = float(classes.attrs["mpp"])
    mask = write_mask_ome_tiff(out_dir / "mask.ome.tif", classes, mpp, out_mpp=task.spec.mpp,
                               legend=dict(task.legend))
    objects = results["measure"]["objects"]
    # ids derived from the stage's inputs: a rerun or a resumed run writes the same file
    n = write_geojson(out_dir / "objects.geojson",
                      [{"polygon_um": o["polygon_um"], "name": o["name"], "color": o["color"],
                        "object_type": "annotation", "measurements": o["measurements"],
                        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"wsi_pipeline:{inputs}:{i}"))}
                       for i, o in enumerate(objects)], slide_mpp=ctx.slide.mpp)
    colors = {k: c for k, c in class_colors(dict(task.legend)).items()
              if k in task.overlay_classes}
    tissue = store.read_array("tissue/mask")
    key = [(task.legend[k], c) for k, c in colors.items()]
    key += sorted({(o["name"] + " (outline)", tuple(o["color"])) for o in objects})
    label = results["measure"]["diagnosis"].get("label")
    write_overlay(out_dir / "overlay.png", store.read_array("tissue/thumbnail"),
                  float(store.root["tissue/thumbnail"].attrs["mpp"]), labels=classes,
                  label_mpp=mpp, colors=colors, tissue_outline=tissue == 1,
                  ink_outline=tissue == 2,
                  polygons_um=[(np.asarray(o["polygon_um"]), tuple(o["color"]))
                               for o in objects],
                  title=f"{ctx.slide_id}  |  {task.spec.title}  |  diagnosis: {label}",
                  legend=[*key, *outline_key(tissue)], scale_bar=True)
    regions = write_geojson(out_dir / "regions.geojson",
                            [{**r, "object_type": "annotation",
                              "id": str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                   f"wsi_pipeline:{inputs}:region{i}"))}
                             for i, r in enumerate(_regions(ctx, classes))],
                            slide_mpp=ctx.slide.mpp)
    files = ["report.json", "mask.ome.tif", "objects.geojson", "regions.geojson",
             "overlay.png"]
    result = {"mask": {k: v for k, v in mask.items() if k != "path"}, "geojson_features": n,
              "region_features": regions}
    if CELLS in store.root:
        cells = store.root[CELLS]
        name, color = str(cells.attrs["name"]), tuple(cells.attrs["color"])
        result["cells"] = write_geojson(
            out_dir / "cells.geojson",
            ({"point_um": xy, "name": name, "color": color, "object_type": "detection",
              "measurements": {},
              "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"wsi_pipeline:{inputs}:cell{i}"))}
             for i, xy in enumerate(np.asarray(cells[...]).reshape(-1, 2))),
            slide_mpp=ctx.slide.mpp)
        files.append("cells.geojson")
    return result | {"files": files}


def _regions(ctx: SlideContext, classes: Any) -> list[dict[str, Any]]:
    """QuPath region annotations: the tissue (from the tissue stage's mask) and each
    connected region of the task's region classes (with their holes), in the task's
    colours."""
    task, store = ctx.task, ctx.store
    mask = store.read_array("tissue/mask") == 1
    mpp = float(store.root["tissue/mask"].attrs["mpp"])
    regions = [{"name": "Tissue", "color": TISSUE_OUTLINE_RGB,
                "polygon_um": np.round(p["polygon_um"], 1).tolist(),
                "holes_um": [np.round(h, 1).tolist() for h in p["holes_um"]],
                "measurements": {"area_mm2": round(p["area_um2"] / 1e6, 5)}}
               for p in polygons_from_mask(mask, mpp, simplify_um=mpp)
               if p["area_um2"] >= REGION_MIN_UM2]
    colours = {**class_colors(dict(task.legend)), **task.colors}
    kinds = {k: (task.legend[k], colours[k]) for k in task.region_classes}
    for r in region_objects(classes, kinds, REGION_MIN_UM2, holes=True):
        regions.append({k: r[k] for k in ("name", "color", "polygon_um", "holes_um")}
                       | {"measurements": {"area_mm2": r["measurements"]["area_mm2"]}})
    return regions


def outline_key(tissue_mask: np.ndarray) -> list[tuple[str, tuple[int, int, int]]]:
    """Legend entries of the tissue outline, and of excluded ink when there is some."""
    key = [("tissue outline", TISSUE_OUTLINE_RGB)]
    if (tissue_mask == 2).any():
        key.append(("ink left out", INK_OUTLINE_RGB))
    return key


def progress_bar(ctx: SlideContext, stage: str, total: int, unit: str = "block") -> Any:
    """Progress of a long stage: a tqdm bar on a terminal (``opts.show_progress``), else
    log events at every tenth of the work (``{"slide", "stage", "status": "progress",
    "done", "total"}``), so cluster logs show a stage moving."""
    if ctx.opts.show_progress:
        from tqdm import tqdm

        return tqdm(total=total, desc=f"{ctx.slide_id} {stage}", unit=unit, leave=False,
                    dynamic_ncols=True)
    return _LogProgress(ctx, stage, total, unit)


class _LogProgress:
    """tqdm's ``update``/``close`` as throttled log events."""

    def __init__(self, ctx: SlideContext, stage: str, total: int, unit: str) -> None:
        self.ctx, self.stage, self.total, self.unit = ctx, stage, total, unit
        self.done = self.next_tenth = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        tenth = self.done * 10 // max(self.total, 1)
        if tenth > self.next_tenth and self.done < self.total:
            self.next_tenth = tenth
            self.ctx.log({"slide": self.ctx.slide_id, "stage": self.stage,
                          "status": "progress", "done": self.done, "total": self.total,
                          "unit": self.unit})

    def close(self) -> None:
        pass


STAGE_LIST: tuple[Stage, ...] = (
    Stage("tissue", _tissue_params, _run_tissue),
    Stage("stain", _stain_params, _run_stain),
    Stage("pyramid", _pyramid_params, _run_pyramid),
    Stage("infer", _infer_params, _run_infer),
    Stage("stitch", _stitch_params, _run_stitch),
    Stage("measure", _measure_params, _run_measure),
    Stage("export", _export_params, _run_export),
)
