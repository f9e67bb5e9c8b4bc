"""Classical lymphocyte detector: accuracy on synthetic slides and on real H&E, speed.

    python benchmarks/bench_nuclei.py [--quick]     synthetic fls slides, then speed
    python benchmarks/bench_nuclei.py --real        real H&E (MoNuSAC), leave-one-slide-out

Synthetic: for several `wsi-synth` fls slides (seeds and sizes below; --quick: the two small
ones) it fits the slide's own stain matrix as the pipeline does (tissue pixels of 0.5 um/px
tiles), detects lymphocytes over the whole slide, and prints precision and recall against
the truth centres (one-to-one within 3 um), recall inside foci, and the number of
aggregates of >= 50 detected lymphocytes against the true focus count. Then the time per
512 x 512 tissue tile of `detect_lymphocytes` (best of 3 passes over the tiles).

Real (--real): ../shared/data/lymphocytes-monusac, 45 regions of 12 TCGA slides at
~0.25 um/px, every nucleus outlined and classed (lymphocyte, epithelial, macrophage,
neutrophil). The images of that conversion hold BGR, not RGB (OpenCV wrote the MoNuSAC
TIFFs' channels swapped: as stored, nuclei are brown-red and cytoplasm lilac, and nuclear
OD points 12 degrees off any haematoxylin vector; swapped they are H&E, and lymphocyte OD
lies within 2 degrees of Macenko's reference haematoxylin): they are swapped back here.
Each region is read at 0.5 um/px (the fls working resolution; 2 x 2 means), each slide
gets its own stain fit (`fit_vahadane` on its regions' tissue pixels, as the pipeline
fits a slide), and the detector runs per region. Truth: the centroids of the lymphocyte
masks (JPEG masks decoded to the nearest class colour, specks < 2 um2 dropped, touching
lymphocytes, which merge in the mask, split by a distance-transform watershed). A
detection matched one-to-one (Hungarian) to a lymphocyte centroid within 4 um is a TP;
every other detection is a FP, counted as "on another class" when it lies on another
class's mask, "on a lymphocyte" (a second detection of one), or "unlabelled" (MoNuSAC
outlines every nucleus of a region, so these count too; they include nuclei cut by the
region's border and a few nuclei the annotators missed).

Constants: the detector's structural constants (disc radius, LoG radius) are fixed per
parameter set, and so is min_roundness (default 0.1, REAL_HE 0.2: set on
CMU-1-Small-Region, where thin dark keratin lamellae otherwise pass as lymphocytes and form
false foci; on MoNuSAC 0.2 trades ~3-6 % recall for ~2 % precision, and on the synthetic
slides more than 0.1 breaks the ring of a periductal focus). Its thresholds (min_darkness,
min_prominence, radius_um[1], cluster_darkness, cluster_neighbours) are chosen on a grid by
leave-one-slide-out: each slide is scored with the grid point chosen on the other 11, and
the held-out counts are pooled. Two sets: "real" (`REAL_HE`'s structure), chosen for the
target: the best recall at precision >= 0.72 (0.7 plus a margin; the best F1 where none
reaches it); "default" (`LymphocyteParams()`), the best F1 among the grid points that keep
P and R >= 0.82 on the synthetic fls slides 11 and 12, which the tests require (the
target is out of reach there). max_red_green stays 1.0 (a physical bound, see
`LymphocyteParams`). MoNuSAC is CC BY-NC-SA: only these few constants
and the figures come from it.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr

from wsi_pipeline import stain
from wsi_pipeline.nuclei import (
    REAL_HE,
    LymphocyteParams,
    detect_lymphocytes,
    detect_lymphocytes_in_region,
    find_aggregates,
    lymphocyte_candidates,
    match_points,
    select_lymphocytes,
)
from wsi_pipeline.slide import open_slide
from wsi_pipeline.synth import truth_paths, write_slide

MPP = 0.5
SLIDES = [  # seed, label, width, height (px at 0.5 um/px)
    (11, "positive", 4096, 3072),
    (12, "negative", 4096, 3072),
    (13, "positive", 4096, 3072),
    (21, "positive", 8192, 6144),
    (22, "negative", 8192, 6144),
]
MONUSAC = Path(__file__).resolve().parents[2] / "shared" / "data" / "lymphocytes-monusac"
MONUSAC_MPP = 0.25
CLASS_COLOURS = np.array([[0, 0, 0], [255, 255, 0], [0, 255, 0], [0, 0, 255], [255, 0, 0]],
                         np.float32)  # background, lymphocyte, epithelial, macrophage, neutrophil
MATCH_REAL_UM = 4.0
MATCH_SYNTH_UM = 3.0
# synthetic slides that constrain the default set (the test_nuclei slides) and the bound
SYNTH_CONSTRAINT = [(11, "positive", 4096, 3072), (12, "negative", 3072, 2048)]
SYNTH_MIN = 0.82
GRIDS = {  # threshold grids per parameter set (the structural constants are the set's own)
    "default": {"min_darkness": [2.0, 2.1, 2.2], "min_prominence": [0.4, 0.6, 0.8],
                "max_radius_um": [3.8, 4.0, 4.5], "cluster_darkness": [1.1, 1.3, 1.5],
                "cluster_neighbours": [2, 3]},
    "real": {"min_darkness": [1.8, 2.0, 2.2], "min_prominence": [1.0, 1.25, 1.5],
             "max_radius_um": [2.4, 2.6, 2.8], "cluster_darkness": [0.6, 1.0, 1.4],
             "cluster_neighbours": [1, 2]},
}
MIN_TRAIN_PRECISION = 0.72  # "real": the target is P >= 0.7, choose the best recall above


# --------------------------------------------------------------------------- synthetic


def fit_stain(slide) -> stain.StainFit:
    w_um, h_um = slide.size_um
    step = 512 * MPP
    pixels = [stain.tissue_pixels(slide.read(x, y, 512, 512, MPP)[::4, ::4])
              for y in np.arange(0, h_um, step) for x in np.arange(0, w_um, step)]
    return stain.fit_vahadane(np.concatenate(pixels))


def accuracy(folder: Path, seed: int, label: str, width: int, height: int) -> list:
    path = folder / f"fls_{seed}.svs"
    write_slide("fls", path, width=width, height=height, mpp=MPP, seed=seed, label=label)
    slide = open_slide(path)
    fit = fit_stain(slide)
    w_um, h_um = slide.size_um
    t0 = time.perf_counter()
    found = detect_lymphocytes_in_region(slide, 0.0, 0.0, w_um, h_um, MPP, fit)
    seconds = time.perf_counter() - t0
    json_path, zarr_path = truth_paths(path)
    truth = json.loads(json_path.read_text())
    group_store = zarr.open_group(str(zarr_path), mode="r")
    true_xy = np.asarray(group_store["lymphocytes"][:])
    group = np.asarray(group_store["lymphocyte_group"][:])
    pairs = match_points(found, true_xy, MATCH_SYNTH_UM)
    objects = truth["objects"]
    in_focus = np.array([g >= 0 and objects[g]["type"] == "focus" for g in group], bool)
    recall_foci = (np.isin(np.flatnonzero(in_focus), pairs[:, 1]).mean()
                   if in_focus.any() else float("nan"))
    foci = find_aggregates(found)
    return [seed, label, f"{width}x{height}", len(true_xy), len(found),
            len(pairs) / max(len(found), 1), len(pairs) / len(true_xy), recall_foci,
            truth["counts"]["foci"], len(foci), seconds]


def tile_speed(folder: Path) -> tuple[float, int]:
    path = folder / "fls_11.svs"
    slide = open_slide(path)
    fit = fit_stain(slide)
    tiles = []
    w_px, h_px = slide.dimensions
    for y in range(0, h_px - 511, 512):
        for x in range(0, w_px - 511, 512):
            tile = slide.read(x * MPP, y * MPP, 512, 512, MPP)
            if (stain.luminosity(tile[::8, ::8]) < 0.8).mean() > 0.5:
                tiles.append(tile)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for tile in tiles:
            detect_lymphocytes(tile, MPP, fit)
        best = min(best, (time.perf_counter() - t0) / len(tiles))
    return best, len(tiles)


def synthetic(quick: bool) -> None:
    slides = SLIDES[:2] if quick else SLIDES
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"{'seed':>4} {'label':>8} {'size':>9} {'true':>5} {'found':>5} {'prec':>6} "
              f"{'recall':>6} {'r_foci':>6} {'foci':>4} {'found':>5} {'s':>5}")
        for seed, label, width, height in slides:
            row = accuracy(folder, seed, label, width, height)
            print(f"{row[0]:>4} {row[1]:>8} {row[2]:>9} {row[3]:>5} {row[4]:>5} "
                  f"{row[5]:>6.3f} {row[6]:>6.3f} {row[7]:>6.3f} {row[8]:>4} {row[9]:>5} "
                  f"{row[10]:>5.1f}")
        per_tile, n = tile_speed(folder)
        print(f"detect_lymphocytes: {per_tile * 1e3:.1f} ms per 512 x 512 tissue tile at "
              f"{MPP} um/px (best of 3 passes over {n} tiles)")


# --------------------------------------------------------------------------- real H&E


def decode_mask(rgb: np.ndarray) -> np.ndarray:
    """MoNuSAC class map from a JPEG mask: each pixel's nearest class colour (0-4), specks
    of a class under 2 um2 (JPEG fringes) set to background."""
    from scipy import ndimage as ndi

    d = ((rgb[..., None, :].astype(np.float32) - CLASS_COLOURS) ** 2).sum(-1)
    labels = d.argmin(-1).astype(np.uint8)
    min_px = 2.0 / MONUSAC_MPP**2
    for k in range(1, len(CLASS_COLOURS)):
        cc, n = ndi.label(labels == k)
        if n:
            small = np.bincount(cc.ravel()) < min_px
            small[0] = False
            labels[small[cc]] = 0
    return labels


def nucleus_centres(mask: np.ndarray, mpp: float, merged_um2: float = 30.0,
                    min_sep_um: float = 2.0) -> np.ndarray:
    """(N, 2) x_um, y_um centroids of a class mask; components larger than merged_um2
    (touching nuclei merge in the mask) are split by a watershed of their distance
    transform, one seed per maximum at least min_sep_um apart."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    cc, n = ndi.label(mask)
    if not n:
        return np.zeros((0, 2))
    index = np.arange(1, n + 1)
    area = np.bincount(cc.ravel(), minlength=n + 1)[1:] * mpp * mpp
    cy, cx = np.array(ndi.center_of_mass(mask, cc, index)).reshape(-1, 2).T
    out = [np.stack([cx + 0.5, cy + 0.5], 1)[area <= merged_um2] * mpp]
    big = index[area > merged_um2]
    if len(big):
        sub = np.isin(cc, big)
        dist = ndi.gaussian_filter(ndi.distance_transform_edt(sub), 1.0)
        peaks = peak_local_max(dist, min_distance=int(min_sep_um / mpp), labels=cc * sub,
                               exclude_border=False)
        markers = np.zeros(mask.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        parts = watershed(-dist, markers, mask=sub)
        cy, cx = np.array(ndi.center_of_mass(sub, parts, np.arange(1, len(peaks) + 1))
                          ).reshape(-1, 2).T
        out.append(np.stack([cx + 0.5, cy + 0.5], 1) * mpp)
    return np.concatenate(out)


def half_size(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    return np.rint(rgb[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))).astype(np.uint8)


def load_monusac() -> list[dict]:
    """Regions with slide name, RGB at 0.5 um/px, class map at 0.25 um/px, lymphocyte
    centres (um)."""
    from PIL import Image

    if not MONUSAC.exists():
        raise SystemExit(f"real data absent: {MONUSAC} (see ../shared/data/SOURCES.md)")
    regions = []
    for path in sorted((MONUSAC / "images").glob("*.jpg")):
        bgr = np.asarray(Image.open(path).convert("RGB"))
        labels = decode_mask(np.asarray(Image.open(MONUSAC / "masks" / path.name)
                                        .convert("RGB")))
        regions.append({"name": path.stem, "slide": re.sub(r"_\d+$", "", path.stem),
                        "rgb": half_size(np.ascontiguousarray(bgr[..., ::-1])),
                        "labels": labels,
                        "lymphocytes": nucleus_centres(labels == 1, MONUSAC_MPP)})
    return regions


def slide_fits(regions: list[dict]) -> dict[str, stain.StainFit]:
    """Each slide's own stain fit from its regions' tissue pixels (at 0.5 um/px)."""
    slides = sorted({r["slide"] for r in regions})
    return {s: stain.fit_vahadane(np.concatenate([stain.tissue_pixels(r["rgb"])
                                                  for r in regions if r["slide"] == s]))
            for s in slides}


def _matches(found: np.ndarray, true: np.ndarray, tol_um: float) -> np.ndarray:
    """match_points on the points that have a partner within tol_um (same result, faster
    on large sets)."""
    if not len(found) or not len(true):
        return np.zeros((0, 2), np.intp)
    from scipy.spatial import cKDTree

    pairs = cKDTree(found).query_ball_tree(cKDTree(true), tol_um)
    fi = np.flatnonzero([len(p) > 0 for p in pairs])
    ti = np.unique(np.concatenate([pairs[i] for i in fi])).astype(np.intp) if len(fi) else []
    if not len(fi):
        return np.zeros((0, 2), np.intp)
    m = match_points(found[fi], true[ti], tol_um)
    return np.stack([fi[m[:, 0]], np.asarray(ti)[m[:, 1]]], axis=1)


def grid_params(base: LymphocyteParams, grid: dict) -> list[LymphocyteParams]:
    out = []
    for values in itertools.product(*grid.values()):
        v = dict(zip(grid, values, strict=True))
        out.append(replace(base, radius_um=(base.radius_um[0], v.pop("max_radius_um")), **v))
    return out


def permissive(base: LymphocyteParams) -> LymphocyteParams:
    """The structural constants of `base`, with thresholds that keep every candidate."""
    return replace(base, min_darkness=0.0, min_prominence=-np.inf, cluster_darkness=0.0)


def real_counts(regions: list[dict], fits: dict, params: list[LymphocyteParams],
                base: LymphocyteParams) -> np.ndarray:
    """(len(params), len(regions), 6) counts: tp, found, true, fp on another class, fp
    on a lymphocyte, fp unlabelled."""
    counts = np.zeros((len(params), len(regions), 6), np.int64)
    for j, region in enumerate(regions):
        f = lymphocyte_candidates(region["rgb"], MPP, fits[region["slide"]],
                                  permissive(base), measure_all=True)
        labels = region["labels"]
        rows = np.clip((f["y_um"] / MONUSAC_MPP).astype(np.intp), 0, labels.shape[0] - 1)
        cols = np.clip((f["x_um"] / MONUSAC_MPP).astype(np.intp), 0, labels.shape[1] - 1)
        under = labels[rows, cols]
        xy = np.stack([f["x_um"], f["y_um"]], axis=1)
        true = region["lymphocytes"]
        for i, p in enumerate(params):
            keep = np.flatnonzero(select_lymphocytes(f, p))
            pairs = _matches(xy[keep], true, MATCH_REAL_UM)
            fp = np.ones(len(keep), bool)
            fp[pairs[:, 0]] = False
            cls = under[keep[fp]]
            counts[i, j] = (len(pairs), len(keep), len(true), (cls > 1).sum(),
                            (cls == 1).sum(), (cls == 0).sum())
    return counts


def synthetic_ok(params: list[LymphocyteParams], base: LymphocyteParams) -> np.ndarray:
    """Bool per parameter set: P and R >= SYNTH_MIN on each SYNTH_CONSTRAINT slide."""
    ok = np.ones(len(params), bool)
    with tempfile.TemporaryDirectory() as tmp:
        for seed, label, width, height in SYNTH_CONSTRAINT:
            path = Path(tmp) / f"fls_{seed}.svs"
            write_slide("fls", path, width=width, height=height, mpp=MPP, seed=seed,
                        label=label)
            slide = open_slide(path)
            fit = fit_stain(slide)
            true = np.asarray(zarr.open_group(str(truth_paths(path)[1]), mode="r")
                              ["lymphocytes"][:])
            w_um, h_um = slide.size_um
            step = 1024 * MPP
            parts = []
            for y in np.arange(0, h_um, step):   # abutting tiles, as the pipeline reads
                for x in np.arange(0, w_um, step):
                    f = lymphocyte_candidates(slide.read(x, y, 1024, 1024, MPP), MPP, fit,
                                              permissive(base), measure_all=True)
                    f["x_um"] = f["x_um"] + x
                    f["y_um"] = f["y_um"] + y
                    parts.append(f)
            f = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            xy = np.stack([f["x_um"], f["y_um"]], axis=1)
            for i, p in enumerate(params):
                found = xy[select_lymphocytes(f, p)]
                tp = len(_matches(found, true, MATCH_SYNTH_UM))
                ok[i] &= min(tp / max(len(found), 1), tp / len(true)) >= SYNTH_MIN
    return ok


def _pr(c: np.ndarray) -> tuple[float, float, float]:
    p, r = c[0] / max(c[1], 1), c[0] / max(c[2], 1)
    return p, r, 2 * p * r / max(p + r, 1e-12)


def _choose(train: np.ndarray, allowed: np.ndarray, target: bool) -> int:
    """The allowed grid point with the best F1 on the training counts ((params, 6)), or
    with target, the best recall among those with precision >= MIN_TRAIN_PRECISION (the
    best F1 if none has)."""
    pr = np.array([_pr(c) for c in train])
    score = pr[:, 2].copy()
    if target:
        score = np.where(pr[:, 0] >= MIN_TRAIN_PRECISION, 1.0 + pr[:, 1], score)
    score[~allowed] = -1.0
    return int(np.argmax(score))


def _describe(p: LymphocyteParams) -> str:
    return (f"darkness>={p.min_darkness:g} prominence>={p.min_prominence:g} "
            f"radius<={p.radius_um[1]:g} round>={p.min_roundness:g} "
            f"cluster>={p.cluster_darkness:g}x{p.cluster_neighbours}")


def leave_one_slide_out(name: str, regions: list[dict], params: list[LymphocyteParams],
                        counts: np.ndarray, allowed: np.ndarray, target: bool) -> None:
    slides = np.array([r["slide"] for r in regions])
    names = sorted(set(slides))
    print(f"\n== {name}: {allowed.sum()} of {len(params)} grid points allowed; "
          "each slide scored with the constants chosen on the other 11")
    print(f"{'held-out slide':<24} {'true':>5} {'found':>5} {'tp':>5} {'P':>6} {'R':>6} "
          f"{'fp_cls':>6} {'fp_lym':>6} {'fp_unl':>6}  chosen on the others")
    pooled = np.zeros(6, np.int64)
    chosen = []
    for s in names:
        best = _choose(counts[:, slides != s].sum(axis=1), allowed, target)
        chosen.append(best)
        held = counts[best, slides == s].sum(axis=0)
        pooled += held
        p, r, _ = _pr(held)
        print(f"{s:<24} {held[2]:>5} {held[1]:>5} {held[0]:>5} {p:>6.3f} "
              f"{r if held[2] else float('nan'):>6.3f} {held[3]:>6} {held[4]:>6} "
              f"{held[5]:>6}  {_describe(params[best])}")
    p, r, f1 = _pr(pooled)
    labelled = pooled[0] / max(pooled[1] - pooled[5], 1)
    print(f"{'ALL (held-out, pooled)':<24} {pooled[2]:>5} {pooled[1]:>5} {pooled[0]:>5} "
          f"{p:>6.3f} {r:>6.3f} {pooled[3]:>6} {pooled[4]:>6} {pooled[5]:>6}  F1 {f1:.3f}; "
          f"precision without unlabelled-area FPs {labelled:.3f}")
    whole = counts.sum(axis=1)
    best = _choose(whole, allowed, target)
    p, r, f1b = _pr(whole[best])
    print(f"all 12 slides' choice: {_describe(params[best])} (in-sample P {p:.3f} R {r:.3f} "
          f"F1 {f1b:.3f})")


def real() -> None:
    t0 = time.perf_counter()
    regions = load_monusac()
    fits = slide_fits(regions)
    n_true = sum(len(r["lymphocytes"]) for r in regions)
    print(f"MoNuSAC: {len(regions)} regions, {len(fits)} slides, {n_true} lymphocytes; "
          f"evaluated at {MPP} um/px, match within {MATCH_REAL_UM} um")
    for name, base in (("default", LymphocyteParams()), ("real", REAL_HE)):
        shipped = [base]
        params = grid_params(base, GRIDS[name])
        counts = real_counts(regions, fits, params + shipped, base)
        ok = (synthetic_ok(params + shipped, base) if name == "default"
              else np.ones(len(params) + 1, bool))
        leave_one_slide_out(name, regions, params, counts[:-1], ok[:-1], name == "real")
        p, r, f1 = _pr(counts[-1].sum(axis=0))
        print(f"shipped {'LymphocyteParams()' if name == 'default' else 'REAL_HE'} "
              f"({_describe(base)}): all slides P {p:.3f} R {r:.3f} F1 {f1:.3f}"
              + ("" if name == "real" else f"; synthetic constraint met: {bool(ok[-1])}"))
    print(f"({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    if "--real" in sys.argv:
        real()
    else:
        synthetic("--quick" in sys.argv)


if __name__ == "__main__":
    main()
