"""`mesangial` — IgA nephropathy mesangial hypercellularity M0/M1 (SimCLR, docs/models.md §5).

PAS, pyramid at 0.5, 1 and 2 um/px. The infer stage runs the shared glomerulus detector
(`tasks.glomeruli`) on the 1 um/px level; the measure stage cuts a 512 x 512 crop at
0.5 um/px around each glomerulus and the task's classifier (an encoder pretrained with
SimCLR on unlabelled glomerulus crops, fine-tuned on M0/M1 labels: ``wsi-train --task
mesangial --stage pretrain|finetune``) gives each one a probability of being
hypercellular.

Oxford MEST-C [standard]: a glomerulus is hypercellular when a mesangial area holds > 3
mesangial cells; the biopsy is M1 when more than half of its glomeruli are hypercellular,
else M0; it is adequate with >= 8 glomeruli. No glomerulus: "not-assessable".
"""

from dataclasses import asdict, dataclass

import numpy as np

from ..labelmaps import new_label_map
from ..store import SlideStore
from .glomeruli import (
    GlomerulusParams,
    detector_at,
    find_glomeruli,
    read_crops,
    stitch_candidates,
    synth_kidney,
)
from .hooks import demo_slide
from .spec import MeasureInputs, ModelSpec, Task, TaskSpec

CLASSIFIER = ModelSpec(arch="glomerulus_classifier", classes=("hypercellular",),
                       annotations={"hypercellular": ("glomerulus_hypercellular", "M1")},
                       demo_weights="mesangial_demo")

TASK = TaskSpec(name="mesangial", title="IgAN mesangial hypercellularity (Oxford M)",
                mpp=0.5, tile_px=512, stain="pas", context=(1, 2, 4),
                model=detector_at(1), classifier=CLASSIFIER)

# The classifier sees each 512 px crop resized to this size (1 um/px: mesangial nuclei
# stay ~6 px across, and a CPU classifies four times faster than at 0.5 um/px).
INPUT_PX = 256

# Label map at TASK.pred_mpp (2 um/px)
LEGEND = {0: "background", 1: "glomerulus candidate", 2: "glomerulus (normocellular)",
          3: "glomerulus (hypercellular)"}
CANDIDATE, NORMAL, HYPER = 1, 2, 3
OVERLAY_CLASSES = (NORMAL, HYPER)
COLORS = {NORMAL: (0, 158, 115), HYPER: (213, 94, 0)}


@dataclass(frozen=True)
class MesangialParams:
    """hypercellular_p    classifier probability from which a glomerulus is hypercellular
    m1_fraction        the biopsy is M1 when MORE than this fraction is hypercellular
    adequate_glomeruli an adequate biopsy has at least this many glomeruli
    """

    hypercellular_p: float = 0.5
    m1_fraction: float = 0.5
    adequate_glomeruli: int = 8


Params = MesangialParams


def stitch(store: SlideStore, params: MesangialParams) -> dict:
    """The stitch stage: glomerulus candidates inside tissue as `LEGEND`'s ``CANDIDATE``
    (`glomeruli.stitch_candidates`)."""
    return stitch_candidates(store, LEGEND)


def score(p_hyper: np.ndarray, params: MesangialParams) -> dict:
    """M score, hypercellular fraction and adequacy from per-glomerulus probabilities."""
    n = len(p_hyper)
    if n == 0:
        return {"diagnosis": {"label": "not-assessable", "adequate": False,
                              "note": "no glomeruli found: M score not assessable"},
                "scores": {"hypercellular_fraction": None}}
    n_hyper = int((p_hyper >= params.hypercellular_p).sum())
    fraction = n_hyper / n
    label = "M1" if fraction > params.m1_fraction else "M0"
    adequate = n >= params.adequate_glomeruli
    note = (f"{n_hyper} of {n} glomeruli hypercellular ({fraction:.0%}): {label}")
    if not adequate:
        note += f"; fewer than {params.adequate_glomeruli} glomeruli: biopsy not adequate"
    return {"diagnosis": {"label": label, "adequate": bool(adequate), "note": note},
            "scores": {"hypercellular_fraction": round(fraction, 5),
                       "mean_p_hypercellular": round(float(np.mean(p_hyper)), 5)}}


