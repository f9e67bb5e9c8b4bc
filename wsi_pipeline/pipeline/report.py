"""report.json: the shared keys of the design (task, diagnosis, scores, counts, areas) plus
slide, objects, quality and provenance, from the stages' results."""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict
from typing import Any

from ..slide import Slide
from ..tasks import Task
from ..version import __version__
from .options import RunOptions

MODEL_KEYS = ("architecture", "arch_kwargs", "task", "classes", "levels", "mpp", "tile_px",
              "stain_reference", "sha256", "parameters", "demo", "description", "metrics",
              "training", "path")


def build_report(slide: Slide, task: Task, slide_id: str, opts: RunOptions,
                 results: dict[str, Any], timings: dict[str, Any],
                 fingerprint: dict[str, Any], model: dict[str, Any] | None = None,
                 classifier: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of one slide. ``results`` holds each finished stage's result, ``model``
    and ``classifier`` the sidecars of the networks that ran.

    Until the measure stage has run, ``diagnosis.label`` is null and ``complete`` is
    false, so a partial report cannot be mistaken for a finished analysis.
    """
    tissue = results.get("tissue", {})
    stain = results.get("stain")
    brightfield = tissue.get("brightfield")
    w, h = slide.dimensions
    if brightfield is False:
        note = "not a bright-field slide (fluorescence or dark-field): not analysed"
    elif tissue.get("n_tiles") == 0:
        note = "no tissue found"
    else:
        note = f"no model stage run (--until {opts.until})"
    report = {
        "task": task.name,
        "complete": False,
        "stages_completed": list(results),
        "diagnosis": {"label": None, "adequate": None, "note": note},
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
        "quality": {"brightfield": brightfield,
                    "brightfield_evidence": tissue.get("brightfield_evidence"),
                    # None: not looked for (not a bright-field slide)
                    "no_tissue": None if brightfield is False else tissue.get("n_tiles") == 0,
                    "pen_fraction": tissue.get("pen_fraction"),
                    "stain_identity": _stain_identity(stain),
                    "stain_similarity_to_reference":
                        stain.get("similarity_to_reference") if stain else None,
                    "stain_warning": stain.get("warning") if stain else None},
        "pyramid": results.get("pyramid"),
        "provenance": {
            "package": "wsi_pipeline", "version": __version__,
            "arguments": list(opts.argv), "task_spec": asdict(task.spec),
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
    if "case" in measured:  # a case task: files used, per-modality heads, ...
        report["case"] = measured["case"]
    report["inference"] = results.get("infer")
    report["outputs"] = (results.get("export") or {}).get("files")
    return report


def _stain_identity(stain: dict[str, Any] | None) -> dict[str, Any] | None:
    """``quality.stain_identity``: {label, confidence, expected} and the shares it rests on."""
    identity = (stain or {}).get("identity")
    if identity is None:
        return None
    keys = ("label", "confidence", "expected", "eosin_share", "dab_share")
    return {k: identity.get(k) for k in keys}


def _model_provenance(meta: dict[str, Any]) -> dict[str, Any]:
    out = {k: meta[k] for k in MODEL_KEYS if k in meta}
    if meta.get("demo"):
        out["note"] = "bundled demo weights, trained on synthetic slides: not for diagnosis"
    return out
