"""Classical lymphocyte detector and dense-aggregate finder (wsi_pipeline.nuclei).

Against the synthetic nuclei truth of `wsi-synth` fls slides (every lymphocyte centre is
known), hand-made point sets and images drawn from a known stain matrix; plus a sanity run
on the real CMU-1-Small-Region slide.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from conftest import shared
from skimage.measure import points_in_poly

from wsi_pipeline import stain
from wsi_pipeline.errors import UsageError
from wsi_pipeline.nuclei import (
    REAL_HE,
    AggregateParams,
    LymphocyteParams,
    detect_lymphocytes,
    detect_lymphocytes_in_region,
    find_aggregates,
    haematoxylin,
    match_points,
)
from wsi_pipeline.slide import open_slide
from wsi_pipeline.synth import truth_paths, write_slide

MPP = 0.5
MATCH_UM = 3.0  # a detection matches a true nucleus centre within this distance


def _fit_stain(slide, tile_px: int = 512) -> stain.StainFit:
    """The slide's own stain fit, as the pipeline makes it: tissue pixels of working-MPP
    tiles (every 4th pixel of every tile here, to keep the test fast)."""
    w_um, h_um = slide.size_um
    step = tile_px * MPP
    pixels = [stain.tissue_pixels(slide.read(x, y, tile_px, tile_px, MPP)[::4, ::4])
              for y in np.arange(0, h_um, step) for x in np.arange(0, w_um, step)]
    return stain.fit_vahadane(np.concatenate(pixels))


def _truth(path) -> tuple[dict, np.ndarray, np.ndarray]:
    json_path, zarr_path = truth_paths(path)
    group = zarr.open_group(str(zarr_path), mode="r")
    return (json.loads(json_path.read_text()), np.asarray(group["lymphocytes"][:]),
            np.asarray(group["lymphocyte_group"][:]))


def _match(found: np.ndarray, true: np.ndarray, tol: float = MATCH_UM) -> np.ndarray:
    return match_points(found, true, tol)


@pytest.fixture(scope="module")
def fls_run(fls_slide):
    """Detections over the whole fixture slide (4096 x 3072 px, seed 11, one focus)."""
    path, _ = fls_slide
    slide = open_slide(path)
    fit = _fit_stain(slide)
    w_um, h_um = slide.size_um
    found = detect_lymphocytes_in_region(slide, 0.0, 0.0, w_um, h_um, MPP, fit)
    truth, true_xy, group = _truth(path)
    return {"slide": slide, "fit": fit, "found": found, "truth": truth, "true_xy": true_xy,
            "group": group}


@pytest.fixture(scope="module")
def negative_run(tmp_path_factory):
    """A second, small synthetic slide: negative, seed 12 (no focus, one aggregate)."""
    path = tmp_path_factory.mktemp("nuclei") / "fls_neg.svs"
    write_slide("fls", path, width=3072, height=2048, mpp=MPP, seed=12, label="negative")
    slide = open_slide(path)
    fit = _fit_stain(slide)
    w_um, h_um = slide.size_um
    found = detect_lymphocytes_in_region(slide, 0.0, 0.0, w_um, h_um, MPP, fit)
    truth, true_xy, group = _truth(path)
    return {"found": found, "truth": truth, "true_xy": true_xy, "group": group}


# --------------------------------------------------------------------------- detector


def test_detector_precision_and_recall_against_synthetic_truth(fls_run):
    found, true_xy, group = fls_run["found"], fls_run["true_xy"], fls_run["group"]
    truth = fls_run["truth"]
    pairs = _match(found, true_xy)
    precision = len(pairs) / len(found)
    recall = len(pairs) / len(true_xy)
    objects = truth["objects"]
    in_focus = np.array([g >= 0 and objects[g]["type"] == "focus" for g in group])
    recall_foci = np.isin(np.flatnonzero(in_focus), pairs[:, 1]).mean()
    print(f"\nlymphocytes: {len(found)} found, {len(true_xy)} true; precision {precision:.3f}, "
          f"recall {recall:.3f}, recall in foci {recall_foci:.3f} ({in_focus.sum()} nuclei)")
    assert in_focus.sum() >= 50  # the region holds a focus and normal gland
    assert precision >= 0.8
    assert recall >= 0.8
    assert recall_foci >= 0.8  # the >= 50 rule depends on it
    # matched centres are accurate, not just within the tolerance
    err = np.hypot(*(found[pairs[:, 0]] - true_xy[pairs[:, 1]]).T)
    assert np.median(err) < 1.0


def test_second_slide_precision_and_recall(negative_run):
    found, true_xy = negative_run["found"], negative_run["true_xy"]
    pairs = _match(found, true_xy)
    precision, recall = len(pairs) / len(found), len(pairs) / len(true_xy)
    print(f"\nnegative seed 12: {len(found)} found, {len(true_xy)} true; "
          f"precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.8
    assert recall >= 0.8


def test_region_tiles_find_each_nucleus_exactly_once(fls_run):
    """Tile size changes nothing: a nucleus on a tile border is found by exactly one tile."""
    slide, fit, found = fls_run["slide"], fls_run["fit"], fls_run["found"]
    focus = next(o for o in fls_run["truth"]["objects"] if o["type"] == "focus")
    # on the pixel grid: the same pixels as the whole-slide run, no resampling
    x0, y0 = (np.floor((focus[k] - d) / MPP) * MPP for k, d in (("x_um", 120), ("y_um", 100)))
    inside = ((found[:, 0] >= x0) & (found[:, 0] < x0 + 240.0)
              & (found[:, 1] >= y0) & (found[:, 1] < y0 + 200.0))
    expected = found[inside]
    small = detect_lymphocytes_in_region(slide, x0, y0, 240.0, 200.0, MPP, fit, tile_px=64)
    assert len(expected) >= 50
    assert len(small) == len(expected)
    order = np.lexsort(expected.T[::-1])
    np.testing.assert_allclose(small[np.lexsort(small.T[::-1])], expected[order], atol=1e-6)
    # no two detections closer than the minimum centre distance
    d = np.hypot(*(small[:, None] - small[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= LymphocyteParams().min_distance_um - 1e-9


def _draw(shapes, size_px: int = 200, matrix=None, seed: int = 0):
    """RGB image at MPP from stain concentrations: a pale background (H 0.15, E 0.5) and
    ellipses (cx_um, cy_um, a_um, b_um, angle, H) with E 0.3; 4x supersampled edges."""
    matrix = stain.REFERENCES["he"].matrix if matrix is None else matrix
    ss = 4
    y, x = (np.mgrid[0:size_px * ss, 0:size_px * ss] + 0.5) / ss * MPP
    conc_h = np.full(x.shape, 0.15)
    conc_e = np.full(x.shape, 0.5)
    for cx, cy, a, b, angle, h in shapes:
        c, s = np.cos(angle), np.sin(angle)
        u = ((x - cx) * c + (y - cy) * s) / a
        v = ((y - cy) * c - (x - cx) * s) / b
        inside = u * u + v * v <= 1.0
        conc_h[inside] = np.maximum(conc_h[inside], h)
        conc_e[inside] = 0.3
    conc_h = conc_h.reshape(size_px, ss, size_px, ss).mean((1, 3))
    conc_e = conc_e.reshape(size_px, ss, size_px, ss).mean((1, 3))
    od = conc_h[..., None] * matrix[0] + conc_e[..., None] * matrix[1]
    noise = np.random.default_rng(seed).normal(0.0, 1.0, od.shape)
    return np.clip(np.rint(255.0 * np.exp(-od) + noise), 0, 255).astype(np.uint8)


def test_detector_keeps_small_round_dark_nuclei_only():
    # darkness is absolute (haematoxylin OD units): lymphocyte chromatin ~2.5 (the
    # synthetic slides' 2.2 at their reference intensity, real H&E 1.5-3.5)
    lymphocytes = [(20, 20), (50, 20), (80, 20), (20, 60), (26, 60)]  # the last two touch
    shapes = [(x, y, 3.5, 3.5, 0.0, 2.5) for x, y in lymphocytes]
    shapes += [
        (50, 60, 1.5, 1.5, 0.0, 2.5),  # too small
        (80, 60, 3.5, 3.5, 0.0, 1.0),  # too pale
        (30, 85, 8.0, 8.0, 0.0, 2.5),  # too large
        (75, 85, 8.0, 1.5, 0.4, 2.5),  # spindle
    ]
    rgb = _draw(shapes)
    # max_conc plays no part: the same answer whatever the slide's 99th percentile
    fit = stain.StainFit(matrix=stain.REFERENCES["he"].matrix, max_conc=[9.0, 1.0])
    found = detect_lymphocytes(rgb, MPP, fit)
    assert found.shape == (5, 2) and found.dtype == np.float64
    pairs = _match(found, np.array(lymphocytes, float), tol=1.0)
    assert len(pairs) == 5
    # the same tile at another MPP: sizes are physical, so the answer scales with it
    half = rgb.reshape(100, 2, 100, 2, 3).mean((1, 3)).round().astype(np.uint8)
    assert len(_match(detect_lymphocytes(half, 2 * MPP, fit), np.array(lymphocytes, float),
                      tol=1.5)) == 5
    # a mask drops candidates where it is False (any resolution over the same field)
    mask = np.zeros((10, 10), bool)
    mask[:, :4] = True  # x < 40 um
    masked = detect_lymphocytes(rgb, MPP, fit, mask=mask)
    assert len(masked) == 3 and np.all(masked[:, 0] < 40.0)


def test_marking_dye_and_ink_are_not_lymphocytes():
    """Blue-green tissue-marking dye (CMU-1-Small-Region's) and blue, green or black marker
    ink, in blobs of a lymphocyte's size and far above its haematoxylin darkness, are
    rejected by their colour (they absorb more red than green): with the reference H&E
    matrix, and with CMU-1's own pipeline fit, whose haematoxylin vector the dye pulled
    towards itself."""
    he = stain.REFERENCES["he"].matrix.astype(np.float64)
    cmu1 = np.array([[0.785, 0.528, 0.323], [0.299, 0.838, 0.456]])  # dye in the fit
    nucleus = 2.6 * he[0] + 0.3 * he[1]
    dyes = {"teal dye": np.array([0.875, 0.355, 0.307]) * 3.2,  # CMU-1's dye, OD direction
            "blue ink": np.array([1.55, 0.85, 0.18]) * 1.6,  # the synthetic slides' inks
            "green ink": np.array([1.45, 0.45, 0.95]) * 1.6,
            "black ink": np.array([1.6, 1.55, 1.45]) * 1.2}
    centres = np.array([(20.0 + 30.0 * (i % 3), 20.0 + 30.0 * (i // 3))
                        for i in range(len(dyes) + 1)])
    size = 200
    y, x = (np.mgrid[0:size, 0:size] + 0.5) * MPP
    od = np.broadcast_to(0.15 * he[0] + 0.5 * he[1], (size, size, 3)).copy()
    for (cx, cy), blob in zip(centres, [nucleus, *dyes.values()], strict=True):
        od[np.hypot(x - cx, y - cy) <= 3.5] = blob
    rgb = np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)
    for matrix in (he, cmu1):
        fit = stain.StainFit(matrix=matrix, max_conc=[2.0, 1.0])
        h = haematoxylin(rgb, fit)
        for (cx, cy), name in zip(centres[1:], dyes, strict=True):
            assert h[int(cy / MPP), int(cx / MPP)] > 1.9, name  # "haematoxylin" ...
        found = detect_lymphocytes(rgb, MPP, fit)
        assert len(_match(found, centres[1:], tol=3.0)) == 0  # ... but not taken
        # it is the colour rule that rejects them
        loose = detect_lymphocytes(rgb, MPP, fit, LymphocyteParams(max_red_green=10.0))
        assert len(_match(loose, centres[1:], tol=1.5)) >= 2
    # the nucleus itself, in the reference's units, is found (exactly it)
    found = detect_lymphocytes(rgb, MPP, stain.StainFit(matrix=he, max_conc=[2.0, 1.0]))
    assert len(found) == len(_match(found, centres[:1], tol=1.0)) == 1


def test_detector_on_blank_and_bad_input():
    fit = stain.REFERENCES["he"]
    blank = np.full((64, 64, 3), 240, np.uint8)
    assert detect_lymphocytes(blank, MPP, fit).shape == (0, 2)
    with pytest.raises(UsageError):
        detect_lymphocytes(blank[..., 0], MPP, fit)
    with pytest.raises(UsageError):
        detect_lymphocytes(blank.astype(np.float32), MPP, fit)
    with pytest.raises(UsageError):
        detect_lymphocytes(blank, 0.0, fit)
    with pytest.raises(UsageError):
        LymphocyteParams(radius_um=(4.0, 3.0))


# --------------------------------------------------------------------------- haematoxylin


def test_haematoxylin_recovers_known_concentrations():
    matrix = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # Ruifrok & Johnston H, E
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    rng = np.random.default_rng(1)
    conc = np.stack([rng.uniform(0, 2.0, (64, 64)), rng.uniform(0, 1.2, (64, 64))], -1)
    od = conc @ matrix
    rgb = np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)
    fit = stain.StainFit(matrix=matrix, max_conc=[2.0, 1.2])
    h = haematoxylin(rgb, fit)
    assert h.shape == (64, 64) and h.dtype == np.float32
    err = np.abs(h - conc[..., 0])
    # 8-bit quantisation: OD error <= 0.5 / I per channel
    assert err.mean() < 0.01 and err.max() < 0.06
    # glass is 0; pure eosin carries no haematoxylin (clipped, never negative)
    eosin = np.rint(255.0 * np.exp(-1.0 * matrix[1])).astype(np.uint8)
    assert haematoxylin(np.full((2, 2, 3), 255, np.uint8), fit).max() == 0.0
    assert haematoxylin(np.broadcast_to(eosin, (2, 2, 3)).copy(), fit).max() < 0.02


# --------------------------------------------------------------------------- aggregates


def _disc_points(rng, cx, cy, n, spacing_um):
    """n points on a jittered hexagonal grid, the n nearest to (cx, cy)."""
    g = np.arange(-12, 13)
    gx, gy = np.meshgrid(g * spacing_um, g * spacing_um * 0.866)
    gx = gx + (np.arange(len(g))[:, None] % 2) * spacing_um / 2
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    pts = pts[np.argsort(np.hypot(*pts.T))[:n]]
    return pts + (cx, cy) + rng.uniform(-1.0, 1.0, pts.shape)


def test_find_aggregates_on_hand_made_points():
    rng = np.random.default_rng(5)
    dense = _disc_points(rng, 300.0, 300.0, 60, 7.0)
    small = _disc_points(rng, 700.0, 300.0, 30, 7.0)
    scattered = np.stack(np.meshgrid(np.arange(60.0, 1000.0, 140.0),
                                     np.arange(600.0, 1000.0, 140.0)), -1).reshape(-1, 2)
    points = np.concatenate([scattered[:10], dense, scattered[10:], small])
    dense_idx = np.arange(10, 70)

    aggregates = find_aggregates(points)
    assert len(aggregates) == 1
    (agg,) = aggregates
    assert agg["count"] == 60
    np.testing.assert_array_equal(np.sort(agg["points"]), dense_idx)
    assert np.hypot(agg["centroid_um"][0] - 300.0, agg["centroid_um"][1] - 300.0) < 2.0
    polygon = agg["polygon_um"]
    assert polygon.ndim == 2 and polygon.shape[1] == 2
    np.testing.assert_array_equal(polygon[0], polygon[-1])  # closed ring
    assert points_in_poly(dense, polygon).all()
    assert not points_in_poly(small, polygon).any()
    # 60 nuclei at 7 um hexagonal packing: ~60 x 42 um2 plus a rim of ~4 um
    packed = 60 * 0.866 * 7.0**2
    assert packed < agg["area_um2"] < 2.0 * packed
    # polygon area (shoelace) agrees with the raster area
    x, y = polygon[:, 0], polygon[:, 1]
    shoelace = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
    assert shoelace == pytest.approx(agg["area_um2"], rel=0.1)

    everything = find_aggregates(points, AggregateParams(min_count=None))
    assert [a["count"] for a in everything] == [60, 30]
    assert [a["count"] for a in find_aggregates(points, AggregateParams(min_count=30))] == [
        60, 30]
    assert find_aggregates(np.zeros((0, 2))) == []
    assert find_aggregates(scattered) == []
    with pytest.raises(UsageError):
        find_aggregates(np.zeros((4, 3)))


def test_classical_foci_match_truth(fls_run):
    """Clusters of >= 50 detected lymphocytes = truth foci (+/- 20 %), each truth focus
    inside exactly one of them."""
    found, truth, true_xy, group = (fls_run[k] for k in ("found", "truth", "true_xy", "group"))
    aggregates = find_aggregates(found)
    n_true = truth["counts"]["foci"]
    print(f"\nfoci: {len(aggregates)} found (counts {[a['count'] for a in aggregates]}), "
          f"{n_true} true")
    assert n_true >= 1
    assert abs(len(aggregates) - n_true) <= 0.2 * n_true
    for k, obj in enumerate(truth["objects"]):
        if obj["type"] != "focus":
            continue
        # the focus centre as its lymphocytes' centroid: foci are placed around ducts, so
        # the centre of their truth ellipse can fall in the duct, outside the infiltrate
        centre = true_xy[group == k].mean(axis=0)
        holders = [a for a in aggregates if points_in_poly([centre], a["polygon_um"])[0]]
        assert len(holders) == 1
        assert holders[0]["count"] >= 0.8 * obj["lymphocytes"]


def test_classical_foci_on_negative_slide(negative_run):
    truth = negative_run["truth"]
    aggregates = find_aggregates(negative_run["found"])
    everything = find_aggregates(negative_run["found"], AggregateParams(min_count=None))
    print(f"\nnegative: {len(aggregates)} foci found, {truth['counts']['foci']} true; "
          f"clusters {[a['count'] for a in everything]}")
    assert truth["counts"]["foci"] == 0 and truth["counts"]["aggregates_below_threshold"] >= 1
    assert len(aggregates) == 0
    assert len(everything) >= 1  # the sub-threshold aggregate is seen, but not counted


# --------------------------------------------------------------------------- real slide


def test_real_slide_sanity():
    """CMU-1-Small-Region (real H&E skin, 0.499 um/px): no truth; the detector runs over
    the whole slide and gives a plausible, bounded density."""
    slide = open_slide(shared("slides", "CMU-1-Small-Region.svs"))
    fit = _fit_stain(slide)
    w_um, h_um = slide.size_um
    found = detect_lymphocytes_in_region(slide, 0.0, 0.0, w_um, h_um, slide.mpp, fit)
    rgb = slide.thumbnail(4.0)
    tissue_mm2 = (stain.luminosity(rgb) < 0.8).sum() * 16.0 / 1e6
    density = len(found) / tissue_mm2
    print(f"\nCMU-1-Small-Region: {len(found)} lymphocytes over {tissue_mm2:.3f} mm2 of "
          f"stained tissue ({density:.0f} per mm2)")
    assert found.shape[1] == 2 and np.isfinite(found).all()
    assert (found >= 0).all() and (found[:, 0] < w_um).all() and (found[:, 1] < h_um).all()
    assert density < 3000  # dense lymphoid tissue holds ~10^4 per mm2; this is skin


# --------------------------------------------------------------------------- real H&E

MONUSAC_SLIDES = ("TCGA-2Z-A9JG-01Z-00-DX1", "TCGA-DW-7838-01Z-00-DX1")
MONUSAC_COLOURS = np.array([[0, 0, 0], [255, 255, 0], [0, 255, 0], [0, 0, 255], [255, 0, 0]],
                           np.float32)  # background, lymphocyte, epithelial, macrophage, neutrophil


@pytest.fixture(scope="module")
def monusac():
    """Two MoNuSAC slides' regions (real TCGA H&E, 40x, every nucleus outlined by class):
    RGB at 0.5 um/px (the stored JPEGs hold BGR: swapped back), the class map at 0.25 um/px
    and the slide's own stain fit."""
    from PIL import Image

    root = shared("lymphocytes-monusac")
    out = {}
    for name in MONUSAC_SLIDES:
        regions = []
        for path in sorted((root / "images").glob(f"{name}_*.jpg")):
            bgr = np.asarray(Image.open(path).convert("RGB"))
            h, w = bgr.shape[0] // 2 * 2, bgr.shape[1] // 2 * 2
            rgb = np.rint(bgr[:h, :w, ::-1].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)))
            mask = np.asarray(Image.open(root / "masks" / path.name).convert("RGB"))
            labels = ((mask[..., None, :] - MONUSAC_COLOURS) ** 2).sum(-1).argmin(-1)
            regions.append((rgb.astype(np.uint8), labels, bgr))
        fit = stain.fit_vahadane(np.concatenate([stain.tissue_pixels(r[0]) for r in regions]))
        out[name] = (regions, fit)
    return out


