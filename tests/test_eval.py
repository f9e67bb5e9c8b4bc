"""wsi-eval: metrics checked by hand on small cases, every truth format, the command's
failures, an end-to-end run on a synthetic fls slide and on real PAS kidney tiles."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import shared
from PIL import Image
from scipy import ndimage

from wsi_pipeline.evaluate import evaluate, main
from wsi_pipeline.evaluate.metrics import (
    bland_altman,
    bootstrap_ci,
    match_objects,
    match_points,
    object_ious,
    pixel_counts,
    pooled,
)
from wsi_pipeline.evaluate.sources import aliases, eval_classes
from wsi_pipeline.export import write_geojson

LEGEND = {0: "background", 1: "glomerulus candidate", 2: "glomerulus (normocellular)"}


# -- fake wsi-run folders and truth files -------------------------------------------------------
def make_output(out: Path, slide_id: str, labels: np.ndarray, *, mpp: float = 2.0,
                slide_mpp: float = 0.5, task: str = "glomeruli", legend=None,
                objects=None, cells=None, diagnosis: str | None = None) -> Path:
    """A minimal wsi-run slide folder: report.json, store.zarr/pred/classes and, when
    given, objects.geojson (polygons in um) and cells.geojson (points in um)."""
    folder = out / slide_id
    folder.mkdir(parents=True)
    h, w = labels.shape
    report = {"task": task, "complete": True,
              "diagnosis": {"label": diagnosis},
              "slide": {"id": slide_id, "path": f"/nowhere/{slide_id}.svs", "mpp": slide_mpp,
                        "width_px": round(w * mpp / slide_mpp),
                        "height_px": round(h * mpp / slide_mpp)},
              "counts": {}, "areas_mm2": {}, "scores": {}}
    (folder / "report.json").write_text(json.dumps(report))
    root = zarr.open_group(str(folder / "store.zarr"), mode="w")
    classes = root.create_array("pred/classes", shape=labels.shape, dtype="uint8",
                                chunks=(64, 64))
    classes[...] = labels
    classes.attrs.update({"mpp": mpp, "legend": {str(k): v for k, v in
                                                  (legend or LEGEND).items()}})
    if objects is not None:
        write_geojson(folder / "objects.geojson",
                      [{"polygon_um": np.asarray(p, float), "name": n, "color": (0, 0, 255)}
                       for n, p in objects], slide_mpp=slide_mpp)
    if cells is not None:
        write_geojson(folder / "cells.geojson",
                      [{"point_um": xy, "name": "Lymphocyte", "color": (0, 0, 0)}
                       for xy in cells], slide_mpp=slide_mpp)
    return folder


def write_mask(truth: Path, stem: str, labels: np.ndarray, mpp: float,
               legend=None) -> None:
    truth.mkdir(exist_ok=True)
    Image.fromarray(labels.astype(np.uint8)).save(truth / f"{stem}.labels.png")
    (truth / f"{stem}.labels.json").write_text(json.dumps(
        {"legend": legend or {"0": "background", "1": "glomerulus"}, "mpp": mpp}))


def square_um(x0: float, y0: float, size: float) -> list[list[float]]:
    return [[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size]]


def write_truth_geojson(truth: Path, stem: str, polygons_um, points_um=(),
                        slide_mpp: float = 0.5) -> None:
    truth.mkdir(exist_ok=True)
    write_geojson(truth / f"{stem}.geojson",
                  [{"polygon_um": np.asarray(p, float), "name": n, "color": (255, 0, 0)}
                   for n, p in polygons_um]
                  + [{"point_um": xy, "name": n, "color": (0, 0, 0)} for n, xy in points_um],
                  slide_mpp=slide_mpp)


# -- metrics by hand ----------------------------------------------------------------------------
def test_dice_and_iou_of_a_10x10_case_by_hand(tmp_path):
    """Prediction: the top 5 rows; truth: the left 5 columns of a 10 x 10 map. Overlap 25
    of 50 + 50 pixels: Dice 2*25/100 = 0.5, IoU 25/75 = 1/3."""
    pred = np.zeros((10, 10), np.uint8)
    pred[:5] = 2
    true = np.zeros((10, 10), np.uint8)
    true[:, :5] = 1
    assert pixel_counts(pred == 2, true == 1).tolist() == [25, 25, 25]
    out, truth = tmp_path / "out", tmp_path / "truth"
    make_output(out, "a", pred)
    write_mask(truth, "a", true, mpp=2.0)
    result = evaluate(out, truth, n_boot=0)
    dice, iou = result["metrics"]["dice/glomerulus"], result["metrics"]["iou/glomerulus"]
    assert dice["value"] == pytest.approx(0.5) and iou["value"] == pytest.approx(1 / 3)
    assert (dice["tp"], dice["fp"], dice["fn"]) == (25, 25, 25)
    assert dice["ci95"] is None    # --bootstrap 0
    # areas in mm2 at 2 um/px: 50 px * 4 um2 each, both sides
    area = result["metrics"]["areas/glomerulus/bland_altman"]
    assert area["value"] == pytest.approx(0.0)
    assert result["per_slide"][0]["metrics"]["areas/glomerulus/bland_altman"]["truth"] \
        == pytest.approx(50 * 4 / 1e6)
    # objects without objects.geojson: components of the map; IoU 1/3 < 0.5: no match
    objects = result["metrics"]["objects/glomerulus/recall"]
    assert (objects["tp"], objects["fp"], objects["fn"]) == (0, 1, 1)
    # the mask at a finer MPP than the map (0.5 um/px, 4x4 pixels per map pixel): the same
    write_mask(truth, "a", np.kron(true, np.ones((4, 4), np.uint8)), mpp=0.5)
    assert evaluate(out, truth, n_boot=0)["metrics"]["dice/glomerulus"]["value"] \
        == pytest.approx(0.5)


def test_points_matching_3_predicted_4_true_by_hand():
    """True A(0,0) B(6,0) C(50,50) D(100,0); predicted p(2.9,0) q(-3.5,0) r(53,50), radius
    4. Greedy nearest-first pairs p-A (2.9) and then leaves q without a partner; the
    optimal matching is p-B (3.1), q-A (3.5), r-C (3.0): 3 true positives, 0 false
    positives, 1 false negative (D): P 1, R 3/4, F1 6/7."""
    truth = np.array([[0, 0], [6, 0], [50, 50], [100, 0]], float)
    pred = np.array([[2.9, 0], [-3.5, 0], [53, 50]], float)
    pi, ti = match_points(pred, truth, 4.0)
    assert sorted(zip(pi.tolist(), ti.tolist(), strict=True)) == [(0, 1), (1, 0), (2, 2)]
    stats = np.array([[3, 0, 1]])
    assert pooled("precision", stats) == 1.0
    assert pooled("recall", stats) == 0.75
    assert pooled("f1", stats) == pytest.approx(6 / 7)
    # inclusive radius; nothing within it: no pairs
    assert len(match_points(pred, truth, 3.0)[0]) == 2   # p-A 2.9 and r-C 3.0 only
    assert len(match_points(pred + 1000, truth, 4.0)[0]) == 0


def test_points_end_to_end_cells_geojson_against_points_csv(tmp_path):
    """The same 3 vs 4 points through the files: cells.geojson (level-0 px) and a points
    CSV (um), shifted away from the slide edge."""
    shift = np.array([20.0, 20.0])
    out, truth = tmp_path / "out", tmp_path / "truth"
    pred_xy = np.array([[2.9, 0], [-3.5, 0], [53, 50]]) + shift
    make_output(out, "s", np.zeros((80, 80), np.uint8), cells=pred_xy)
    truth.mkdir()
    with open(truth / "s.points.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x_um", "y_um", "class"])
        for x, y in np.array([[0, 0], [6, 0], [50, 50], [100, 0]]) + shift:
            writer.writerow([x, y, "lymphocyte"])
    result = evaluate(out, truth, radius_um=4, n_boot=0)
    m = result["metrics"]
    assert m["points/lymphocyte/precision"]["value"] == 1.0
    assert m["points/lymphocyte/recall"]["value"] == 0.75
    assert m["points/lymphocyte/f1"]["value"] == pytest.approx(6 / 7, abs=1e-6)
    assert m["counts/points/lymphocyte/bland_altman"]["value"] == -1
    assert "dice/glomerulus" not in m     # points only: no region truth on this slide


def test_two_objects_with_known_iou():
    """Two 4 x 4 squares 2 columns apart: intersection 8, union 24, IoU 1/3."""
    a = ((0, 0, 4, 4), np.ones((4, 4), bool))
    b = ((0, 2, 4, 6), np.ones((4, 4), bool))
    far = ((10, 10, 12, 12), np.ones((2, 2), bool))
    assert object_ious([a], [b, far]) == pytest.approx(np.array([[1 / 3, 0]]))
    assert len(match_objects([a], [b], 0.5)[0]) == 0
    rows, cols, iou = match_objects([a], [b, far], 0.3)
    assert rows.tolist() == [0] and cols.tolist() == [0] and iou == pytest.approx([1 / 3])


def test_objects_from_geojson_polygons_by_hand(tmp_path):
    """A predicted 20 um square at (0, 0) and a true one at (10, 0) um on a 2 um/px grid:
    10 x 10 map pixels each, 5 columns shared: IoU 50 / 150 = 1/3. A second true square
    far away is missed. At --iou 0.3: 1 TP, 0 FP, 1 FN; at 0.5: 0, 1, 2."""
    out, truth = tmp_path / "out", tmp_path / "truth"
    make_output(out, "g", np.zeros((50, 50), np.uint8),
                objects=[("Glomerulus (normocellular)", square_um(0, 0, 20))])
    write_truth_geojson(truth, "g", [("Glomerulus", square_um(10, 0, 20)),
                                     ("Glomerulus", square_um(60, 60, 20)),
                                     ("Tubule", square_um(0, 60, 10))])
    loose = evaluate(out, truth, iou_min=0.3, n_boot=0)["metrics"]
    r = loose["objects/recall"]
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 1)
    assert r["value"] == 0.5 and loose["objects/precision"]["value"] == 1.0
    strict = evaluate(out, truth, iou_min=0.5, n_boot=0)["metrics"]
    r = strict["objects/glomerulus/recall"]
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 2)
    assert strict["objects/glomerulus/precision"]["value"] == 0.0
    assert strict["counts/objects/glomerulus/bland_altman"]["value"] == -1
    # the map itself predicts nothing: the true squares' 200 pixels are false negatives
    assert strict["dice/glomerulus"]["fn"] == 200 and strict["dice/glomerulus"]["value"] == 0
    assert "dice/tubule" not in strict     # not a class of the task nor of the prediction


def test_bootstrap_over_3_slides_with_a_fixed_seed():
    """Pooled Dice of 3 slides = 2*22 / (2*22 + 3 + 6) = 44/53; any resample's pooled
    Dice lies between the slides' own (a mediant), so the interval does too."""
    stats = np.array([[8, 2, 1], [5, 0, 5], [9, 1, 0]], float)
    value = pooled("dice", stats)
    assert value == pytest.approx(44 / 53)
    ci = bootstrap_ci("dice", stats, 2000, np.random.default_rng(7))
    assert ci == bootstrap_ci("dice", stats, 2000, np.random.default_rng(7))
    lo, hi = ci
    own = [pooled("dice", s[None]) for s in stats]
    assert 0 <= min(own) <= lo <= value <= hi <= max(own) <= 1
    assert lo < hi
    assert bootstrap_ci("dice", stats, 0, np.random.default_rng(7)) is None


