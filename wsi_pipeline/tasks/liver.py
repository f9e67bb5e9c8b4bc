"""`liver` — HCC vs intrahepatic cholangiocarcinoma with weak complementary labels
(docs/models.md §3).

H&E. A four-class softmax U-Net (background, non-tumour liver, HCC, CCA) on 512 px patches
at 1.0 um/px [choice: the trabeculae of HCC and the glands of CCA are tens of um across],
one pyramid level; probabilities kept at 2 um/px. Training (``wsi-train --task liver``)
mixes a few pixel-annotated slides (supervised focal CE) with many slides that carry only
their patient's diagnosis: each of their patches gets the complementary label "not the
other tumour" and the complementary loss L_compl [code].

Rule [choice]: r = A_HCC / (A_HCC + A_CCA); HCC when r > ``hcc_threshold`` (0.5), CCA
otherwise; a slide with less than ``min_tumour_mm2`` of tumour says "no-tumour". The
patient's diagnosis applies the same rule to the areas summed over all of the patient's
slides (`case_rule`; ``wsi-run`` writes ``OUT/cases.csv``).
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..export import region_objects
from ..labelmaps import argmax_labels, count_regions, new_label_map
from ..store import SlideStore
from .hooks import demo_slide, synth_slides
from .spec import MeasureInputs, ModelSpec, PatientRule, Task, TaskSpec

CLASSES = ("background", "liver", "hcc", "cca")
# the class a weakly labelled slide's patches cannot be, by the patient's diagnosis
COMPLEMENTARY = {"HCC": "cca", "CCA": "hcc"}

MODEL = ModelSpec(
    arch="unet", classes=CLASSES,
    annotations={
        "background": (),
        "liver": ("liver", "non_tumour", "non-tumour", "non-tumour liver", "non-tumor liver",
                  "normal liver", "background liver"),
        "hcc": ("hcc", "hepatocellular carcinoma"),
        "cca": ("cca", "icc", "cholangiocarcinoma", "intrahepatic cholangiocarcinoma"),
    },
    out_downsample=2, overlap_px=128, demo_weights="liver_demo", loss="focal",
    score_classes=(2, 3), complementary=COMPLEMENTARY)

TASK = TaskSpec(name="liver", title="Liver tumour: HCC vs cholangiocarcinoma",
                mpp=1.0, tile_px=512, stain="he", context=(1,), model=MODEL)

# Label map at TASK.pred_mpp (2 um/px)
LEGEND = {0: "background", 1: "non-tumour liver", 2: "HCC", 3: "CCA"}
LIVER, HCC, CCA = 1, 2, 3
OVERLAY_CLASSES = (HCC, CCA)
COLORS = {HCC: (213, 94, 0), CCA: (0, 114, 178)}


@dataclass(frozen=True)
class LiverParams:
    """hcc_threshold   HCC when r = A_HCC / (A_HCC + A_CCA) is above this, else CCA
    min_tumour_mm2  less tumour than this (HCC + CCA) on a slide or patient: "no-tumour"
    min_region_um2  tumour regions smaller than this are not listed as objects (their
                    pixels still count in the areas)
    """

    hcc_threshold: float = 0.5
    min_tumour_mm2: float = 0.05
    min_region_um2: float = 20_000.0


Params = LiverParams


def stitch(store: SlideStore, params: LiverParams) -> dict:
    """The stitch stage: ``pred/labels`` ((H, W) uint8, `LEGEND`), the most probable class
    inside the tissue; the area of each class in mm2."""
    mpp, counts = argmax_labels(store, (0, 1, 2, 3), LEGEND)
    px_mm2 = mpp * mpp / 1e6
    return {"mpp": mpp, "areas_mm2": {
        "liver": round(float(counts[LIVER] * px_mm2), 5),
        "hcc": round(float(counts[HCC] * px_mm2), 5),
        "cca": round(float(counts[CCA] * px_mm2), 5)}}


def score(hcc_mm2: float, cca_mm2: float, params: LiverParams) -> dict:
    """r = A_HCC / (A_HCC + A_CCA) and the diagnosis (HCC, CCA or no-tumour) from the
    two tumour areas (mm2) of a slide or of all of a patient's slides."""
    tumour = hcc_mm2 + cca_mm2
    if tumour < params.min_tumour_mm2:
        return {"diagnosis": {"label": "no-tumour", "adequate": True,
                              "note": f"tumour {tumour:.3f} mm2, below "
                                      f"{params.min_tumour_mm2:g} mm2: no tumour found"},
                "scores": {"hcc_fraction": None}}
    r = hcc_mm2 / tumour
    label = "HCC" if r > params.hcc_threshold else "CCA"
    return {"diagnosis": {"label": label, "adequate": True,
                          "note": f"HCC {hcc_mm2:.3f} mm2, CCA {cca_mm2:.3f} mm2, r = "
                                  f"{r:.3f} ({'>' if label == 'HCC' else '<='} "
                                  f"{params.hcc_threshold:g})"},
            "scores": {"hcc_fraction": round(r, 5)}}


def measure_params() -> dict:
    """Everything `measure` depends on besides its inputs (recorded in the manifest)."""
    return {"rules": asdict(LiverParams())}


def measure(inputs: MeasureInputs, params: LiverParams | None = None) -> dict:
    """The measure stage: ``pred/classes`` (= the class labels), one object per connected
    HCC or CCA region of at least ``params.min_region_um2``, and the slide's r and
    diagnosis."""
    params = params or LiverParams()
    store, areas = inputs.store, inputs.areas_mm2
    labels = store.root["pred/labels"]
    new_label_map(store, "pred/classes", labels, LEGEND, copy=True)
    objects = region_objects(labels, {HCC: ("HCC", COLORS[HCC]), CCA: ("CCA", COLORS[CCA])},
                             params.min_region_um2)
    return score(areas["hcc"], areas["cca"], params) | {
        # every region counts; only those of at least min_region_um2 are listed as objects
        "counts": {"hcc_regions": count_regions(labels, HCC),
                   "cca_regions": count_regions(labels, CCA),
                   "regions_listed": len(objects)},
        "areas_mm2": dict(areas),
        "objects": objects,
    }


def case_rule(reports: Sequence[dict], params: LiverParams | None = None) -> dict:
    """A patient's diagnosis from the ``report.json`` of each of its slides: the areas summed
    over the slides, then `score`. Returns {slides, hcc_mm2, cca_mm2, hcc_fraction,
    diagnosis}."""
    params = params or LiverParams()
    hcc = sum(float(r["areas_mm2"]["hcc"]) for r in reports)
    cca = sum(float(r["areas_mm2"]["cca"]) for r in reports)
    result = score(hcc, cca, params)
    return {"slides": len(reports), "hcc_mm2": round(hcc, 5), "cca_mm2": round(cca, 5),
            "hcc_fraction": result["scores"]["hcc_fraction"],
            "diagnosis": result["diagnosis"]["label"]}


SYNTH = synth_slides("liver")
PLUGIN = Task(
    spec=TASK, legend=LEGEND, stitch=stitch, measure=measure, params=LiverParams,
    main_score="hcc_fraction",
    measure_params=measure_params, overlay_classes=OVERLAY_CLASSES,
    region_classes=(LIVER, HCC, CCA), colors=COLORS,
    patient_rule=PatientRule(columns=("hcc_fraction", "hcc_mm2", "cca_mm2"), rule=case_rule),
    demo=demo_slide(SYNTH, "liver_demo", mpp=0.5, label="HCC", seed=1, width=8000,
                    height=6000),
    synth=SYNTH, synth_labels=("HCC", "CCA"))
