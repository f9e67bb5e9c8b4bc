"""`glomerular-dx` — CMUS-Net tri-modal IgAN / MN / LN (docs/models.md §2, seed 001).

The input is a case folder (`wsi_pipeline.case`: om/ slide, im/ and tem/ images). The OM
slide goes through the same stages as `mesangial`: PAS pyramid at 0.5, 1 and 2 um/px, the
shared glomerulus detector (`tasks.glomeruli`) on the 1 um/px level, candidates in the
stitch stage. The measure stage:

1. glomeruli from the detector's map; the ``max_glomeruli`` largest [choice: 8, enough to
   average out one odd glomerulus, few enough for a CPU] each give a 512 x 512 crop at
   0.5 um/px, resized to the network's ``image_px``;
2. the case's IM image and TEM bag (first 10 in sorted order, zero-padded), resized the same
   way (`case.resize_square`, `case.stack_tem`);
3. CMUS-Net on every crop with the same IM and TEM; the class probabilities (softmax of the
   fusion logits, and of each modality head) are averaged over the crops; the diagnosis is
   their argmax. SMIL's kept TEM images and weights do not depend on the crop.

[choice] No glomerulus found: a degraded diagnosis from the IM and TEM heads only (the mean
of their probabilities; the network runs with ``om=None``), reported as not adequate with a
note saying so. Adequacy [choice]: at least ``min_glomeruli`` (1) glomerulus classified;
a usable IM image and >= 1 TEM image are checked when the case is read (else it fails).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..labelmaps import new_label_map
from ..store import SlideStore
from .glomeruli import (
    GlomerulusParams,
    detector_at,
    find_glomeruli,
    read_crops,
    stitch_candidates,
)
from .hooks import synth_slides
from .spec import MeasureInputs, ModelSpec, Task, TaskSpec

CLASSES = ("MN", "IgAN", "LN")  # the network's output order [code]
CLASSIFIER = ModelSpec(arch="cmus_net", classes=CLASSES, annotations={},
                       demo_weights="glomerular_dx_demo")

TASK = TaskSpec(name="glomerular-dx", title="Glomerular disease: IgAN / MN / LN",
                mpp=0.5, tile_px=512, stain="pas", context=(1, 2, 4), input_kind="case",
                model=detector_at(1), classifier=CLASSIFIER)

# Label map at TASK.pred_mpp (2 um/px)
LEGEND = {0: "background", 1: "glomerulus candidate", 2: "glomerulus (classified)",
          3: "glomerulus (not used)"}
CANDIDATE, USED, UNUSED = 1, 2, 3
OVERLAY_CLASSES = (USED, UNUSED)
COLORS = {USED: (0, 114, 178), UNUSED: (153, 153, 153)}
HEADS = ("fusion", "om", "im", "tem")


@dataclass(frozen=True)
class GlomerularDxParams:
    """max_glomeruli   at most this many glomeruli (the largest) are classified
    min_glomeruli   an adequate case has at least this many glomeruli classified
    """

    max_glomeruli: int = 8
    min_glomeruli: int = 1


Params = GlomerularDxParams


def stitch(store: SlideStore, params: GlomerularDxParams) -> dict:
    """The stitch stage: glomerulus candidates inside tissue as `LEGEND`'s ``CANDIDATE``
    (`glomeruli.stitch_candidates`)."""
    return stitch_candidates(store, LEGEND)


def _images_to_tensor(images: np.ndarray, device: str) -> Any:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(*range(x.ndim - 3), -1, -3, -2).float().div_(255)


def predict_case(model: Any, om: np.ndarray | None, im: np.ndarray, tem: np.ndarray,
                 tem_mask: np.ndarray, device: str = "cpu", batch_size: int = 8
                 ) -> dict[str, Any]:
    """CMUS-Net on one case, every OM crop with the same IM and TEM bag.

    om (N, px, px, 3) uint8 glomerulus crops (None or N = 0: no OM, degraded); im
    (px, px, 3) uint8; tem (T, px, px, 3) uint8 zero-padded bag with its (T,) bool mask.
    Returns (K,) float probabilities averaged over the crops: ``fusion``, ``om`` (None
    without crops), ``im``, ``tem``; ``per_crop`` (N, K) fusion probabilities; ``kept``
    (S,) TEM slots SMIL kept, ``weights`` (S,), ``medoid`` (int, -1 without SMIL).
    """
    import torch

    model = model.eval().to(device)
    n = 0 if om is None else len(om)
    chunks = [om[i:i + batch_size] for i in range(0, n, batch_size)] if n else [None]
    sums: dict[str, Any] = {}
    per_crop = []
    with torch.inference_mode():
        for chunk in chunks:
            b = 1 if chunk is None else len(chunk)
            im_t = _images_to_tensor(np.repeat(im[None], b, 0), device)
            tem_t = _images_to_tensor(np.repeat(tem[None], b, 0), device)
            mask_t = torch.from_numpy(np.repeat(tem_mask[None], b, 0)).to(device)
            om_t = None if chunk is None else _images_to_tensor(chunk, device)
            out = model(om_t, im_t, tem_t, mask_t)
            for key, name in (("logits", "fusion"), ("om", "om"), ("im", "im"), ("tem", "tem")):
                if out[key] is None:
                    sums[name] = None
                    continue
                p = torch.softmax(out[key].float(), 1).cpu().numpy()
                sums[name] = p.sum(0) + (sums.get(name) if sums.get(name) is not None else 0)
                if name == "fusion" and chunk is not None:
                    per_crop.append(p)
    count = max(n, 1)
    result = {name: None if sums[name] is None else sums[name] / count for name in HEADS}
    result["per_crop"] = np.concatenate(per_crop) if per_crop else np.zeros((0, model.classes))
    result["kept"] = out["kept"][0].cpu().numpy()
    result["weights"] = out["weights"][0].float().cpu().numpy()
    result["medoid"] = int(out["medoid"][0])
    return result


def _probs(p: np.ndarray | None, names: tuple[str, ...]) -> dict[str, float] | None:
    return None if p is None else {f"p_{c}": round(float(v), 5) for c, v in zip(names, p,
                                                                                  strict=True)}


def diagnose(pred: dict[str, Any], class_names: tuple[str, ...], n_glomeruli: int,
             params: GlomerularDxParams) -> dict[str, Any]:
    """Diagnosis (argmax), adequacy and the report's scores from `predict_case`'s output;
    without glomeruli, from the mean of the IM and TEM heads (degraded)."""
    degraded = n_glomeruli == 0
    p = (pred["im"] + pred["tem"]) / 2 if degraded else pred["fusion"]
    k = int(np.argmax(p))
    label = class_names[k]
    adequate = n_glomeruli >= params.min_glomeruli
    if degraded:
        note = (f"{label} (p {p[k]:.2f}) from the IM and TEM heads only: no glomerulus found "
                "on the OM slide (degraded, not adequate)")
    else:
        note = (f"{label} (p {p[k]:.2f}) from OM ({n_glomeruli} glomerul"
                f"{'us' if n_glomeruli == 1 else 'i'}), IM and TEM "
                f"({len(pred['kept'])} image{'s' if len(pred['kept']) != 1 else ''} kept by "
                "SMIL)")
        if not adequate:
            note += f"; fewer than {params.min_glomeruli} glomeruli: not adequate"
    scores = {f"p_{c}": round(float(p[class_names.index(c)]), 5)
              for c in ("IgAN", "MN", "LN") if c in class_names}
    return {"diagnosis": {"label": label, "adequate": bool(adequate), "note": note,
                          "degraded": degraded,
                          "source": "im+tem heads" if degraded else "fusion"},
            "scores": scores}


def measure_params() -> dict:
    """Everything `measure` depends on besides its inputs (recorded in the manifest)."""
    return {"rules": asdict(GlomerularDxParams()), "glomeruli": asdict(GlomerulusParams())}


def measure(inputs: MeasureInputs, params: GlomerularDxParams | None = None) -> dict:
    """The measure stage (see the module docstring): returns the report's diagnosis
    (IgAN / MN / LN), scores (p_IgAN, p_MN, p_LN), counts, areas, objects (the glomeruli)
    and ``case`` (files used and skipped, per-modality head probabilities, SMIL's kept TEM
    images); ``pred/classes`` marks the glomeruli classified and not used."""
    from ..case import read_case, resize_square, stack_tem

    params = params or GlomerularDxParams()
    if inputs.classifier is None:
        raise ValueError("the glomerular-dx task needs its CMUS-Net classifier")
    model = inputs.classifier
    px = int(model.image_px)
    case = read_case(inputs.slide.path, max_tem=int(model.max_tem))
    found_params = GlomerulusParams()
    store = inputs.store
    prob = store.root["pred/prob"]
    glomeruli, rejected = find_glomeruli(prob, found_params)
    by_size = sorted(range(len(glomeruli)), key=lambda i: -glomeruli[i]["area_um2"])
    used = sorted(by_size[:params.max_glomeruli])
    centres = np.array([glomeruli[i]["centroid_um"] for i in used], float).reshape(-1, 2)
    crops = read_crops(store.root["image/0"], TASK.mpp, centres, found_params)
    om = np.stack([resize_square(c, px) for c in crops]) if len(crops) else None
    bag, mask = stack_tem(case.tem, px, int(model.max_tem))
    pred = predict_case(model, om, resize_square(case.im, px), bag, mask, inputs.device,
                        inputs.batch_size)
    names = tuple(model.class_names)
    result = diagnose(pred, names, len(used), params)

    labels = store.root["pred/labels"]
    classes = new_label_map(store, "pred/classes", labels, LEGEND)
    per_crop = dict(zip(used, pred["per_crop"], strict=True))
    objects = []
    for i, g in enumerate(glomeruli):
        is_used = i in per_crop
        y0, x0, y1, x1 = g["bbox_px"]
        block = np.asarray(classes[y0:y1, x0:x1])
        block[g["mask"]] = USED if is_used else UNUSED
        classes[y0:y1, x0:x1] = block
        measurements = {"area_um2": g["area_um2"], "diameter_um": g["diameter_um"],
                        "used": int(is_used)}
        if is_used:
            measurements |= _probs(per_crop[i], names)
        objects.append({"name": "Glomerulus" if is_used else "Glomerulus (not used)",
                        "kind": "glomerulus", "color": COLORS[USED if is_used else UNUSED],
                        "polygon_um": g["polygon_um"], "centroid_um": g["centroid_um"],
                        "measurements": measurements})
    kept = [{"file": case.relative(case.tem_paths[int(s)]), "weight": round(float(w), 5),
             "medoid": int(s) == pred["medoid"]}
            for s, w in zip(pred["kept"], pred["weights"], strict=True)]
    notes = list(case.notes)
    if notes:
        result["diagnosis"]["note"] += "; " + "; ".join(notes)
    return result | {
        "counts": {"glomeruli": len(glomeruli), "glomeruli_classified": len(used),
                   "rejected_components": rejected, "tem_images": len(case.tem),
                   "tem_kept": len(kept), "tem_skipped": len(case.tem_skipped)},
        "areas_mm2": {**inputs.areas_mm2,
                      "glomeruli": round(sum(g["area_um2"] for g in glomeruli) / 1e6, 5)},
        "objects": objects,
        "case": {**case.describe(),
                 "heads": {name: _probs(pred[name], names) for name in HEADS},
                 "tem_kept": kept, "image_px": px,
                 "glomeruli_classified": [int(i) for i in used]},
    }


def read_inputs(path: str | Path) -> dict[str, Any]:
    """Reads the case before the slide work (a missing modality fails here) and returns
    the fingerprint of its IM and TEM files (part of the measure stage's inputs)."""
    from ..case import read_case

    return read_case(path).fingerprint


def write_demo(folder: Path) -> Path:
    """The demo case folder (om/, im/, tem/): an LN case, a seed outside the demo weights'
    cohort."""
    from ..synth.cases import write_case

    write_case(folder / "glomerular_dx_demo", label="LN", seed=1, om_size_px=(6000, 4000),
               mpp=0.5)
    return folder / "glomerular_dx_demo"


PLUGIN = Task(
    spec=TASK, legend=LEGEND, stitch=stitch, measure=measure, params=GlomerularDxParams,
    measure_params=measure_params, overlay_classes=OVERLAY_CLASSES, colors=COLORS,
    read_inputs=read_inputs, demo=write_demo, synth=synth_slides("glomerular-dx"),
    synth_labels=("IgAN", "MN", "LN"), trainer="cases")