def test_monusac_images_hold_bgr(monusac):
    """The MoNuSAC conversion stored BGR: lymphocyte chromatin, as stored, points 10+
    degrees away from haematoxylin in OD; swapped, it is haematoxylin (within a few)."""
    ref = stain.REFERENCES["he"].matrix[0].astype(np.float64)
    for regions, _ in monusac.values():
        pixels = np.concatenate([bgr[labels[:bgr.shape[0], :bgr.shape[1]] == 1]
                                 for _, labels, bgr in regions])
        for order, lo, hi in ((slice(None), 0.0, 0.985), (slice(None, None, -1), 0.995, 1.0)):
            od = stain.rgb_to_od(pixels[:, order]).astype(np.float64).mean(0)
            assert lo <= od @ ref / np.linalg.norm(od) <= hi


def _score_on_masks(found_um: np.ndarray, labels: np.ndarray) -> tuple[int, int, int, int]:
    """(detections on a lymphocyte mask, detections, lymphocyte mask components holding
    one, components of >= 8 um2) at the masks' 0.25 um/px."""
    from scipy import ndimage as ndi

    lym = labels == 1
    cc, n = ndi.label(lym)
    big = np.flatnonzero(np.bincount(cc.ravel(), minlength=n + 1)[1:] * 0.0625 >= 8.0) + 1
    rows = np.clip((found_um[:, 1] / 0.25).astype(int), 0, lym.shape[0] - 1)
    cols = np.clip((found_um[:, 0] / 0.25).astype(int), 0, lym.shape[1] - 1)
    near = ndi.binary_dilation(lym, iterations=4)  # within 1 um of a lymphocyte
    hit = np.isin(big, cc[rows, cols])
    return int(near[rows, cols].sum()), len(found_um), int(hit.sum()), len(big)