def classify(classifier, crops: np.ndarray, device: str = "cpu", batch_size: int = 8
             ) -> np.ndarray:
    """(N,) float probability of hypercellularity of (N, 512, 512, 3) uint8 crops."""
    import torch

    from ..models.simclr import classifier_input

    if len(crops) == 0:
        return np.zeros(0, np.float32)
    classifier = classifier.eval().to(device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(crops), batch_size):
            x = np.stack([classifier_input(c, INPUT_PX) for c in crops[i:i + batch_size]])
            x = torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float().div_(255)
            out.append(torch.sigmoid(classifier(x).float()).reshape(-1).cpu().numpy())
    return np.concatenate(out)


def measure_params() -> dict:
    """Everything `measure` depends on besides its inputs (recorded in the manifest)."""
    return {"rules": asdict(MesangialParams()), "glomeruli": asdict(GlomerulusParams())}


def measure(inputs: MeasureInputs, params: MesangialParams | None = None) -> dict:
    """The measure stage: glomeruli from the detector's map, each classified on its
    0.5 um/px crop; ``pred/classes`` marks them normocellular or hypercellular; returns
    the report's diagnosis (M0/M1), scores, counts, areas and objects."""
    params = params or MesangialParams()
    found_params = GlomerulusParams()
    store = inputs.store
    prob = store.root["pred/prob"]
    labels = store.root["pred/labels"]
    glomeruli, rejected = find_glomeruli(prob, found_params)
    centres = np.array([g["centroid_um"] for g in glomeruli], float).reshape(-1, 2)
    crops = read_crops(store.root["image/0"], TASK.mpp, centres, found_params)
    if inputs.classifier is None:
        raise ValueError("the mesangial task needs its glomerulus classifier")
    p_hyper = classify(inputs.classifier, crops, inputs.device, inputs.batch_size)

    classes = new_label_map(store, "pred/classes", labels, LEGEND)
    objects = []
    for g, p in zip(glomeruli, p_hyper, strict=True):
        hyper = bool(p >= params.hypercellular_p)
        y0, x0, y1, x1 = g["bbox_px"]
        crop = np.asarray(classes[y0:y1, x0:x1])
        crop[g["mask"]] = HYPER if hyper else NORMAL
        classes[y0:y1, x0:x1] = crop
        objects.append({
            "name": "Glomerulus (hypercellular)" if hyper else "Glomerulus (normocellular)",
            "kind": "glomerulus", "color": COLORS[HYPER if hyper else NORMAL],
            "polygon_um": g["polygon_um"], "centroid_um": g["centroid_um"],
            "measurements": {"area_um2": g["area_um2"], "diameter_um": g["diameter_um"],
                             "p_hypercellular": round(float(p), 4),
                             "hypercellular": int(hyper)}})
    result = score(p_hyper, params)
    return result | {
        "counts": {"glomeruli": len(objects),
                   "hypercellular_glomeruli": int(sum(o["measurements"]["hypercellular"]
                                                      for o in objects)),
                   "rejected_components": rejected},
        "areas_mm2": {**inputs.areas_mm2,
                      "glomeruli": round(sum(g["area_um2"] for g in glomeruli) / 1e6, 5)},
        "objects": objects,
    }


PLUGIN = Task(
    spec=TASK, legend=LEGEND, stitch=stitch, measure=measure, params=MesangialParams,
    main_score="hypercellular_fraction",
    measure_params=measure_params, overlay_classes=OVERLAY_CLASSES, colors=COLORS,
    demo=demo_slide(synth_kidney, "mesangial_demo", mpp=0.5, label="M1", seed=1,
                    width=16000, height=8000),
    synth=synth_kidney, synth_labels=("M0", "M1"), trainer="crops")