def test_bland_altman_by_hand():
    """Differences 1, 0, 3: mean 4/3, SD sqrt(7/3), limits mean -+ 1.96 SD."""
    ba = bland_altman([3, 5, 10], [2, 5, 7])
    assert ba["mean"] == pytest.approx(4 / 3)
    assert ba["sd"] == pytest.approx(np.sqrt(7 / 3))
    assert ba["limits95"] == pytest.approx([4 / 3 - 1.96 * np.sqrt(7 / 3),
                                            4 / 3 + 1.96 * np.sqrt(7 / 3)])
    assert bland_altman([1], [0])["limits95"] is None


def test_class_names_map_through_the_task_annotations():
    assert {"glomerulus", "hypercellular", "glomerulus_hypercellular"} \
        <= aliases("Glomerulus (hypercellular)")
    assert "glomerulus" not in aliases("glomerulus candidate")
    classes = eval_classes({"focus": ("focus", "aggregate")},
                           ["background", "stroma", "focus", "aggregate", "fat", "pen"],
                           ["background", "glandular tissue", "fat", "focus", "aggregate"])
    assert classes == {"focus": frozenset({"focus", "aggregate"}), "fat": frozenset({"fat"})}


# -- a cohort through the command ---------------------------------------------------------------
def test_three_slides_through_the_command(tmp_path, capsys):
    """Three slides, one without truth (skipped with one line, as is a fourth folder
    without a store); true diagnoses from a CSV (1 of the 2 scored slides right);
    eval.json, eval.csv and both plots written."""
    out, truth = tmp_path / "out", tmp_path / "truth"
    masks = {"a": (slice(0, 5), slice(0, 10)), "b": (slice(0, 10), slice(0, 5)),
             "c": (slice(2, 8), slice(2, 8))}
    for k, (stem, box) in enumerate(masks.items()):
        pred = np.zeros((10, 10), np.uint8)
        pred[:5] = 2
        true = np.zeros((10, 10), np.uint8)
        true[box] = 1
        make_output(out, stem, pred, diagnosis=["M1", "M0", "M0"][k])
        if stem != "c":
            write_mask(truth, stem, true, mpp=2.0)
    (out / "d").mkdir()    # a run that stopped before its store was written
    (out / "d" / "report.json").write_text((out / "a" / "report.json").read_text())
    dx = tmp_path / "dx.csv"
    dx.write_text("slide,label\na,M1\nb,M1\n")
    assert main([str(out), "--truth", str(truth), "--bootstrap", "200", "--seed", "3",
                 "--diagnoses", str(dx)]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and skipped[0].startswith("wsi-eval: skipped: c: no truth")
    assert skipped[1] == "wsi-eval: skipped: d: no store.zarr beside report.json"
    result = json.loads((out / "eval.json").read_text())
    assert result["slides"] == 2 and [s["slide"] for s in result["per_slide"]] == ["a", "b"]
    assert [s["slide"] for s in result["skipped"]] == ["c", "d"]
    m = result["metrics"]
    # a: pred = truth (50 px); b: 25 shared of 50 + 50: pooled 2*75 / (150 + 25 + 25)
    assert m["dice/glomerulus"]["value"] == pytest.approx(150 / 200)
    assert [s["metrics"]["dice/glomerulus"]["value"] for s in result["per_slide"]] \
        == pytest.approx([1.0, 0.5])
    lo, hi = m["dice/glomerulus"]["ci95"]
    assert 0.5 <= lo <= m["dice/glomerulus"]["value"] <= hi <= 1.0
    assert m["diagnosis/accuracy"]["value"] == 0.5
    assert result["diagnosis_confusion"] == {"labels": ["M0", "M1"], "matrix": [[0, 0], [1, 1]],
                                             "rows": "truth", "columns": "prediction"}
    assert set(result["plots"]) == {"bland_altman.png", "confusion.png"}
    for name in result["plots"]:
        assert Image.open(out / name).size[0] > 100
    rows = list(csv.DictReader(open(out / "eval.csv")))
    assert {r["slide"] for r in rows} == {"(pooled)", "a", "b"}
    pooled_dice = next(r for r in rows if r["slide"] == "(pooled)"
                       and r["metric"] == "dice/glomerulus")
    assert float(pooled_dice["value"]) == pytest.approx(0.75)
    assert float(pooled_dice["ci95_low"]) == pytest.approx(lo)
    n_per_slide = sum(len(s["metrics"]) for s in result["per_slide"])
    assert len(rows) == len(m) + n_per_slide
    assert "dice/glomerulus" in captured.out


@pytest.mark.parametrize("case", ["not_wsi_run", "no_truth", "bad_geojson", "missing_out",
                                  "bad_iou", "no_truth_dir", "nothing_to_score"])
def test_failures_are_one_line(tmp_path, capsys, case):
    out, truth = tmp_path / "out", tmp_path / "truth"
    truth.mkdir()
    make_output(out, "a", np.zeros((10, 10), np.uint8))
    args = [str(out), "--truth", str(truth)]
    code = 1
    if case == "not_wsi_run":
        args[0] = str(truth)
    elif case == "bad_geojson":
        (truth / "a.geojson").write_text("{not json")
    elif case == "missing_out":
        args[0] = str(tmp_path / "nothing")
    elif case == "bad_iou":
        args += ["--iou", "1.5"]
        code = 2
    elif case == "nothing_to_score":   # a mask of a class neither task nor map knows
        write_mask(truth, "a", np.ones((10, 10), np.uint8), 2.0, {"1": "tubule"})
    elif case == "no_truth_dir":
        args[2] = str(tmp_path / "nothing")
        code = 2
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("wsi-eval: error: ") and "Traceback" not in "".join(err)
    if case == "no_truth":
        assert len(err) == 2 and "skipped: a" in err[0]
    if case == "nothing_to_score":
        assert err[0] == ("wsi-eval: note: truth classes not scored (no glomeruli or "
                          "prediction class of that name): tubule")
        assert "nothing to score" in err[-1]


# -- end to end: a synthetic fls slide ----------------------------------------------------------
@pytest.fixture(scope="module")
def fls_eval(tmp_path_factory):
    """wsi-synth (3000 x 2400 px, positive) -> wsi-run --model classical -> wsi-eval."""
    from wsi_pipeline.cli import main as run_main
    from wsi_pipeline.synth import write_slide

    base = tmp_path_factory.mktemp("fls_eval")
    slide = base / "slides" / "fls1.svs"
    slide.parent.mkdir()
    write_slide("fls", slide, width=3000, height=2400, mpp=0.5, seed=0, label="positive")
    out = base / "out"
    assert run_main([str(slide), "--task", "fls", "--model", "classical", "--out", str(out),
                     "--quiet", "--workers", "1"]) == 0
    assert main([str(out), "--truth", str(slide.parent), "--bootstrap", "100",
                 "--quiet"]) == 0
    return slide, out, json.loads((out / "eval.json").read_text())


def test_end_to_end_on_a_synthetic_fls_slide(fls_eval):
    from wsi_pipeline.synth import truth_labels_on_grid

    slide, out, result = fls_eval
    m = result["metrics"]
    assert result["slides"] == 1 and result["task"] == "fls"
    assert set(result["per_slide"][0]["truth"]) == {"fls1.truth.zarr", "fls1.truth.json"}
    # focus Dice by hand: map classes focus/aggregate (3, 4) against truth 5, 6 on its grid
    classes = zarr.open_group(str(out / "fls1" / "store.zarr"), mode="r")["pred/classes"]
    pred = np.isin(np.asarray(classes), [3, 4])
    true = np.isin(truth_labels_on_grid(slide, classes.shape, classes.attrs["mpp"]), [5, 6])
    by_hand = 2 * (pred & true).sum() / (pred.sum() + true.sum())
    assert m["dice/focus"]["value"] == pytest.approx(by_hand, abs=1e-6)
    assert 0 < by_hand <= 1
    # the report's counts against truth.json's
    report = json.loads((out / "fls1" / "report.json").read_text())
    truth = json.loads(slide.with_name("fls1.truth.json").read_text())
    assert m["report/counts/foci/bland_altman"]["value"] \
        == report["counts"]["foci"] - truth["counts"]["foci"]
    assert m["diagnosis/accuracy"]["value"] \
        == float(report["diagnosis"]["label"] == truth["diagnosis"]["label"])
    # the classical detector's lymphocytes against the truth's nucleus centres
    assert m["points/lymphocyte/recall"]["value"] > 0.5
    found = zarr.open_group(str(out / "fls1" / "store.zarr"), mode="r")["pred/lymphocytes"]
    assert m["counts/points/lymphocyte/bland_altman"]["value"] \
        == found.shape[0] - truth["counts"]["lymphocytes_total"]
    for entry in m.values():
        if entry["ci95"] is not None and entry["value"] is not None:
            assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    assert (out / "bland_altman.png").is_file() and (out / "confusion.png").is_file()


# -- real PAS kidney tiles ----------------------------------------------------------------------
REAL_TILES = ("10164", "10215")   # two glomeruli (one cut by the edge); a 354 px fragment


@pytest.fixture(scope="module")
def kidney_eval(tmp_path_factory):
    """Two real tiles as slides (`tiles_to_slides`), the bundled detector (mesangial),
    then wsi-eval against their masks."""
    from wsi_pipeline.cli import main as run_main
    from wsi_pipeline.tiles import tiles_to_slides

    source = shared("glomeruli-pas")
    base = tmp_path_factory.mktemp("kidney_eval")
    picked = base / "tiles"
    for part in ("images", "masks"):
        (picked / part).mkdir(parents=True)
        for name in REAL_TILES:
            shutil.copy(source / part / f"{name}.png", picked / part / f"{name}.png")
    slides = tiles_to_slides(picked, base / "slides", mpp=0.5,
                             colours={(255, 0, 0): "glomerulus"})
    out = base / "out"
    assert run_main([*map(str, slides), "--task", "mesangial", "--out", str(out), "--quiet",
                     "--workers", "1"]) == 0
    assert main([str(out), "--truth", str(base / "slides"), "--quiet"]) == 0
    return source, base, out, json.loads((out / "eval.json").read_text())


def test_real_tiles_counts_match_a_hand_count(kidney_eval):
    source, base, out, result = kidney_eval
    per_slide = {s["slide"]: s["metrics"] for s in result["per_slide"]}
    assert set(per_slide) == set(REAL_TILES)
    n_true = 0
    for name in REAL_TILES:
        mask = (np.asarray(Image.open(source / "masks" / f"{name}.png").convert("RGB"))
                == (255, 0, 0)).all(-1)
        hand = ndimage.label(mask, structure=np.ones((3, 3)))[1]   # 2 and 1 glomeruli
        m = per_slide[name]
        recall = m["objects/glomerulus/recall"]
        assert recall["tp"] + recall["fn"] == hand
        n_true += hand
        # predicted objects: the features of objects.geojson
        features = json.loads((out / name / "objects.geojson").read_text())["features"]
        assert recall["tp"] + recall["fp"] == len(features)
        # Dice by hand on the 2 um/px map: the mask's pixel at each map pixel's centre
        classes = zarr.open_group(str(out / name / "store.zarr"), mode="r")["pred/classes"]
        pred = np.isin(np.asarray(classes), [2, 3])
        true = mask[2::4, 2::4]
        dice = m["dice/glomerulus"]
        assert (dice["tp"], dice["fp"], dice["fn"]) == (
            (pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum())
        assert m["areas/glomerulus/bland_altman"]["truth"] == pytest.approx(true.sum() * 4e-6)
    pooled_recall = result["metrics"]["objects/glomerulus/recall"]
    assert pooled_recall["tp"] + pooled_recall["fn"] == n_true == 3
    assert pooled_recall["value"] == pytest.approx(pooled_recall["tp"] / 3)


def test_real_tile_object_iou_by_hand(kidney_eval):
    """The detection on 10164 against its glomeruli at the masks' own resolution: a match
    at IoU >= 0.5 exactly when wsi-eval counts one (its IoU on the coarser map grid is
    within a few hundredths)."""
    from skimage.draw import polygon

    source, _, out, result = kidney_eval
    mask = (np.asarray(Image.open(source / "masks" / "10164.png").convert("RGB"))
            == (255, 0, 0)).all(-1)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    best = 0.0
    for feature in json.loads((out / "10164" / "objects.geojson").read_text())["features"]:
        ring = np.asarray(feature["geometry"]["coordinates"][0])   # level-0 px, 0.5 um/px
        pred = np.zeros_like(mask)
        rr, cc = polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, mask.shape)
        pred[rr, cc] = True
        for k in range(1, n + 1):
            true = labels == k
            best = max(best, (pred & true).sum() / (pred | true).sum())
    tp = {s["slide"]: s for s in result["per_slide"]}["10164"]["metrics"][
        "objects/glomerulus/recall"]["tp"]
    if abs(best - 0.5) > 0.05:
        assert tp == int(best >= 0.5)
