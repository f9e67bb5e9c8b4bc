"""A real wsi-run killed with SIGKILL in the middle of the pyramid resumes where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from wsi_pipeline.synth import write_slide


@pytest.fixture(scope="module")
def medium_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("medium") / "medium.svs"
    write_slide("fls", path, width=6144, height=6144, mpp=0.5, seed=21, label="negative")
    return path


def wsi_run(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", *args, "--quiet", "--workers", "1",
           "--until", "pyramid"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_mid_pyramid_then_resume(medium_slide, tmp_path):
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    proc = wsi_run(str(medium_slide), "--task", "fls", "--out", str(killed_out))
    marks = killed_out / "medium" / "store.zarr" / ".progress" / "pyramid"
    deadline = time.monotonic() + 120
    while not (marks.is_dir() and any(marks.iterdir())):
        assert proc.poll() is None, "wsi-run ended before its first super-tile was marked"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(marks.iterdir()))
    assert not (killed_out / "medium" / "report.json").exists()   # no result that looks done

    resumed = wsi_run(str(medium_slide), "--task", "fls", "--out", str(killed_out))
    assert resumed.wait() == 0, resumed.stderr.read().decode()
    report = json.loads((killed_out / "medium" / "report.json").read_text())
    timings = report["provenance"]["stage_timings"]
    assert timings["tissue"]["reused"] and timings["stain"]["reused"]
    assert report["pyramid"]["super_tiles_skipped"] == done_at_kill
    assert 0 < done_at_kill < report["pyramid"]["super_tiles"]

    clean = wsi_run(str(medium_slide), "--task", "fls", "--out", str(clean_out))
    assert clean.wait() == 0
    for level in ("0", "1", "2"):
        a = zarr.open_group(str(killed_out / "medium" / "store.zarr"), mode="r")[f"image/{level}"]
        b = zarr.open_group(str(clean_out / "medium" / "store.zarr"), mode="r")[f"image/{level}"]
        assert np.array_equal(np.asarray(a[...]), np.asarray(b[...]))
