"""`liver` end to end with the bundled demo weights on held-out synthetic patients (cohort
seed 9300, never used for training), scored against the generator's truth: per-slide and
per-patient diagnosis (r over the patient's slides, ``cases.csv``), tumour Dice, areas,
exports; and a patient with a slide of another stain."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_pipeline.cli import main
from wsi_pipeline.synth import truth_labels_on_grid

SIZE = (2560, 2048)  # 1.3 x 1 mm at 0.5 um/px


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from wsi_pipeline.synth.liver import write_liver_cohort

    folder = tmp_path_factory.mktemp("liver_cohort")
    rows = write_liver_cohort(folder, 2, 2, 9300, *SIZE, slides_per_patient=(1, 2))
    out = tmp_path_factory.mktemp("liver_out")
    assert main([str(folder / "cohort.csv"), "--task", "liver", "--out", str(out),
                 "--quiet"]) == 0
    return folder, rows, out


def _report(out: Path, row: dict) -> dict:
    return json.loads((out / Path(row["slide"]).stem / "report.json").read_text())


def test_each_slide_and_each_patient_gets_its_diagnosis(cohort):
    folder, rows, out = cohort
    assert {r["diagnosis"] for r in rows} == {"HCC", "CCA"} and len(rows) >= 3
    for row in rows:
        report = _report(out, row)
        assert report["diagnosis"]["label"] == row["diagnosis"], row
        r = report["scores"]["hcc_fraction"]
        assert (r > 0.9) if row["diagnosis"] == "HCC" else (r < 0.1), (row, r)
        assert report["provenance"]["model"]["demo"] is True
    with open(out / "cases.csv", newline="") as f:
        cases = {c["patient_id"]: c for c in csv.DictReader(f)}
    truth = {r["patient_id"]: r["diagnosis"] for r in rows}
    assert {p: c["diagnosis"] for p, c in cases.items()} == truth
    for patient, case in cases.items():
        n = sum(r["patient_id"] == patient for r in rows)
        assert int(case["slides"]) == n and case["status"] == "ok"


def test_tumour_dice_and_areas_against_the_truth(cohort):
    folder, rows, out = cohort
    tp = pred_n = true_n = 0
    for row in rows:
        slide = folder / row["slide"]
        classes = zarr.open_group(str(out / slide.stem / "store.zarr"), mode="r")["pred/classes"]
        pred = np.asarray(classes)
        true = truth_labels_on_grid(slide, pred.shape, float(classes.attrs["mpp"]))
        tumour = 2 if row["diagnosis"] == "HCC" else 3
        # class-aware: a tumour pixel counts when it is called the right tumour
        tp += int(((pred == tumour) & (true == tumour)).sum())
        pred_n += int(np.isin(pred, (2, 3)).sum())
        true_n += int((true == tumour).sum())
        truth = json.loads(slide.with_suffix(".truth.json").read_text())
        report = _report(out, row)
        key = row["diagnosis"].lower()
        assert report["areas_mm2"][key] == pytest.approx(truth["areas_mm2"][key], rel=0.2)
    dice = 2 * tp / (pred_n + true_n)
    assert dice >= 0.8, dice


def test_liver_exports_tumour_regions(cohort):
    folder, rows, out = cohort
    row = rows[0]
    slide_out = out / Path(row["slide"]).stem
    features = json.loads((slide_out / "objects.geojson").read_text())["features"]
    names = {f["properties"]["classification"]["name"] for f in features}
    assert names == {row["diagnosis"]}
    assert (slide_out / "mask.ome.tif").stat().st_size > 0


def test_another_tasks_slides_in_the_same_out_never_enter_the_patient_rule(cohort, tmp_path):
    """The README's demo then ``--task liver`` into the same --out crashed (KeyError 'hcc':
    the fls row of summary.csv was fed to the liver patient rule)."""
    import shutil

    folder, rows, out = cohort
    other = tmp_path / "salivary.svs"
    shutil.copy(folder / rows[0]["slide"], other)
    assert main([str(other), "--task", "fls", "--model", "classical", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads((out / "salivary" / "report.json").read_text())["complete"] is True
    assert main([str(folder / "cohort.csv"), "--task", "liver", "--out", str(out),
                 "--quiet"]) == 0   # every stage reused; the rule reads liver rows only
    with open(out / "cases.csv", newline="") as f:
        cases = {c["patient_id"]: c for c in csv.DictReader(f)}
    assert set(cases) == {r["patient_id"] for r in rows}
    assert all(c["status"] == "ok" and "salivary" not in c["slide_ids"]
               for c in cases.values())


def test_a_patient_slide_listed_with_another_stain_is_left_out_and_said(cohort, tmp_path):
    folder, rows, out = cohort
    first = rows[0]
    other = tmp_path / "pas.svs"
    other.write_bytes((folder / first["slide"]).read_bytes())   # never opened: skipped
    listing = tmp_path / "list.csv"
    listing.write_text("path,patient_id,stain\n"
                       f"{folder / first['slide']},{first['patient_id']},H&E\n"
                       f"{other},{first['patient_id']},PAS\n")
    assert main([str(listing), "--task", "liver", "--out", str(out), "--quiet"]) == 0
    with open(out / "summary.csv", newline="") as f:
        status = {r["slide_id"]: r for r in csv.DictReader(f)}
    assert status["pas"]["status"] == "skipped" and "PAS" in status["pas"]["error"]
    assert not (out / "pas").exists()
    with open(out / "cases.csv", newline="") as f:
        case = {c["patient_id"]: c for c in csv.DictReader(f)}[first["patient_id"]]
    assert case["diagnosis"] == first["diagnosis"] and case["status"] == "ok"
    assert "pas" in case["note"] and "PAS" in case["note"]
    listing.write_text(f"path,stain\n{other},Giemsa\n")
    assert main([str(listing), "--task", "liver", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 1
