"""`kidney-layer` — cortex/medulla segmentation, cross-species training (docs/models.md §1).

PAS. One softmax head over the seven-class joint label space of human and mouse kidney
[code]; human and mouse patches are mixed in training (``wsi-train --task kidney-layer
--synth N --synth-mouse M``), and on a (human) slide only the background and the two human
channels are read: the mouse classes exist to share features. 1024 px patches [code] at
2.0 um/px [choice: MPP unpublished; a 2 mm field shows the cortico-medullary layering],
one pyramid level. Probabilities are kept at 4 um/px.

Report: cortex and medulla areas (mm2), cortex fraction = cortex / (cortex + medulla),
diagnosis "adequate" when cortex is present (at least ``min_cortex_mm2``), else
"inadequate"; each connected cortex or medulla region is an object with its outline.
"""

from dataclasses import asdict, dataclass

from ..export import region_objects
from ..labelmaps import argmax_labels, count_regions, new_label_map
from ..store import SlideStore
from .hooks import demo_slide, synth_slides
from .spec import MeasureInputs, ModelSpec, Task, TaskSpec

CLASSES = ("background", "mouse_inner_medulla", "mouse_inner_stripe", "mouse_outer_stripe",
           "mouse_cortex", "cortex", "medulla")
HUMAN_CLASSES = (5, 6)          # up-weighted (x1.5) by the joint loss
HUMAN_CHANNELS = (0, 5, 6)      # read on a human slide: background, cortex, medulla

MODEL = ModelSpec(
    arch="unet", classes=CLASSES,
    annotations={
        "background": (),       # everything not annotated as a layer
        "mouse_inner_medulla": ("mouse_inner_medulla", "mouse inner medulla"),
        "mouse_inner_stripe": ("mouse_inner_stripe", "mouse inner stripe"),
        "mouse_outer_stripe": ("mouse_outer_stripe", "mouse outer stripe"),
        "mouse_cortex": ("mouse_cortex", "mouse cortex"),
        "cortex": ("cortex", "human cortex", "renal cortex", "glomerulus",
                   "glomerulus_hypercellular"),
        "medulla": ("medulla", "human medulla", "renal medulla"),
    },
    out_downsample=2, overlap_px=128, demo_weights="kidney_layer_demo",
    loss="joint", class_weights=(1.0, 1.0, 1.0, 1.0, 1.0, 1.5, 1.5),
    score_classes=HUMAN_CLASSES)

TASK = TaskSpec(name="kidney-layer", title="Kidney cortex / medulla layers",
                mpp=2.0, tile_px=1024, stain="pas", context=(1,), model=MODEL)

# Label map at TASK.pred_mpp (4 um/px)
LEGEND = {0: "background", 1: "cortex", 2: "medulla"}
CORTEX, MEDULLA = 1, 2
OVERLAY_CLASSES = (CORTEX, MEDULLA)
COLORS = {CORTEX: (230, 159, 0), MEDULLA: (86, 180, 233)}


@dataclass(frozen=True)
class LayerParams:
    """min_cortex_mm2     cortex below this area does not make a biopsy adequate (a
                          glomerulus alone is ~0.03 mm2)
    min_region_um2     cortex/medulla regions smaller than this are not listed as objects
                       (their pixels still count in the areas)
    """

    min_cortex_mm2: float = 0.05
    min_region_um2: float = 20_000.0


Params = LayerParams


def stitch(store: SlideStore, params: LayerParams) -> dict:
    """The stitch stage: ``pred/labels`` ((H, W) uint8, `LEGEND`): the most probable of
    background / human cortex / human medulla inside the tissue; the area of each layer in
    mm2."""
    mpp, counts = argmax_labels(store, HUMAN_CHANNELS, LEGEND)
    px_mm2 = mpp * mpp / 1e6
    return {"mpp": mpp, "areas_mm2": {
        "cortex": round(float(counts[CORTEX] * px_mm2), 5),
        "medulla": round(float(counts[MEDULLA] * px_mm2), 5),
        "tissue_layers": round(float((counts[CORTEX] + counts[MEDULLA]) * px_mm2), 5)}}


def score(cortex_mm2: float, medulla_mm2: float, params: LayerParams) -> dict:
    """Cortex fraction and adequacy (cortex present) from the two areas."""
    total = cortex_mm2 + medulla_mm2
    if total <= 0:
        return {"diagnosis": {"label": "inadequate", "adequate": False,
                              "note": "no cortex or medulla found"},
                "scores": {"cortex_fraction": None}}
    adequate = cortex_mm2 >= params.min_cortex_mm2
    fraction = cortex_mm2 / total
    note = (f"cortex {cortex_mm2:.3f} mm2, medulla {medulla_mm2:.3f} mm2, cortex fraction "
            f"{fraction:.2f}")
    if not adequate:
        note += f"; cortex below {params.min_cortex_mm2:g} mm2: no cortex to assess"
    return {"diagnosis": {"label": "adequate" if adequate else "inadequate",
                          "adequate": bool(adequate), "note": note},
            "scores": {"cortex_fraction": round(fraction, 5)}}


def measure_params() -> dict:
    """Everything `measure` depends on besides its inputs (recorded in the manifest)."""
    return {"rules": asdict(LayerParams())}


def measure(inputs: MeasureInputs, params: LayerParams | None = None) -> dict:
    """The measure stage: ``pred/classes`` (= the layer labels), one object per connected
    cortex or medulla region of at least ``params.min_region_um2`` (outline, area), and the
    report's diagnosis, scores, counts and areas."""
    params = params or LayerParams()
    store, areas = inputs.store, inputs.areas_mm2
    labels = store.root["pred/labels"]
    new_label_map(store, "pred/classes", labels, LEGEND, copy=True)

    objects = region_objects(labels, {CORTEX: ("Cortex", COLORS[CORTEX]),
                                      MEDULLA: ("Medulla", COLORS[MEDULLA])},
                             params.min_region_um2)
    result = score(areas["cortex"], areas["medulla"], params)
    return result | {
        # every region counts; only those of at least min_region_um2 are listed as objects
        "counts": {"cortex_regions": count_regions(labels, CORTEX),
                   "medulla_regions": count_regions(labels, MEDULLA),
                   "regions_listed": len(objects)},
        "areas_mm2": dict(areas),
        "objects": objects,
    }


SYNTH = synth_slides("kidney-layer")
PLUGIN = Task(
    spec=TASK, legend=LEGEND, stitch=stitch, measure=measure, params=LayerParams,
    main_score="cortex_fraction",
    measure_params=measure_params, overlay_classes=OVERLAY_CLASSES,
    region_classes=(CORTEX, MEDULLA), colors=COLORS,
    demo=demo_slide(SYNTH, "kidney_layer_demo", mpp=0.5, label="adequate", seed=1,
                    width=16000, height=8000),
    synth=SYNTH, synth_labels=("adequate", "inadequate"))
