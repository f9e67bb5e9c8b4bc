"""`tumour-area`: a sixth task, written outside wsi_pipeline as a plugin.

A one-class U-Net finds tumour on H&E at 2 um/px; the report gives the tumour area (mm2),
its fraction of the tissue, and "tumour" when that fraction reaches ``positive_fraction``
(else "no-tumour"). Everything the pipeline needs is in the `Task` at the bottom, which
``pyproject.toml`` registers under the entry-point group ``wsi_pipeline.tasks``.

Train and run it (synthetic liver slides stand in for a lab's annotated ones; their HCC and
CCA regions are the tumour)::

    wsi-train --task tumour-area --synth 4 --out tumour_model
    wsi-run slide.svs --task tumour-area --weights tumour_model.safetensors
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from wsi_pipeline.export import region_objects
from wsi_pipeline.labelmaps import iter_bands, new_label_map, thumbnail_tissue, tissue_band
from wsi_pipeline.tasks import MeasureInputs, ModelSpec, Task, TaskSpec

MODEL = ModelSpec(arch="unet", classes=("tumour",),
                  annotations={"tumour": ("tumour", "tumor", "hcc", "cca")},
                  out_downsample=2, overlap_px=64)
SPEC = TaskSpec(name="tumour-area", title="Tumour area (plugin example)", mpp=2.0,
                tile_px=256, stain="he", context=(1,), model=MODEL)
LEGEND = {0: "background", 1: "non-tumour tissue", 2: "tumour"}
TUMOUR = 2
COLOR = (213, 94, 0)


@dataclass(frozen=True)
class TumourParams:
    """threshold          tumour probability from which a pixel is tumour
    positive_fraction  "tumour" when at least this fraction of the tissue is tumour
    min_region_um2     tumour regions smaller than this are not listed as objects
    """

    threshold: float = 0.5
    positive_fraction: float = 0.1
    min_region_um2: float = 20_000.0


def stitch(store, params: TumourParams) -> dict:
    """``pred/labels``: tissue (1) and tumour (2) inside the tissue mask; their areas."""
    prob = store.root["pred/prob"]
    mpp = float(prob.attrs["mpp"])
    tissue_lowres, tissue_mpp = thumbnail_tissue(store)
    labels = new_label_map(store, "pred/labels", prob, LEGEND)
    counts = np.zeros(3, np.int64)
    for y0, band in iter_bands(prob):
        tissue = tissue_band(tissue_lowres, tissue_mpp, y0, band.shape[1:], mpp)
        out = np.where(tissue, 1, 0).astype(np.uint8)
        out[tissue & (band[0] >= params.threshold * 255)] = TUMOUR
        labels[y0:y0 + out.shape[0], :] = out
        counts += np.bincount(out.ravel(), minlength=3)
    px_mm2 = mpp * mpp / 1e6
    return {"mpp": mpp, "areas_mm2": {"tissue": round(float(counts[1:].sum() * px_mm2), 5),
                                      "tumour": round(float(counts[TUMOUR] * px_mm2), 5)}}


def measure(inputs: MeasureInputs, params: TumourParams | None = None) -> dict:
    """Tumour fraction of the tissue, the diagnosis, one object per tumour region."""
    params = params or TumourParams()
    areas = inputs.areas_mm2
    labels = inputs.store.root["pred/labels"]
    new_label_map(inputs.store, "pred/classes", labels, LEGEND, copy=True)
    fraction = areas["tumour"] / areas["tissue"] if areas["tissue"] > 0 else 0.0
    positive = fraction >= params.positive_fraction
    objects = region_objects(labels, {TUMOUR: ("Tumour", COLOR)}, params.min_region_um2)
    return {"diagnosis": {"label": "tumour" if positive else "no-tumour", "adequate": True,
                          "note": f"tumour {100 * fraction:.1f} % of the tissue "
                                  f"({'>=' if positive else '<'} "
                                  f"{100 * params.positive_fraction:g} %)"},
            "scores": {"tumour_fraction": round(fraction, 5)},
            "counts": {"tumour_regions": len(objects)},
            "areas_mm2": dict(areas), "objects": objects}


def synth(path, **kwargs) -> dict:
    """Training slides: synthetic H&E liver, whose HCC/CCA regions are the tumour."""
    from wsi_pipeline.synth import write_slide

    return write_slide("liver", path, **kwargs)


TASK = Task(spec=SPEC, legend=LEGEND, stitch=stitch, measure=measure, params=TumourParams,
            measure_params=lambda: asdict(TumourParams()), overlay_classes=(TUMOUR,),
            region_classes=(1, TUMOUR), main_score="tumour_fraction",
            colors={TUMOUR: COLOR}, synth=synth, synth_labels=("HCC", "CCA"))
