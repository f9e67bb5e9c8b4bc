"""Every script in examples/ runs at tiny size and says what it should: the Python API on
one slide, a folder with a plot, training from QuPath GeoJSON, a dask cluster run. (The
plugin example runs in test_plugin.py, which installs its package.)"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, cwd: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--tiny", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_analyse_one_slide(tmp_path):
    out = run_example("analyse_one_slide.py", tmp_path)
    report = json.loads((tmp_path / "wsi-out" / "example_slide" / "report.json").read_text())
    assert report["task"] == "fls" and report["complete"] is True
    assert f"example_slide: {report['diagnosis']['label']} (" in out
    assert "pyramid level 0.5 um/px: (2400, 3000, 3)" in out
    assert "pyramid level 2.0 um/px: (600, 750, 3)" in out


def test_folder_summary_plot(tmp_path):
    out = run_example("folder_summary_plot.py", tmp_path)
    with open(tmp_path / "wsi-out" / "summary.csv", newline="") as f:
        rows = {r["slide_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"case_1", "case_2", "case_3"}
    assert all(r["status"] == "ok" and r["task"] == "fls" for r in rows.values())
    # the synthetic truth: case_1 and case_3 positive, case_2 negative
    assert [rows[c]["diagnosis"] for c in ("case_1", "case_2", "case_3")] == \
        ["positive", "negative", "positive"]
    plot = np.asarray(Image.open(tmp_path / "wsi-out" / "scores.png").convert("RGB"))
    assert plot.shape[0] == 300 and (np.abs(plot.astype(int) - (213, 94, 0)).sum(-1) < 30).any()
    assert "plot:" in out


def test_train_from_qupath_geojson(tmp_path):
    out = run_example("train_from_qupath.py", tmp_path)
    root = tmp_path / "wsi-train-example"
    features = json.loads((root / "annotated" / "biopsy_1.geojson").read_text())["features"]
    assert features and features[0]["properties"]["classification"]["name"] == "Focus"
    assert not list((root / "annotated").glob("*.truth.*"))   # trained from GeoJSON only
    meta = json.loads((root / "my_fls_model.json").read_text())
    used = [*meta["training"]["slides"]["train"], *meta["training"]["slides"]["validation"]]
    assert meta["task"] == "fls" and sorted(s["id"] for s in used) == ["biopsy_1", "biopsy_2"]
    assert {s["annotations"] for s in used} == {"geojson"}
    report = json.loads((root / "results" / "biopsy_1" / "report.json").read_text())
    assert report["provenance"]["model"]["sha256"] == meta["sha256"]
    assert "my_fls_model.safetensors" in out


def test_dask_cluster(tmp_path):
    out = run_example("dask_cluster.py", tmp_path)
    with open(tmp_path / "wsi-out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["slide_id"] for r in rows) == ["slide_1", "slide_2"]
    assert all(r["status"] == "ok" and r["diagnosis"] for r in rows)
    assert "exit code 0" in out
