"""Folder batches: glob patterns, CSV lists with per-slide MPP, --config, the end summary,
and the per-slide lock between two real wsi-run processes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_generic_tiff

from wsi_pipeline.batch import expand_inputs
from wsi_pipeline.cli import main
from wsi_pipeline.errors import SlideLocked
from wsi_pipeline.lock import LOCK_NAME, slide_lock

WSI_RUN = [sys.executable, "-m", "wsi_pipeline.cli"]


@pytest.fixture(scope="module")
def slides(fls_slide, tmp_path_factory) -> Path:
    """A folder with two copies of the small fls slide, one slide without MPP in a
    sub-folder, and truth sidecars that must be ignored."""
    from wsi_pipeline.slide import open_slide

    folder = tmp_path_factory.mktemp("slides")
    shutil.copy(fls_slide[0], folder / "a.svs")
    shutil.copy(fls_slide[0], folder / "b.svs")
    (folder / "a.truth.json").write_text("{}")
    (folder / "sub").mkdir()
    with open_slide(fls_slide[0]) as slide:
        rgb = np.asarray(slide.read(0.0, 0.0, 1536, 1536, 1.0))
    write_generic_tiff(folder / "sub" / "nompp.tif", rgb, mpp=None)
    return folder


def read_summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


def test_glob_patterns(slides):
    jobs = expand_inputs([str(slides / "*.svs")])
    assert [(j.slide_id, Path(j.path).name, j.error) for j in jobs] == [
        ("a", "a.svs", None), ("b", "b.svs", None)]
    deep = expand_inputs([str(slides / "**" / "*.tif")])
    assert [j.slide_id for j in deep] == ["nompp"]
    (none,) = expand_inputs([str(slides / "*.ndpi")])
    assert none.error is not None and "matches no slide" in str(none.error)


def test_csv_list_with_per_slide_mpp(slides, tmp_path, capsys):
    listing = tmp_path / "list.csv"
    rel = os.path.relpath(slides, tmp_path)
    listing.write_text("path,mpp,slide_id\n"
                       f"{rel}/a.svs,,first\n"
                       f"{rel}/sub/nompp.tif,1.0,\n"
                       f"{rel}/missing.svs,,\n"
                       f"{rel}/b.svs,abc,\n")
    jobs = expand_inputs([str(listing)])
    assert [j.slide_id for j in jobs] == ["first", "nompp", "missing", "b"]
    assert jobs[1].mpp == 1.0 and jobs[0].mpp is None
    assert "no such file" in str(jobs[2].error) and "line 4" in str(jobs[2].error)
    assert "mpp 'abc'" in str(jobs[3].error)

    out = tmp_path / "o"
    code = main([str(listing), "--task", "fls", "--out", str(out), "--until", "tissue"])
    captured = capsys.readouterr()
    assert code == 1
    rows = read_summary(out)
    assert rows["first"]["status"] == rows["nompp"]["status"] == "ok (until tissue)"
    assert rows["missing"]["status"] == rows["b"]["status"] == "failed"
    report = json.loads((out / "nompp" / "report.json").read_text())
    assert report["slide"]["mpp"] == 1.0 and report["slide"]["mpp_source"] == "override (--mpp)"
    # the end-of-run table: one line per input with its status and reason
    assert "4 inputs: 2 ok, 2 failed" in captured.out
    assert "Traceback" not in captured.err
    assert sum("error:" in line for line in captured.err.splitlines()) == 2


def test_csv_list_without_path_column(tmp_path, capsys):
    listing = tmp_path / "bad.csv"
    listing.write_text("file,mpp\nx.svs,0.5\n")
    code = main([str(listing), "--task", "fls", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "needs a 'path' column" in err and "Traceback" not in err


def test_config_file_sets_defaults_the_command_line_overrides(slides, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'task = "fls"\nout = "{tmp_path / "o"}"\nuntil = "tissue"\n'
                      "quiet = true\n")
    assert main([str(slides / "a.svs"), "--config", str(config)]) == 0
    assert read_summary(tmp_path / "o")["a"]["status"] == "ok (until tissue)"
    assert main([str(slides / "a.svs"), "--config", str(config), "--out",
                 str(tmp_path / "o2")]) == 0
    assert (tmp_path / "o2" / "a" / "report.json").exists()
    capsys.readouterr()
    config.write_text('task = "fls"\nbatchsize = 3\n')
    assert main([str(slides / "a.svs"), "--config", str(config)]) == 2
    assert "unknown option 'batchsize'" in capsys.readouterr().err
    config.write_text('task = "nope"\n')
    assert main([str(slides / "a.svs"), "--config", str(config)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    config.write_text('task = "fls"\nbackend = "nope"\n')
    assert main([str(slides / "a.svs"), "--config", str(config)]) == 2
    assert "is not one of" in capsys.readouterr().err


# -- locking -----------------------------------------------------------------------------------
def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until it is killed."""
    code = ("import sys, time\nfrom wsi_pipeline.lock import slide_lock\n"
            "with slide_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_names_its_holder_and_a_dead_holder_is_stale(tmp_path):
    holder = hold_lock(tmp_path / "s")
    try:
        with pytest.raises(SlideLocked, match=f"pid {holder.pid} on .* since"):
            with slide_lock(tmp_path / "s"):
                pass
        t0 = time.monotonic()
        with pytest.raises(SlideLocked):
            with slide_lock(tmp_path / "s", wait_s=0.6, poll_s=0.1):
                pass
        assert time.monotonic() - t0 >= 0.6
    finally:
        holder.kill()
        holder.wait()
    # kill -9 left the holder's record behind, but not its lock
    assert json.loads((tmp_path / "s" / LOCK_NAME).read_text())["pid"] == holder.pid
    with slide_lock(tmp_path / "s") as taken:
        assert taken["stale"]["pid"] == holder.pid
        assert json.loads((tmp_path / "s" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (tmp_path / "s" / LOCK_NAME).read_text() == ""  # released: nobody holds it
    with slide_lock(tmp_path / "s") as taken:
        assert taken == {}


def test_second_wsi_run_skips_a_locked_slide_then_waits_for_it(slides, tmp_path):
    out = tmp_path / "o"
    first = subprocess.Popen([*WSI_RUN, str(slides / "a.svs"), "--task", "fls", "--out",
                              str(out), "--until", "pyramid", "--quiet"],
                             stderr=subprocess.PIPE, text=True)
    lock = out / "a" / LOCK_NAME
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(lock.read_text())["pid"] == first.pid
    second = subprocess.run([*WSI_RUN, str(slides / "a.svs"), "--task", "fls", "--out",
                             str(out), "--until", "pyramid", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first run ended before the second one tried"
    assert second.returncode == 1
    assert f"skipped: {out / 'a'}: in use by pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    # with --lock-wait the second run waits, then finds every stage finished
    waited = subprocess.run([*WSI_RUN, str(slides / "a.svs"), "--task", "fls", "--out",
                             str(out), "--until", "pyramid", "--quiet", "--lock-wait", "300"],
                            capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=60) == 0, first.stderr.read()
    assert waited.returncode == 0, waited.stderr
    report = json.loads((out / "a" / "report.json").read_text())
    timings = report["provenance"]["stage_timings"]
    assert all(timings[s]["reused"] for s in ("tissue", "stain", "pyramid"))
    # the skipped run's "locked" row never replaced what the runs that did the work wrote
    assert read_summary(out)["a"]["status"] == "ok (until pyramid)"


def test_summary_merges_runs_into_one_folder(slides, tmp_path):
    """Separate runs into one --out (a SLURM array, two terminals) add up to one summary;
    a row saying a slide was locked never hides a finished one."""
    from wsi_pipeline.batch import write_summary

    for name in ("a", "b"):
        code = main([str(slides / f"{name}.svs"), "--task", "fls", "--out", str(tmp_path),
                     "--until", "tissue", "--quiet"])
        assert code == 0
    assert {k: r["status"] for k, r in read_summary(tmp_path).items()} == {
        "a": "ok (until tissue)", "b": "ok (until tissue)"}
    write_summary(tmp_path, [{"slide_id": "a", "status": "locked", "error": "in use"},
                             {"slide_id": "c", "status": "locked", "error": "in use"}])
    rows = read_summary(tmp_path)
    assert [rows[k]["status"] for k in ("a", "b", "c")] == [
        "ok (until tissue)", "ok (until tissue)", "locked"]


def test_a_killed_run_leaves_a_stale_lock_the_next_run_clears(slides, tmp_path):
    out = tmp_path / "o"
    cmd = [*WSI_RUN, str(slides / "b.svs"), "--task", "fls", "--out", str(out), "--until",
           "pyramid"]
    victim = subprocess.Popen([*cmd, "--quiet"])
    lock = out / "b" / LOCK_NAME
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"cleared a stale lock left by pid {victim.pid}" in rerun.stdout
    assert read_summary(out)["b"]["status"] == "ok (until pyramid)"


def test_sigterm_stops_cleanly_and_the_rerun_resumes(slides, tmp_path):
    """SLURM's time limit and pre-emption send SIGTERM: same clean stop as Ctrl-C."""
    out = tmp_path / "o"
    cmd = [*WSI_RUN, str(slides / "a.svs"), str(slides / "b.svs"), "--task", "fls", "--out",
           str(out), "--until", "pyramid", "--quiet", "--workers", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    markers = out / "a" / "store.zarr" / ".progress" / "pyramid"
    deadline = time.monotonic() + 120
    while not (markers.is_dir() and any(markers.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted; finished stages are kept" in err and "Traceback" not in err
    rows = read_summary(out)
    assert (rows["a"]["status"], rows["b"]["status"]) == ("interrupted", "not run")
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((out / "a" / "report.json").read_text())
    assert report["provenance"]["stage_timings"]["stain"]["reused"] is True
    assert {r["status"] for r in read_summary(out).values()} == {"ok (until pyramid)"}
