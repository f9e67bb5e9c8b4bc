"""Glomerulus detection, the step `mesangial` and `glomerular-dx` share (docs/models.md §0).

No seed publishes a detector, so [choice]: a U-Net segments glomeruli on PAS at ~1 um/px
(the x2 level of a 0.5 um/px pyramid), windows of 512 px (512 um: a whole human glomerulus,
150-250 um across, with room around it; docs/models.md suggests 1024 px, the overlap
blending makes the window size matter little) overlapping by 128 px, probabilities kept at 2 um/px.
Connected components of probability >= 0.5 whose area-equivalent diameter lies in
[``min_diameter_um``, ``max_diameter_um``] are glomeruli: smaller ones are tuft fragments or
false positives, larger ones merged neighbours or artefacts. Each glomerulus gets its
outline and a 512 x 512 crop at 0.5 um/px centred on it for the task's classifier.

The detector is trained on its own, ``wsi-train --task glomeruli``; its checkpoints carry
the task name "glomeruli", and a task that uses it declares `detector_at` its level.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage

from ..export import polygons_from_mask
from ..labelmaps import (
    connected_components,
    iter_bands,
    new_label_map,
    thumbnail_tissue,
    tissue_band,
)
from ..store import SlideStore
from .hooks import synth_slides
from .spec import MeasureInputs, ModelSpec, Task, TaskSpec

MODEL = ModelSpec(
    arch="unet", classes=("glomerulus",),
    annotations={"glomerulus": ("glomerulus", "glomerulus_hypercellular", "glomeruli")},
    out_downsample=2, overlap_px=128, demo_weights="glomeruli_demo",
    checkpoint_task="glomeruli")

# What `wsi-train --task glomeruli` trains on: a PAS pyramid at the detector's own MPP.
TASK = TaskSpec(name="glomeruli", title="Glomerulus detector (shared step)", mpp=1.0,
                tile_px=512, stain="pas", context=(1,), model=MODEL)


def detector_at(level: int) -> ModelSpec:
    """The detector as the model of a task whose pyramid level ``level`` is ~1 um/px."""
    return replace(MODEL, level=level)


@dataclass(frozen=True)
class GlomerulusParams:
    """threshold          glomerulus probability from which a pixel is glomerulus
    min_diameter_um    smaller components (area-equivalent diameter) are dropped
    max_diameter_um    larger ones too (merged neighbours, artefacts)
    crop_px            classifier crops are crop_px x crop_px ...
    crop_mpp           ... at this resolution (um/px), centred on each glomerulus
    """

    threshold: float = 0.5
    min_diameter_um: float = 60.0
    max_diameter_um: float = 400.0
    crop_px: int = 512
    crop_mpp: float = 0.5


def find_glomeruli(prob, params: GlomerulusParams) -> tuple[list[dict], int]:
    """Glomeruli in a stored probability map (``pred/prob``: (1, H, W) uint8 zarr, attrs
    ``mpp``), band by band: (objects, number of components rejected by size).

    Each object: ``bbox_px`` (y0, x0, y1, x1) and ``mask`` (holes filled) in map pixels,
    ``polygon_um`` outline, ``centroid_um`` (x, y), ``area_um2``, ``diameter_um``
    (area-equivalent), in raster order of their first pixel.
    """
    mpp = float(prob.attrs["mpp"])
    cut = params.threshold * 255
    found, rejected = [], 0
    for (y0, x0, y1, x1), mask in connected_components(prob, lambda b: b[0] >= cut):
        mask = ndimage.binary_fill_holes(mask)
        area_um2 = float(mask.sum()) * mpp * mpp
        diameter = 2 * float(np.sqrt(area_um2 / np.pi))
        if not params.min_diameter_um <= diameter <= params.max_diameter_um:
            rejected += 1
            continue
        origin = (x0 * mpp, y0 * mpp)
        outline = max(polygons_from_mask(mask, mpp, origin, simplify_um=mpp),
                      key=lambda p: p["area_um2"])
        ys, xs = np.nonzero(mask)
        found.append({"bbox_px": (y0, x0, y1, x1), "mask": mask,
                      "polygon_um": np.round(outline["polygon_um"], 2).tolist(),
                      "centroid_um": [round(origin[0] + (xs.mean() + 0.5) * mpp, 2),
                                      round(origin[1] + (ys.mean() + 0.5) * mpp, 2)],
                      "area_um2": round(area_um2, 1), "diameter_um": round(diameter, 1)})
    return found, rejected


def read_crops(image, image_mpp: float, centres_um: np.ndarray, params: GlomerulusParams
               ) -> np.ndarray:
    """(N, crop_px, crop_px, 3) uint8 crops centred on ``centres_um`` ((N, 2) x, y um) from
    a (3, H, W) pyramid level at ``image_mpp`` um/px (which must equal ``crop_mpp``);
    outside the slide is glass white."""
    from ..infer import read_patch

    if abs(image_mpp - params.crop_mpp) > 1e-6:
        raise ValueError(f"crops are read at {params.crop_mpp} um/px, the level is "
                         f"{image_mpp} um/px")
    half = params.crop_px // 2
    out = np.empty((len(centres_um), params.crop_px, params.crop_px, 3), np.uint8)
    for i, (x_um, y_um) in enumerate(np.asarray(centres_um, float).reshape(-1, 2)):
        cy, cx = int(round(y_um / image_mpp)), int(round(x_um / image_mpp))
        out[i] = read_patch(image, cy - half, cx - half, params.crop_px)
    return out


def stitch_candidates(store: SlideStore, legend: dict[int, str]) -> dict:
    """The stitch stage of a task built on the detector: ``pred/labels`` ((H, W) uint8 at
    the prediction MPP, ``legend``) marks glomerulus candidates (detector probability >=
    `GlomerulusParams.threshold`) inside tissue with 1; tissue and candidate areas in
    mm2."""
    prob = store.root["pred/prob"]
    mpp = float(prob.attrs["mpp"])
    tissue_lowres, tissue_mpp = thumbnail_tissue(store)
    width = prob.shape[2]
    cut = GlomerulusParams().threshold * 255
    labels = new_label_map(store, "pred/labels", prob, legend)
    tissue_px = candidate_px = 0
    for y0, band in iter_bands(prob):
        h = band.shape[1]
        tissue = tissue_band(tissue_lowres, tissue_mpp, y0, (h, width), mpp)
        candidates = (band[0] >= cut) & tissue
        labels[y0:y0 + h, :] = candidates.astype(np.uint8)
        tissue_px += int(tissue.sum())
        candidate_px += int(candidates.sum())
    px_mm2 = mpp * mpp / 1e6
    return {"mpp": mpp, "areas_mm2": {"tissue": round(tissue_px * px_mm2, 5),
                                      "glomerulus_candidates": round(candidate_px * px_mm2, 5)}}


# -- the detector on its own (``wsi-train --task glomeruli``) -----------------------------------
LEGEND = {0: "background", 1: "glomerulus candidate", 2: "glomerulus"}


def _stitch(store: SlideStore, params: GlomerulusParams) -> dict:
    return stitch_candidates(store, LEGEND)


def _measure(inputs: MeasureInputs, params: GlomerulusParams | None = None) -> dict:
    """Glomeruli (`find_glomeruli`) as objects, their count and area."""
    params = params or GlomerulusParams()
    store = inputs.store
    glomeruli, rejected = find_glomeruli(store.root["pred/prob"], params)
    classes = new_label_map(store, "pred/classes", store.root["pred/labels"], LEGEND)
    for g in glomeruli:
        y0, x0, y1, x1 = g["bbox_px"]
        block = np.asarray(classes[y0:y1, x0:x1])
        block[g["mask"]] = 2
        classes[y0:y1, x0:x1] = block
    return {"diagnosis": {"label": None, "adequate": None,
                          "note": f"{len(glomeruli)} glomeruli"},
            "scores": {}, "counts": {"glomeruli": len(glomeruli),
                                     "rejected_components": rejected},
            "areas_mm2": {**inputs.areas_mm2,
                          "glomeruli": round(sum(g["area_um2"] for g in glomeruli) / 1e6, 5)},
            "objects": [{"name": "Glomerulus", "kind": "glomerulus", "color": (0, 114, 178),
                         "polygon_um": g["polygon_um"], "centroid_um": g["centroid_um"],
                         "measurements": {"area_um2": g["area_um2"],
                                          "diameter_um": g["diameter_um"]}}
                        for g in glomeruli]}


# what the detector and the mesangial classifier train on
synth_kidney = synth_slides("mesangial")
PLUGIN = Task(spec=TASK, legend=LEGEND, stitch=_stitch, measure=_measure,
              params=GlomerulusParams, measure_params=lambda: asdict(GlomerulusParams()),
              overlay_classes=(2,), synth=synth_kidney, synth_labels=("M0", "M1"),
              runnable=False)
