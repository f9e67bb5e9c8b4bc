"""wsi-run --scheduler: a real dask scheduler and two real workers on 127.0.0.1, one of
them killed (SIGKILL) mid-slide; every slide still finishes with the results of a local run."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_pipeline.synth import write_slide

WSI_RUN = [sys.executable, "-m", "wsi_pipeline.cli"]
ARGS = ["--task", "fls", "--model", "classical", "--workers", "1"]
SLIDES = {"p1": (31, "positive"), "n1": (32, "negative"), "p2": (33, "positive"),
          "n2": (34, "negative")}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cluster_slides")
    for name, (seed, label) in SLIDES.items():
        write_slide("fls", folder / f"{name}.svs", width=2000, height=1500, mpp=0.5,
                    seed=seed, label=label)
    return folder


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory) -> Path:
    """The same batch through wsi-run without a scheduler (in this process)."""
    from wsi_pipeline.cli import main

    out = tmp_path_factory.mktemp("local")
    assert main([str(slides), *ARGS, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A `dask scheduler` and two `dask worker --no-nanny` processes; yields the scheduler
    address and {worker name: Popen}."""
    from distributed import Client

    base = tmp_path_factory.mktemp("dask")
    info = base / "scheduler.json"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard", "--scheduler-file", str(info)],
        cwd=base, env=ENV, stdout=subprocess.DEVNULL, stderr=open(base / "scheduler.log", "w"))]
    workers = {}
    try:
        deadline = time.monotonic() + 60
        while not info.exists():
            assert procs[0].poll() is None and time.monotonic() < deadline, "no scheduler"
            time.sleep(0.05)
        time.sleep(0.1)  # the file is written in one go; let it land
        address = json.loads(info.read_text())["address"]
        for name in ("w0", "w1"):
            workers[name] = subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name,
                 "--nworkers", "1", "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                cwd=base, env=ENV, stdout=subprocess.DEVNULL,
                stderr=open(base / f"{name}.log", "w"))
            procs.append(workers[name])
        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
        yield address, workers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def comparable(report: dict) -> dict:
    """report.json minus what legitimately differs between runs: timings, the command
    line, and how much of the pyramid this particular attempt wrote."""
    report = json.loads(json.dumps(report))
    for key in ("stage_timings", "arguments"):
        report["provenance"].pop(key)
    for key in ("tiles_written", "super_tiles_skipped", "mpx_written"):
        report["pyramid"].pop(key)
    return report


def read_summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


def holder_pid(folder: Path) -> int | None:
    """The pid in a slide's lock file while a process works on it."""
    try:
        return json.loads((folder / ".lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def stages_done(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / "store.zarr" / "manifest.json").read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return set()


def assert_same_results(out: Path, reference: Path, slide_id: str) -> dict:
    got = json.loads((out / slide_id / "report.json").read_text())
    want = json.loads((reference / slide_id / "report.json").read_text())
    assert got["complete"] and got["diagnosis"]["label"] == SLIDES[slide_id][1]
    assert comparable(got) == comparable(want)
    assert np.array_equal(tifffile.imread(out / slide_id / "mask.ome.tif"),
                          tifffile.imread(reference / slide_id / "mask.ome.tif"))
    return got


def test_worker_killed_mid_slide_every_slide_still_completes(cluster, slides, reference,
                                                             tmp_path):
    from distributed import Client

    address, workers = cluster
    pids = {proc.pid: name for name, proc in workers.items()}
    out = tmp_path / "out"
    started = time.monotonic()
    run = subprocess.Popen([*WSI_RUN, str(slides), *ARGS, "--out", str(out),
                            "--scheduler", address], env=ENV, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = None
    while victim is None:  # a worker holding a slide's lock with a stage finished in it
        assert run.poll() is None, run.communicate()[1]
        assert time.monotonic() - started < 90, "no slide got past its first stage"
        for folder in out.glob("*/"):
            pid = holder_pid(folder)
            done = stages_done(folder)
            if pid in pids and "tissue" in done and "measure" not in done:
                victim = folder.name, pids[pid]
                os.kill(pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    workers[victim[1]].wait(timeout=10)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr

    summary = read_summary(out)
    assert sorted(summary) == sorted(SLIDES)
    assert {r["status"] for r in summary.values()} == {"ok"}
    assert {r["path"] for r in summary.values()} == {str(slides / f"{s}.svs") for s in SLIDES}
    for slide_id in SLIDES:
        report = assert_same_results(out, reference, slide_id)
        assert f"{slide_id}: fls diagnosis: {SLIDES[slide_id][1]}" in stdout
        if slide_id == victim[0]:  # rerun elsewhere, reusing what the dead worker finished
            assert report["provenance"]["stage_timings"]["tissue"]["reused"]

    # the killed slide was finished by the surviving worker (progress lines on stderr)
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    finished = {e["slide"]: e["worker"] for e in events if "worker" in e}
    assert sorted(finished) == sorted(SLIDES)
    with Client(address, set_as_default=False) as client:
        names = {w["name"]: a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    assert victim[1] not in names
    (survivor,) = names
    assert finished[victim[0]] == names[survivor]
    assert events[0]["workers"] == 2 and events[0]["gpu_split"] is False


def test_gpu_workers_get_the_model_stages(slides, reference, tmp_path):
    """Workers advertising GPU=1: a slide runs as a CPU task, then a GPU task that reuses
    the CPU task's stages (the resource is a label here; the model runs on the CPU)."""
    from distributed import Client, LocalCluster

    from wsi_pipeline.batch import expand_inputs
    from wsi_pipeline.distributed import run_on_cluster
    from wsi_pipeline.pipeline import RunOptions

    rows, events = [], []
    opts = RunOptions(out=tmp_path, model="classical", workers=1)
    jobs = expand_inputs([str(slides / "p1.svs")])
    with (LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                       dashboard_address=":0", resources={"GPU": 1}) as lc,
          Client(lc.scheduler_address, set_as_default=False) as client):
        client.get_task_stream()  # the scheduler records tasks from here on
        run_on_cluster(jobs, "fls", opts, lc.scheduler_address, on_row=rows.append,
                       log=events.append)
        keys = [t["key"] for t in client.get_task_stream(start=0)]
    assert events[0]["gpu_split"] is True and events[0]["gpu_workers"] == 1
    assert sorted(k.split("-")[1] for k in keys) == ["cpu", "gpu"]
    (row,) = rows
    assert row["status"] == "ok" and row["diagnosis"] == "positive"
    timings = row["_report"]["provenance"]["stage_timings"]
    assert [s for s, t in timings.items() if t["reused"]] == ["tissue", "stain", "pyramid"]
    assert_same_results(tmp_path, reference, "p1")


def test_unreachable_scheduler_is_one_line_exit_2(slides, tmp_path, capsys):
    from wsi_pipeline.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    done = subprocess.run([*WSI_RUN, str(slides), *ARGS, "--out", str(tmp_path),
                           "--scheduler", address], capture_output=True, text=True,
                          env={**ENV, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"},
                          timeout=60)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"wsi-run: error: cannot reach the dask scheduler at {address}: Timed out trying "
        f"to connect to {address} after 1 s"], done.stderr

    assert main([str(slides), *ARGS, "--out", str(tmp_path), "--scheduler",
                 "http://127.0.0.1:8786"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsi-run: error: cannot reach the dask scheduler at "
                          "http://127.0.0.1:8786: unknown address scheme 'http'")
    assert len(err.strip().splitlines()) == 1
