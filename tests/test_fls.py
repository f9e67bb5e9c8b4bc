"""`fls` end to end on held-out synthetic slides: demo weights and the classical mode
against the generator's truth (foci Dice, foci count, diagnosis), exports, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from wsi_pipeline.cli import main
from wsi_pipeline.synth import truth_labels_on_grid
from wsi_pipeline.tasks.fls import FOCUS

# Seeds 300+ are never used for training (the demo cohort uses wsi-train's own seeds).
# name: (seed, label, (width, height) px at 0.5 um/px): as small as still gives the positive
# slide a focus of > 200 lymphocytes and the negative one aggregates but no focus
HELD_OUT = {"pos": (301, "positive", (4000, 3000)), "neg": (302, "negative", (3000, 2400))}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    from wsi_pipeline.synth import write_slide

    folder = tmp_path_factory.mktemp("fls_heldout")
    out = {}
    for name, (seed, label, (width, height)) in HELD_OUT.items():
        path = folder / f"{name}.svs"
        out[name] = path, write_slide("fls", path, width=width, height=height, mpp=0.5,
                                      seed=seed, label=label)
    return out


def _run(cohort, out: Path, *extra: str) -> dict[str, dict]:
    paths = [str(cohort[name][0]) for name in HELD_OUT]
    assert main([*paths, "--task", "fls", "--out", str(out), "--quiet", *extra]) == 0
    return {name: json.loads((out / name / "report.json").read_text()) for name in HELD_OUT}


@pytest.fixture(scope="module")
def network(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("fls_network")
    return out, _run(cohort, out)


@pytest.fixture(scope="module")
def classical(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("fls_classical")
    return out, _run(cohort, out, "--model", "classical")


def _predicted_focus(out: Path, name: str) -> tuple[np.ndarray, float]:
    classes = zarr.open_group(str(out / name / "store.zarr"), mode="r")["pred/classes"]
    return np.asarray(classes) == FOCUS, float(classes.attrs["mpp"])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_demo_weights_find_the_true_foci(cohort, network):
    out, reports = network
    pos_path, pos_truth = cohort["pos"]
    predicted, mpp = _predicted_focus(out, "pos")
    truth = (truth_labels_on_grid(pos_path, predicted.shape, mpp) == 5)
    dice = _dice(predicted, truth)
    n_true, n_found = pos_truth["counts"]["foci"], reports["pos"]["counts"]["foci"]
    print(f"foci Dice {dice:.3f}; foci {n_found} found, {n_true} true")
    assert dice >= 0.8
    assert abs(n_found - n_true) <= 0.1 * n_true
    assert reports["neg"]["counts"]["foci"] <= cohort["neg"][1]["counts"]["foci"] + 0


def test_demo_weights_give_the_true_diagnosis(cohort, network):
    _, reports = network
    for name, (_, truth) in cohort.items():
        report = reports[name]
        assert report["complete"] is True
        assert report["diagnosis"]["label"] == truth["diagnosis"]["label"], name
        assert report["diagnosis"]["adequate"] == truth["diagnosis"]["adequate"], name
        assert "DEMO" in report["diagnosis"]["note"]
        assert report["provenance"]["model"]["demo"] is True
        # glandular area (tissue minus fat and glass) close to the generator's
        glandular, true_glandular = report["areas_mm2"]["glandular"], truth["areas_mm2"][
            "glandular"]
        assert abs(glandular - true_glandular) <= 0.15 * true_glandular, (name, glandular)
        fs = report["scores"]["focus_score"]
        assert fs == pytest.approx(4 * report["counts"]["foci"] / glandular, rel=1e-3)


def test_lymphocyte_counts_of_foci_match_the_truth(cohort, network):
    _, reports = network
    truth_foci = [o for o in cohort["pos"][1]["objects"] if o["type"] == "focus"]
    found = [o for o in reports["pos"]["objects"] if o["class"] == "focus"]
    for t in truth_foci:
        near = [o for o in found if np.hypot(o["centroid_um"][0] - t["x_um"],
                                             o["centroid_um"][1] - t["y_um"]) < 60]
        assert len(near) == 1, t
        assert abs(near[0]["lymphocyte_count"] - t["lymphocytes"]) <= 0.2 * t["lymphocytes"]
        assert near[0]["lymphocyte_count"] >= 50


def test_classical_mode_counts_foci_without_weights(cohort, classical):
    _, reports = classical
    for name, (_, truth) in cohort.items():
        n_true, n_found = truth["counts"]["foci"], reports[name]["counts"]["foci"]
        print(f"{name}: classical foci {n_found}, true {n_true}")
        assert abs(n_found - n_true) <= max(0.2 * n_true, 0), name
        assert reports[name]["diagnosis"]["label"] == truth["diagnosis"]["label"]
        assert reports[name]["provenance"]["model"]["architecture"] == "classical"


def test_exports_open_in_their_readers(cohort, network):
    out, reports = network
    folder = out / "pos"
    slide_mpp = openslide.OpenSlide(str(cohort["pos"][0])).properties[openslide.PROPERTY_NAME_MPP_X]
    # objects.geojson: one QuPath annotation per focus/aggregate, coordinates in slide pixels
    features = json.loads((folder / "objects.geojson").read_text())["features"]
    assert len(features) == len(reports["pos"]["objects"])
    for feature, obj in zip(features, reports["pos"]["objects"], strict=True):
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] in ("Focus", "Aggregate (<50 lymphocytes)")
        assert props["measurements"]["lymphocyte_count"] == obj["lymphocyte_count"]
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        centre_px = np.asarray(obj["centroid_um"]) / float(slide_mpp)
        assert (ring.min(0) <= centre_px).all() and (centre_px <= ring.max(0)).all()
    # mask.ome.tif: pyramidal, working resolution, focus pixels where the report says
    with tifffile.TiffFile(folder / "mask.ome.tif") as tif:
        level0 = tif.series[0].levels[0].asarray()
        assert len(tif.series[0].levels) > 1
    slide = openslide.OpenSlide(str(folder / "mask.ome.tif"))
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    for obj in reports["pos"]["objects"]:
        if obj["class"] == "focus":
            x, y = (np.asarray(obj["centroid_um"]) / 0.5).astype(int)
            assert level0[y - 3:y + 4, x - 3:x + 4].max() == FOCUS
    assert (folder / "overlay.png").stat().st_size > 1000
    summary = (out / "summary.csv").read_text()
    assert "focus_score=" in summary and "positive" in summary


def test_rerun_reuses_every_stage(cohort, network, tmp_path):
    out, reports = network
    again = _run(cohort, out)
    timings = again["pos"]["provenance"]["stage_timings"]
    assert all(t["reused"] for s, t in timings.items() if s != "open")
    assert again["pos"]["counts"] == reports["pos"]["counts"]
    for name in ("mask.ome.tif", "objects.geojson", "overlay.png"):   # reused, not lost
        assert (out / "pos" / name).exists(), name


def test_checkpoint_for_another_task_is_refused_by_name(cohort, tmp_path, capsys):
    from wsi_pipeline.checkpoint import demo_weights, load_checkpoint, save_checkpoint
    from wsi_pipeline.tasks import get_plugin

    model, meta = load_checkpoint(demo_weights(get_plugin("fls")), task="fls")
    other = save_checkpoint(tmp_path / "liver_model", model, {**meta, "task": "liver"})
    code = main([str(cohort["neg"][0]), "--task", "fls", "--out", str(tmp_path / "o"),
                 "--weights", str(other), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert any("liver" in line and "fls" in line for line in err), err
    assert not any("Traceback" in line for line in err)


def test_pickled_checkpoint_is_refused(cohort, tmp_path, capsys):
    import torch

    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "weights.safetensors"
    torch.save({"x": Evil()}, bad)
    (tmp_path / "weights.json").write_text(json.dumps({"task": "fls"}))
    code = main([str(cohort["neg"][0]), "--task", "fls", "--out", str(tmp_path / "o"),
                 "--weights", str(bad), "--quiet"])
    assert code == 1
    assert not marker.exists()
    assert "pickle" in capsys.readouterr().err.lower()