@pytest.mark.parametrize(("params", "min_precision", "min_recall"), [
    (REAL_HE, 0.8, 0.8),
    (LymphocyteParams(), 0.85, 0.5),  # synthetic-bound: pale real slides are missed
])
def test_lymphocytes_on_real_he(monusac, params, min_precision, min_recall):
    """Real H&E (MoNuSAC, two slides the constants were chosen on; the held-out figures
    are bench_nuclei.py --real's): the share of detections on an outlined lymphocyte and
    of lymphocytes (mask components, touching ones merged) with a detection."""
    for name, (regions, fit) in monusac.items():
        counts = np.zeros(4, int)
        for rgb, labels, _ in regions:
            counts += _score_on_masks(detect_lymphocytes(rgb, MPP, fit, params), labels)
        precision, recall = counts[0] / counts[1], counts[2] / counts[3]
        print(f"\n{name}: {counts[1]} found, precision {precision:.3f}, recall {recall:.3f}")
        assert precision >= min_precision and recall >= min_recall, name


# --------------------------------------------------------------------------- fls export


def test_classical_fls_exports_its_lymphocytes_as_qupath_detections(fls_slide, tmp_path):
    """wsi-run --task fls --model classical writes cells.geojson: one QuPath point
    detection per lymphocyte it detected (slide pixels), as many as the report says."""
    from wsi_pipeline.cli import main

    path, truth = fls_slide
    out = tmp_path / "out"
    assert main([str(path), "--task", "fls", "--model", "classical", "--out", str(out),
                 "--quiet"]) == 0
    folder = out / path.stem
    report = json.loads((folder / "report.json").read_text())
    features = json.loads((folder / "cells.geojson").read_text())["features"]
    n = report["counts"]["lymphocytes_detected"]
    assert n == report["inference"]["lymphocytes"] == len(features) > 50
    assert n <= 1.25 * len(_truth(path)[1])  # the synthetic slide's lymphocytes
    for feature in features:
        assert feature["geometry"]["type"] == "Point"
        assert feature["properties"]["objectType"] == "detection"
        assert feature["properties"]["classification"]["name"] == "Lymphocyte"
    # coordinates: level-0 pixels of the slide, the stored centres over its MPP
    cells = zarr.open_group(str(folder / "store.zarr"), mode="r")["pred/cells"]
    xy_px = np.array([f["geometry"]["coordinates"] for f in features])
    np.testing.assert_allclose(xy_px * MPP, np.asarray(cells), atol=0.01)
    assert cells.attrs["name"] == "Lymphocyte" and len(cells.attrs["color"]) == 3
    # the foci counted are the truth's
    assert report["counts"]["foci"] == truth["counts"]["foci"]
