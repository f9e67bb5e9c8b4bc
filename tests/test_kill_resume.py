"""Crash-safe resume: a real ``wsi-run`` (network model, bundled demo weights) killed with
SIGKILL between stages and in the middle of the pyramid, inference, measure and export
stages. Each rerun of the same command reuses what had finished before its kill (stages,
pyramid super-tiles, inference bands), and the run that finishes leaves a report and masks
identical to those of an uninterrupted run.

To stay within a couple of minutes on two cores, the kills form one chain in one output
folder (each rerun is the next run killed), so the whole chain costs about one full run;
``--force`` is checked on a folder left by a kill. The slide (2560 x 2304 px at 0.5 um/px)
is as small as still gives four pyramid super-tiles (2048 px each) and two inference bands
(2048 level-0 rows each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr

SLIDE_ID = "kill"
STAGES = ("tissue", "stain", "pyramid", "infer", "stitch", "measure", "export")
ARRAYS = ("image/0", "image/1", "image/2", "tiles", "tissue/mask", "pred/prob", "pred/labels",
          "pred/classes")
# what a report says about the work one run did (or about the clock), not about the slide
VOLATILE = {"pyramid": ("tiles_written", "super_tiles_skipped", "mpx_written"),
            "inference": ("windows", "windows_skipped", "seconds", "model_seconds",
                          "windows_per_s")}


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    from wsi_pipeline.synth import write_slide

    path = tmp_path_factory.mktemp("kill-slide") / f"{SLIDE_ID}.svs"
    write_slide("fls", path, width=2560, height=2304, mpp=0.5, seed=5, label="positive")
    return path


def start(slide: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    """``wsi-run SLIDE --task fls --out out`` in ``cwd``: the same argv in every folder, so
    the reports' ``provenance.arguments`` agree."""
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", str(slide), "--task", "fls", "--out",
           "out", "--workers", "1", "--batch-size", "4", "--device", "cpu", *extra]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen) -> list[dict[str, Any]]:
    """Wait for a run that must succeed; its stage log events."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    assert "Traceback" not in err
    return events(err)


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines (one per stage start/end) that wsi-run writes when not on a
    terminal."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def stages_with(log: list[dict[str, Any]], status: str) -> list[str]:
    return [e["stage"] for e in log if e["status"] == status]


@pytest.fixture(scope="module")
def reference(slide, tmp_path_factory) -> Path:
    """The slide folder of one uninterrupted run."""
    cwd = tmp_path_factory.mktemp("reference")
    finish(start(slide, cwd))
    return cwd / "out" / SLIDE_ID


def manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "store.zarr" / "manifest.json").read_text())["stages"]
    except FileNotFoundError:
        return {}


def markers(folder: Path, stage: str) -> dict[str, int]:
    """Progress marker name -> mtime (ns) of ``stage``."""
    d = folder / "store.zarr" / ".progress" / stage
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()} if d.is_dir() else {}


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str,
              timeout_s: float = 180) -> list[dict[str, Any]]:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 2 ms); its log events."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"wsi-run ended (exit {proc.returncode}) before {what}:\n{err}")
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return events(err)


def comparable(report: dict[str, Any], *, arguments: bool = True) -> dict[str, Any]:
    """``report`` without timings and the per-run work counters (and without the command
    line unless ``arguments``)."""
    report = json.loads(json.dumps(report))
    del report["provenance"]["stage_timings"]
    if not arguments:
        del report["provenance"]["arguments"]
    for section, keys in VOLATILE.items():
        for key in keys:
            (report.get(section) or {}).pop(key, None)
    return report


def assert_same_results(folder: Path, reference: Path, *, arguments: bool = True) -> None:
    """Report (minus timings), store arrays, mask pixels, GeoJSON and overlay identical."""
    report = json.loads((folder / "report.json").read_text())
    expected = json.loads((reference / "report.json").read_text())
    assert report["complete"] and report["diagnosis"]["label"] is not None
    assert comparable(report, arguments=arguments) == comparable(expected, arguments=arguments)
    got = zarr.open_group(str(folder / "store.zarr"), mode="r")
    want = zarr.open_group(str(reference / "store.zarr"), mode="r")
    for name in ARRAYS:
        a, b = np.asarray(got[name][...]), np.asarray(want[name][...])
        assert a.shape == b.shape and np.array_equal(a, b), name
    with tifffile.TiffFile(folder / "mask.ome.tif") as a, \
            tifffile.TiffFile(reference / "mask.ome.tif") as b:
        levels_a, levels_b = a.series[0].levels, b.series[0].levels
        assert len(levels_a) == len(levels_b) > 1
        for la, lb in zip(levels_a, levels_b, strict=True):
            assert np.array_equal(la.asarray(), lb.asarray())
    for name in ("objects.geojson", "overlay.png"):
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    assert json.loads((reference / "objects.geojson").read_text())["features"]


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of interrupted writes under ``folder`` (ours: hidden
    ``.NAME.*.tmp`` and ``.NAME.levels-*``; zarr's: ``*.partial``)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith((".tmp", ".partial")) or ".levels-" in p.name)


def new_marker(folder: Path, stage: str) -> Callable[[], bool]:
    """True once ``stage`` has a progress marker that was not there when this was called."""
    seen = set(markers(folder, stage))
    return lambda: bool(set(markers(folder, stage)) - seen)


def recorded(folder: Path, stage: str) -> Callable[[], bool]:
    return lambda: stage in manifest(folder)


def writing(folder: Path, name: str) -> Callable[[], bool]:
    """True while ``name`` is being written (its temporary file exists)."""
    return lambda: any(folder.glob(f".{name}.*.tmp"))


# the chain, in order: (name, what is awaited, trigger factory over the slide folder)
KILLS = (
    ("between stages", "the manifest recording 'stain'", lambda f: recorded(f, "stain")),
    ("mid-pyramid", "a new super-tile marker", lambda f: new_marker(f, "pyramid")),
    ("mid-infer", "a new inference band marker", lambda f: new_marker(f, "infer-prob")),
    ("mid-measure", "the manifest recording 'stitch'", lambda f: recorded(f, "stitch")),
    ("mid-export", "a half-written mask.ome.tif", lambda f: writing(f, "mask.ome.tif")),
)


def test_sigkill_at_every_stage_then_rerun_finishes_identically(slide, reference, tmp_path):
    folder = tmp_path / "out" / SLIDE_ID
    tiles_total = bands_total = None
    for name, what, trigger in KILLS:
        before = manifest(folder)
        tiles, bands = markers(folder, "pyramid"), markers(folder, "infer-prob")
        log = kill_when(start(slide, tmp_path), trigger(folder), f"{what} ({name})")
        # what finished before this run was reused as it was, never redone
        assert stages_with(log, "reused") == [s for s in STAGES if s in before], name
        assert not set(stages_with(log, "started")) & set(before), name
        now = manifest(folder)
        assert {s: now[s] for s in before} == before, name
        for stage, old in (("pyramid", tiles), ("infer-prob", bands)):
            new = markers(folder, stage)
            assert {k: new[k] for k in old} == old, (name, stage)  # a redone unit is re-touched
        assert not (folder / "report.json").exists(), name  # nothing that looks finished
        done = [s for s in STAGES if s in now]
        assert done == list(STAGES[:len(done)]) and len(done) < len(STAGES), name
        if name == "mid-pyramid":
            tiles_total = len(markers(folder, "pyramid"))
            assert "pyramid" not in now and tiles_total > len(tiles), name
        if name == "mid-infer":
            bands_total = len(markers(folder, "infer-prob"))
            assert "infer" not in now and bands_total > len(bands), name
        if name == "mid-export":
            assert not (folder / "mask.ome.tif").exists()  # never half a file under its name

    before = manifest(folder)
    log = finish(start(slide, tmp_path))
    assert stages_with(log, "reused") == [s for s in STAGES if s in before]
    report = json.loads((folder / "report.json").read_text())
    timings = report["provenance"]["stage_timings"]
    assert [s for s in STAGES if timings[s]["reused"]] == [s for s in STAGES if s in before]
    assert {s: manifest(folder)[s] for s in before} == before
    assert_same_results(folder, reference)
    assert leftovers(folder) == []
    # the pyramid and inference stages resumed: some units came from the killed runs
    assert 0 < tiles_total < report["pyramid"]["super_tiles"]
    assert report["pyramid"]["super_tiles_skipped"] == tiles_total
    assert 0 < bands_total < report["inference"]["bands"]
    assert 0 < report["inference"]["windows_skipped"] < report["inference"]["windows_total"]


def test_force_after_a_kill_recomputes_everything(slide, reference, tmp_path):
    """``--force`` trusts nothing a killed run left: no stage and no super-tile is reused
    (up to the pyramid, to spare a second full inference)."""
    folder = tmp_path / "out" / SLIDE_ID
    kill_when(start(slide, tmp_path), new_marker(folder, "pyramid"), "a super-tile marker")
    stamps = {s: e["finished_at"] for s, e in manifest(folder).items()}
    assert set(stamps) == {"tissue", "stain"}
    tiles = markers(folder, "pyramid")
    time.sleep(1.1)  # finished_at has a resolution of one second
    log = finish(start(slide, tmp_path, "--force", "--until", "pyramid"))
    assert stages_with(log, "reused") == []
    assert stages_with(log, "done") == ["tissue", "stain", "pyramid"]
    report = json.loads((folder / "report.json").read_text())
    assert not any(t["reused"] for t in report["provenance"]["stage_timings"].values())
    assert report["pyramid"]["super_tiles_skipped"] == 0
    assert all(manifest(folder)[s]["finished_at"] != t for s, t in stamps.items())
    assert all(markers(folder, "pyramid")[k] != t for k, t in tiles.items())
    for stage in ("tissue", "stain", "pyramid"):  # nothing skipped: even the counts agree
        assert manifest(folder)[stage]["result"] == manifest(reference)[stage]["result"]
    got = zarr.open_group(str(folder / "store.zarr"), mode="r")
    want = zarr.open_group(str(reference / "store.zarr"), mode="r")
    for name in ("image/0", "image/1", "image/2", "tiles", "tissue/mask"):
        assert np.array_equal(np.asarray(got[name][...]), np.asarray(want[name][...])), name
