"""A sixth task added from outside: the example package examples/plugin_tumour_area is
installed (pip, into a temporary folder on PYTHONPATH) and registers `tumour-area` through
the entry-point group `wsi_pipeline.tasks`, with no edit to wsi_pipeline. `wsi-run --help`
lists it, `wsi-train` trains it on synthetic slides and `wsi-run` runs it end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_pipeline.synth import truth_paths

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "examples" / "plugin_tumour_area"
BIN = Path(sys.executable).parent
SMALL = {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 3,
         "decoder_channels": [16, 8, 8]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(PACKAGE)],
                   check=True, capture_output=True, timeout=300)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run(env: dict, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    done = run(env, str(BIN / "wsi-train"), "--task", "tumour-area", "--synth", "2",
               "--synth-size", "2048x1536", "--out", str(root / "tumour"),
               "--arch-kwargs", json.dumps(SMALL), "--patch-px", "128", "--epochs", "2",
               "--steps-per-epoch", "4", "--batch-size", "4", "--val-patches", "8",
               "--workers", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def test_the_runner_names_no_task():
    """Task-specific behaviour comes through the plugin contract: no task or mode name in
    the runner package (comments and strings included)."""
    from wsi_pipeline.tasks import get_plugin, task_names

    names = set(task_names(trainable=True))
    names |= {m for n in names for m in get_plugin(n, trainable=True).modes}
    names |= {n.replace("-", "_") for n in names}
    runner = ROOT / "wsi_pipeline" / "pipeline"
    for path in sorted(runner.glob("*.py")):
        text = path.read_text().lower()
        assert not [n for n in names if n in text], path


def test_wsi_run_help_lists_the_installed_plugin(env):
    done = run(env, str(BIN / "wsi-run"), "--help")
    assert done.returncode == 0
    assert "tumour-area    Tumour area (plugin example)" in done.stdout
    # without the package, the task does not exist: one line, exit 2
    bare = run({**env, "PYTHONPATH": ""}, str(BIN / "wsi-run"), "x.svs", "--task",
               "tumour-area")
    assert bare.returncode == 2 and bare.stderr.count("\n") == 1
    assert "unknown task 'tumour-area'" in bare.stderr


def test_plugin_trains_and_runs_end_to_end(env, trained, tmp_path):
    meta = json.loads((trained / "tumour.json").read_text())
    assert meta["task"] == "tumour-area" and meta["classes"] == ["tumour"]
    assert meta["mpp"] == 2.0 and meta["architecture"] == "unet"
    slide = tmp_path / "held_out.svs"   # the plugin's own generator, through wsi-synth
    done = run(env, str(BIN / "wsi-synth"), "--task", "tumour-area", "--out", str(slide),
               "--width", "2048", "--height", "1536", "--seed", "9401", "--label", "CCA")
    assert done.returncode == 0 and "diagnosis CCA" in done.stdout, done.stderr
    done = run(env, str(BIN / "wsi-run"), str(slide), "--task", "tumour-area", "--weights",
               str(trained / "tumour.safetensors"), "--out", str(tmp_path / "out"), "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    folder = tmp_path / "out" / "held_out"
    report = json.loads((folder / "report.json").read_text())
    assert report["task"] == "tumour-area" and report["complete"] is True
    areas, fraction = report["areas_mm2"], report["scores"]["tumour_fraction"]
    assert 0 < areas["tissue"] and 0 <= areas["tumour"] <= areas["tissue"]
    assert fraction == pytest.approx(areas["tumour"] / areas["tissue"], abs=1e-4)
    assert report["diagnosis"]["label"] == ("tumour" if fraction >= 0.1 else "no-tumour")
    # the tissue the plugin measured agrees with the synthetic truth's tissue (+-25 %)
    _, truth_zarr = truth_paths(slide)
    labels = zarr.open_group(str(truth_zarr), mode="r")["labels"]
    true_mm2 = float(np.count_nonzero(np.asarray(labels))) * labels.attrs["mpp"] ** 2 / 1e6
    assert areas["tissue"] == pytest.approx(true_mm2, rel=0.25)
    assert report["provenance"]["model"]["sha256"] == meta["sha256"]
    legend = json.loads((folder / "objects.geojson").read_text())["features"]
    assert all(f["properties"]["classification"]["name"] == "Tumour" for f in legend)
    assert (folder / "mask.ome.tif").stat().st_size > 0


def test_plugin_example_script(env, tmp_path):
    done = run(env, sys.executable, str(ROOT / "examples" / "plugin_task.py"), "--tiny",
               cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "wsi-plugin-example" / "results" / "held_out" /
                         "report.json").read_text())
    assert report["task"] == "tumour-area" and report["complete"] is True
    assert f"held_out: {report['diagnosis']['label']}" in done.stdout
