"""`fls` — focal lymphocytic sialadenitis in minor salivary gland (M2CF-Net, docs/models.md §4).

H&E. M2CF-Net reads concentric 512 px patches at downsample 1, 2 and 4 around one centre
(HookNet's target resolution is 0.5 um/px), so the pyramid keeps 0.5, 1 and 2 um/px.
Focus score FS = 4 * foci / glandular area (mm2); FS >= 1 is histology-positive.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from skimage import draw, morphology

from ..export import polygons_from_mask
from ..labelmaps import (
    connected_components,
    iter_bands,
    new_label_map,
    thumbnail_tissue,
    tissue_band,
)
from ..nuclei import (
    AggregateParams,
    LymphocyteParams,
    detect_lymphocytes_in_region,
    find_aggregates,
)
from ..slide import Slide
from ..stain import StainFit
from ..store import SlideStore
from .hooks import demo_slide, synth_slides
from .spec import AltModel, MeasureInputs, ModelSpec, Task, TaskSpec

# The network segments every dense lymphocytic aggregate; the >= 50 lymphocyte rule that
# makes an aggregate a *focus* is applied afterwards by counting nuclei.
MODEL = ModelSpec(arch="m2cf_net", classes=("focus",),
                  annotations={"focus": ("focus", "aggregate", "lymphocytic focus",
                                         "lymphocytic aggregate")},
                  out_downsample=4, overlap_px=128, demo_weights="fls_demo")

TASK = TaskSpec(name="fls", title="Focal lymphocytic sialadenitis (focus score)",
                mpp=0.5, tile_px=512, stain="he", context=(1, 2, 4), model=MODEL)

# -- post-processing --------------------------------------------------------------------------
# Label map at TASK.pred_mpp (2 um/px), written by the stitch stage and refined by measure.
LEGEND = {0: "background", 1: "glandular tissue", 2: "fat", 3: "focus", 4: "aggregate"}
FOCUS, AGGREGATE = 3, 4
CELLS = "pred/cells"                   # the lymphocytes measure saw, exported as detections
LYMPHOCYTE_COLOR = (0, 90, 255)
OVERLAY_CLASSES = (FOCUS, AGGREGATE)   # drawn over the thumbnail; tissue is outlined


@dataclass(frozen=True)
class FlsParams:
    """Rules of the focus score (2016 ACR/EULAR; Fisher et al. 2017) and the physical
    thresholds used to apply them.

    focus_threshold       foci probability above which a pixel is a focus candidate
    min_lymphocytes       a focus is a dense aggregate of at least this many lymphocytes
    min_candidate_um2     candidates smaller than this are noise, not aggregates
    adequate_mm2          minimum glandular surface for an adequate biopsy
    fs_positive           focus score from which the biopsy is histology-positive
    fat_od                pixels whose summed optical density is below this are unstained
    min_fat_um2           unstained regions at least this large are fat (adipocytes), not
                          acinar or ductal lumina
    """

    focus_threshold: float = 0.5
    min_lymphocytes: int = 50
    min_candidate_um2: float = 400.0
    adequate_mm2: float = 8.0
    fs_positive: float = 1.0
    fat_od: float = 0.25
    min_fat_um2: float = 600.0


Params = FlsParams


def label_band(rgb: np.ndarray, tissue: np.ndarray, focus_prob: np.ndarray, mpp: float,
               params: FlsParams) -> np.ndarray:
    """Label one band of the slide at ``mpp`` um/px: (h, w) uint8 in `LEGEND`'s classes.

    rgb         (h, w, 3) normalised image at ``mpp``
    tissue      (h, w) bool tissue mask (from the tissue stage)
    focus_prob  (h, w) float foci probability in [0, 1]
    """
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0).sum(-1)
    unstained = morphology.closing(od < params.fat_od, morphology.disk(1)) & tissue
    fat = morphology.remove_small_objects(unstained, max_size=int(params.min_fat_um2 / mpp**2))
    labels = np.where(tissue, 1, 0).astype(np.uint8)
    labels[fat] = 2
    labels[tissue & (focus_prob >= params.focus_threshold)] = FOCUS
    return labels


def score(n_foci: int, glandular_mm2: float, focus_area_mm2: float,
          params: FlsParams) -> dict:
    """Focus score, diagnosis and adequacy: FS = 4 * N_foci / A_gland (mm2)."""
    if glandular_mm2 <= 0:
        return {"diagnosis": {"label": None, "adequate": False,
                              "note": "no glandular tissue: focus score not assessable"},
                "scores": {"focus_score": None, "focus_area_fraction": None}}
    fs = 4.0 * n_foci / glandular_mm2
    adequate = glandular_mm2 >= params.adequate_mm2
    note = (f"focus score {fs:.2f} per 4 mm2 "
            f"({'>=' if fs >= params.fs_positive else '<'} {params.fs_positive:g})")
    if not adequate:
        note += f"; glandular area {glandular_mm2:.2f} mm2 < {params.adequate_mm2:g} mm2"
    return {"diagnosis": {"label": "positive" if fs >= params.fs_positive else "negative",
                          "adequate": bool(adequate), "note": note},
            "scores": {"focus_score": round(fs, 4),
                       "focus_area_fraction": round(focus_area_mm2 / glandular_mm2, 5)}}


def stitch(store: SlideStore, params: FlsParams) -> dict:
    """The stitch stage: ``pred/labels`` ((H, W) uint8, `LEGEND`) at the probability map's
    resolution, band by band from ``pred/prob``, the tissue mask and the normalised image
    level of the same resolution; returns the area of each class in mm2."""
    prob = store.root["pred/prob"]
    mpp = float(prob.attrs["mpp"])
    image = store.root[f"image/{TASK.context.index(MODEL.out_downsample)}"]
    tissue_lowres, tissue_mpp = thumbnail_tissue(store)
    _, height, width = prob.shape
    labels = new_label_map(store, "pred/labels", prob, LEGEND)
    counts = np.zeros(len(LEGEND), np.int64)
    for y0, band in iter_bands(prob):
        h = band.shape[1]
        rgb = np.full((h, width, 3), 255, np.uint8)
        part = np.asarray(image[:, y0:y0 + h, :width])
        rgb[:part.shape[1], :part.shape[2]] = np.moveaxis(part, 0, -1)
        tissue = tissue_band(tissue_lowres, tissue_mpp, y0, (h, width), mpp)
        band_labels = label_band(rgb, tissue, band[0] / 255.0, mpp, params)
        labels[y0:y0 + h, :] = band_labels
        counts += np.bincount(band_labels.ravel(), minlength=len(LEGEND))[:len(LEGEND)]
    px_mm2 = mpp * mpp / 1e6
    return {"mpp": mpp, "areas_mm2": {
        "tissue": round(float(counts[1:].sum() * px_mm2), 5),
        "glandular": round(float((counts[1] + counts[FOCUS] + counts[AGGREGATE]) * px_mm2), 5),
        "fat": round(float(counts[2] * px_mm2), 5),
        "focus_candidates": round(float(counts[FOCUS] * px_mm2), 5)}}


def detect_on_tissue(slide: Slide, store: SlideStore, stain: StainFit,
                     lymphocytes: LymphocyteParams, *, workers: int = 2,
                     progress=None) -> np.ndarray:
    """Lymphocyte centres ((N, 2) float64 x, y um) on every tissue tile of the slide, with
    its own stain matrix; each nucleus once (tiles abut, the detector reads margins).
    ~16 ms per 512 x 512 tissue tile on one core (benchmarks/bench_nuclei.py)."""
    tiles = store.read_array("tiles")
    tile_um = TASK.tile_um

    def detect(rc: tuple[int, int]) -> np.ndarray:
        found = detect_lymphocytes_in_region(slide, rc[1] * tile_um, rc[0] * tile_um,
                                             tile_um, tile_um, TASK.mpp, stain, lymphocytes)
        if progress:
            progress(1)
        return found

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = list(pool.map(detect, [tuple(t) for t in tiles.tolist()]))
    return np.concatenate(found) if found else np.zeros((0, 2))


def classical_infer(slide: Slide, store: SlideStore, stain: StainFit, params: FlsParams,
                    lymphocytes: LymphocyteParams, aggregates: AggregateParams, *,
                    workers: int = 2, progress=None) -> dict:
    """The weight-free infer stage: detect lymphocytes on every tissue tile (the slide's
    own stain matrix), group them into dense aggregates and paint those into
    ``pred/prob`` (probability 1 inside an aggregate), so the rest of the pipeline is the
    same as with a network. Lymphocyte centres go to ``pred/lymphocytes`` ((N, 2) um)."""
    points = detect_on_tissue(slide, store, stain, lymphocytes, workers=workers,
                              progress=progress)
    store.write_array("pred/lymphocytes", points.astype(np.float32),
                      {"units": "um", "columns": ["x_um", "y_um"]})

    mpp = TASK.pred_mpp
    level0 = store.root["image/0"]
    shape = (1, -(-level0.shape[1] // MODEL.out_downsample),
             -(-level0.shape[2] // MODEL.out_downsample))
    prob = store.root.create_array("pred/prob", shape=shape, dtype="uint8",
                                   chunks=(1, 512, 512), fill_value=0, overwrite=True)
    prob.attrs.update({"mpp": mpp, "classes": list(MODEL.classes),
                       "description": "classical: 255 inside dense lymphocyte aggregates"})
    found_aggregates = find_aggregates(points, aggregates, mpp=mpp)
    for agg in found_aggregates:
        ring = np.asarray(agg["polygon_um"]) / mpp
        x0, y0 = np.floor(ring.min(0)).astype(int)
        x1, y1 = np.ceil(ring.max(0)).astype(int) + 1
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, shape[2]), min(y1, shape[1])
        if x1 <= x0 or y1 <= y0:
            continue
        rr, cc = draw.polygon(ring[:, 1] - y0 - 0.5, ring[:, 0] - x0 - 0.5, (y1 - y0, x1 - x0))
        crop = np.asarray(prob[0, y0:y1, x0:x1])
        crop[rr, cc] = 255
        prob[0, y0:y1, x0:x1] = crop
    return {"mode": "classical", "lymphocytes": int(len(points)),
            "aggregates": len(found_aggregates), "tiles": int(store.root["tiles"].shape[0])}


def measure_params() -> dict:
    """Everything `measure` depends on besides its inputs (recorded in the manifest)."""
    return {"rules": asdict(FlsParams()), "lymphocytes": asdict(LymphocyteParams())}


def measure(inputs: MeasureInputs, params: FlsParams | None = None,
            lymphocytes: LymphocyteParams | None = None) -> dict:
    """The measure stage: each connected focus candidate gets its area, outline and a
    lymphocyte count (detected on the slide, or taken from the classical mode's
    detections); it is a focus when it holds >= ``params.min_lymphocytes``, else an
    aggregate. Writes ``pred/classes`` (the label map with that decision) and
    ``pred/cells`` ((N, 2) float32 x, y um, exported as QuPath detections): the
    lymphocytes detected, on all tissue in the classical mode, inside the focus candidates
    with a network (running the detector on every tissue tile would cost ~16 ms a tile on
    a gigapixel slide for cells no rule reads). Returns the report's diagnosis, scores,
    counts (``lymphocytes_detected``: the length of ``pred/cells``), areas and objects."""
    slide, store, stain, areas_mm2 = inputs.slide, inputs.store, inputs.stain, inputs.areas_mm2
    params = params or FlsParams()
    lymphocytes = lymphocytes or LymphocyteParams()
    labels = store.root["pred/labels"]
    mpp = float(labels.attrs["mpp"])
    classes = new_label_map(store, "pred/classes", labels, LEGEND, copy=True)
    known = (np.asarray(store.root["pred/lymphocytes"]) if "pred/lymphocytes" in store.root
             else None)
    cells = [known] if known is not None else []

    objects = []
    for (y0, x0, y1, x1), mask in connected_components(labels, lambda b: b == FOCUS):
        area_um2 = float(mask.sum()) * mpp * mpp
        crop = np.asarray(classes[y0:y1, x0:x1])
        if area_um2 < params.min_candidate_um2:
            crop[mask] = 1
            classes[y0:y1, x0:x1] = crop
            continue
        ox, oy = x0 * mpp, y0 * mpp
        if known is None:
            points = detect_lymphocytes_in_region(slide, ox, oy, (x1 - x0) * mpp,
                                                  (y1 - y0) * mpp, TASK.mpp, stain, lymphocytes)
            inside = _points_in_mask(points, mask, ox, oy, mpp)
            cells.append(points[inside])   # candidates are disjoint: each cell once
        else:
            inside = _points_in_mask(known, mask, ox, oy, mpp)
        count = int(inside.sum())
        is_focus = count >= params.min_lymphocytes
        crop[mask] = FOCUS if is_focus else AGGREGATE
        classes[y0:y1, x0:x1] = crop
        outline = max(polygons_from_mask(mask, mpp, (ox, oy), simplify_um=mpp),
                      key=lambda p: p["area_um2"])
        ys, xs = np.nonzero(mask)
        objects.append({
            "name": "Focus" if is_focus else "Aggregate (<50 lymphocytes)",
            "kind": "focus" if is_focus else "aggregate",
            "color": (220, 20, 60) if is_focus else (255, 165, 0),
            "polygon_um": np.round(outline["polygon_um"], 2).tolist(),
            "centroid_um": [round(ox + (xs.mean() + 0.5) * mpp, 2),
                            round(oy + (ys.mean() + 0.5) * mpp, 2)],
            "measurements": {"area_um2": round(area_um2, 1), "lymphocyte_count": count,
                             "lymphocyte_density_per_mm2": round(count / area_um2 * 1e6, 1)},
        })

    foci = [o for o in objects if o["kind"] == "focus"]
    points = np.concatenate(cells).reshape(-1, 2) if cells else np.zeros((0, 2))
    store.write_array(CELLS, points.astype(np.float32),
                      {"units": "um", "columns": ["x_um", "y_um"], "name": "Lymphocyte",
                       "color": list(LYMPHOCYTE_COLOR)})
    focus_mm2 = sum(o["measurements"]["area_um2"] for o in foci) / 1e6
    result = score(len(foci), areas_mm2["glandular"], focus_mm2, params)
    return result | {
        "counts": {"foci": len(foci), "lymphocytes_detected": int(len(points)),
                   "lymphocytes_in_foci": sum(o["measurements"]["lymphocyte_count"]
                                              for o in foci),
                   "aggregates_below_threshold": len(objects) - len(foci)},
        "areas_mm2": {**areas_mm2, "foci": round(focus_mm2, 5)},
        "objects": objects,
    }


def _points_in_mask(points_um: np.ndarray, mask: np.ndarray, ox_um: float, oy_um: float,
                    mpp: float) -> np.ndarray:
    """Which of (N, 2) x, y um points fall on a True pixel of ``mask`` (origin ox, oy um)."""
    if len(points_um) == 0:
        return np.zeros(0, bool)
    col = np.floor((points_um[:, 0] - ox_um) / mpp).astype(np.int64)
    row = np.floor((points_um[:, 1] - oy_um) / mpp).astype(np.int64)
    ok = (row >= 0) & (row < mask.shape[0]) & (col >= 0) & (col < mask.shape[1])
    inside = np.zeros(len(points_um), bool)
    inside[ok] = mask[row[ok], col[ok]]
    return inside


# -- the plugin ------------------------------------------------------------------------------
def _classical_params() -> dict:
    return {"mode": "classical", "lymphocytes": asdict(LymphocyteParams()),
            "aggregates": asdict(AggregateParams())}


def _classical(slide: Slide, store: SlideStore, stain: StainFit, *, workers: int = 2,
               progress=None) -> dict:
    return classical_infer(slide, store, stain, FlsParams(), LymphocyteParams(),
                           AggregateParams(), workers=workers, progress=progress)


SYNTH = synth_slides("fls")
PLUGIN = Task(
    spec=TASK, legend=LEGEND, stitch=stitch, measure=measure, params=FlsParams,
    main_score="focus_score",
    measure_params=measure_params, overlay_classes=OVERLAY_CLASSES,
    region_classes=(1, 2),
    modes={"classical": AltModel(
        description="weight-free: dense aggregates of lymphocytes found by a nucleus detector",
        params=_classical_params, infer=_classical)},
    demo=demo_slide(SYNTH, "fls_demo", mpp=0.5, label="positive", seed=1, width=12000,
                    height=9000),
    synth=SYNTH, synth_labels=("positive", "negative"))
