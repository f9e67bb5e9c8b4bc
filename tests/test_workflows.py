"""workflows/: the Snakemake workflow run for real (local executor) on tiny synthetic slides,
and the SLURM array script run by bash with SLURM's array variables set by hand."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_pipeline.batch import SUMMARY_FIELDS

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflows" / "Snakefile"
SLURM_SCRIPT = REPO / "workflows" / "slurm_array.sh"
BIN = Path(sys.executable).parent
SLIDES = {"pos": (11, "positive"), "neg": (12, "negative")}  # name: (seed, label)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    exe = BIN / "snakemake"
    if not exe.exists():
        pytest.skip("snakemake is not installed (pip install -e '.[test]')")
    return subprocess.run([str(exe), "-s", str(SNAKEFILE), "--directory", str(workdir),
                           "--cores", "2", *args], capture_output=True, text=True,
                          env=_env(), timeout=300)


def _tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-3000:]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Two tiny synthetic fls slides (2000 x 1500 px, 0.5 um/px) and their truth."""
    from wsi_pipeline.synth import write_slide

    folder = tmp_path_factory.mktemp("wf_slides")
    return {name: (folder / f"{name}.svs",
                   write_slide("fls", folder / f"{name}.svs", width=2000, height=1500, mpp=0.5,
                               seed=seed, label=label))
            for name, (seed, label) in SLIDES.items()}


@pytest.fixture(scope="module")
def workflow(slides, tmp_path_factory) -> dict:
    """Run the workflow on a CSV list of pos (renamed by a slide_id column), neg and late,
    a slide not there yet: the run fails for late only. Then late appears (a copy of pos)
    and the same command finishes the work."""
    work = tmp_path_factory.mktemp("wf_run")
    folder = slides["pos"][0].parent
    listing = folder / "list.csv"
    listing.write_text("path,slide_id\npos.svs,case 7/pos\nneg.svs,\nlate.svs,\n")
    config = work / "config.yaml"
    config.write_text(f"slides: {listing}\ntask: fls\noutdir: out\nthreads: 1\nmem_mb: 2000\n"
                      "extra_args: --model classical\n")
    out = work / "out"
    first = _snakemake(work, "--keep-going", "--configfile", str(config))
    after_first = {
        "reports": {i: out / i / "report.json" for i in ("case_7_pos", "neg", "late")},
        "mtimes": {i: (out / i / "report.json").stat().st_mtime_ns
                   for i in ("case_7_pos", "neg") if (out / i / "report.json").exists()},
        "summary": _rows(out / "summary.csv") if (out / "summary.csv").exists() else {},
        "late_exists": (out / "late" / "report.json").exists(),
        "late_log": (out / ".workflow" / "logs" / "late.log").read_text(),
    }
    shutil.copy(slides["pos"][0], folder / "late.svs")
    second = _snakemake(work, "--keep-going", "--configfile", str(config))
    # more cores per job next time: nothing finished may rerun for that
    third = _snakemake(work, "-n", "--configfile", str(config), "--config", "threads=2")
    return {"first": first, "second": second, "third": third, "out": out,
            "after_first": after_first}


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == SUMMARY_FIELDS
        return {r["slide_id"]: r for r in reader}


def _report(out: Path, slide_id: str) -> dict:
    return json.loads((out / slide_id / "report.json").read_text())


def test_a_failed_slide_does_not_stop_the_others(workflow):
    first, seen = workflow["first"], workflow["after_first"]
    assert first.returncode != 0, _tail(first)
    assert set(seen["mtimes"]) == {"case_7_pos", "neg"}, _tail(first)
    assert not seen["late_exists"]
    assert "late.svs: no such file" in seen["late_log"]
    # the wsi-run jobs kept summary.csv current; the failure is there with its reason
    assert seen["summary"]["late"]["status"] == "failed"
    assert "no such file" in seen["summary"]["late"]["error"]
    assert {seen["summary"][i]["status"] for i in ("case_7_pos", "neg")} == {"ok"}


def test_each_slide_report_matches_the_truth(workflow, slides):
    out = workflow["out"]
    folder = slides["pos"][0].parent
    for slide_id, file, name in (("case_7_pos", "pos.svs", "pos"), ("neg", "neg.svs", "neg"),
                                 ("late", "late.svs", "pos")):  # late: a copy of pos
        truth = slides[name][1]
        report = _report(out, slide_id)
        assert report["complete"] is True
        assert report["slide"]["id"] == slide_id
        assert report["slide"]["path"] == str(folder / file)
        assert report["diagnosis"]["label"] == truth["diagnosis"]["label"], slide_id
        assert report["counts"]["foci"] == truth["counts"]["foci"], slide_id
        glandular, true_glandular = report["areas_mm2"]["glandular"], truth["areas_mm2"][
            "glandular"]
        assert abs(glandular - true_glandular) <= 0.15 * true_glandular, slide_id
        args = report["provenance"]["arguments"]
        assert args[args.index("--model") + 1] == "classical"
        assert args[args.index("--workers") + 1] == "1"
        assert args[args.index("--device") + 1] == "cpu"
        assert report["provenance"]["model"]["architecture"] == "classical"
        log = (out / ".workflow" / "logs" / f"{slide_id}.log").read_text()
        events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert {"slide": slide_id, "stage": "export", "status": "done"}.items() <= \
            events[-1].items()


def test_rerun_finishes_the_failed_slide_only_and_writes_the_summary(workflow, slides):
    second, out = workflow["second"], workflow["out"]
    assert second.returncode == 0, _tail(second)
    for slide_id, mtime in workflow["after_first"]["mtimes"].items():
        assert (out / slide_id / "report.json").stat().st_mtime_ns == mtime, slide_id
    assert _report(out, "late")["counts"] == _report(out, "case_7_pos")["counts"]
    rows = _rows(out / "summary.csv")
    assert set(rows) == {"case_7_pos", "neg", "late"}
    for slide_id, row in rows.items():
        report = _report(out, slide_id)
        assert row["status"] == "ok", row
        assert row["task"] == "fls"
        assert row["diagnosis"] == report["diagnosis"]["label"]
        assert row["tiles"] == str(report["counts"]["tissue_tiles"])
        assert float(row["tissue_mm2"]) == report["areas_mm2"]["tissue"]
        assert f"foci={report['counts']['foci']}" in row["counts"]
        assert row["error"] == ""
    assert rows["case_7_pos"]["diagnosis"] == "positive"
    assert rows["neg"]["diagnosis"] == "negative"
    third = workflow["third"]
    assert third.returncode == 0 and "Nothing to be done" in third.stdout + third.stderr, \
        _tail(third)


def test_unusable_slides_setting_fails_with_a_clear_message(tmp_path):
    proc = _snakemake(tmp_path, "-n", "--config", f"slides={tmp_path / 'nowhere'}", "task=fls")
    assert proc.returncode != 0
    assert f"config: slides: {tmp_path / 'nowhere'}: no such file or folder" in proc.stderr + \
        proc.stdout


# -- SLURM array script ---------------------------------------------------------------------
def test_slurm_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_slurm_array_task_runs_its_own_line_only(slides, tmp_path):
    listing = tmp_path / "slides.txt"
    listing.write_text(f"# two slides\n{slides['pos'][0]}\n\n{slides['neg'][0]}\n")
    env = _env(SLIDE_LIST=str(listing), TASK="fls", OUTDIR=str(tmp_path / "out"),
               EXTRA_ARGS="--until tissue --model classical", SLURM_ARRAY_JOB_ID="77",
               SLURM_ARRAY_TASK_ID="1", SLURM_CPUS_PER_TASK="1")
    count = subprocess.run(["bash", str(SLURM_SCRIPT), "--count"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert count.stdout.strip() == "2", count.stderr
    proc = subprocess.run(["bash", str(SLURM_SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "job 77 task 1" in proc.stdout and "pos: done" in proc.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "index.html", "pos", "summary.csv"]
    report = _report(out, "pos")
    assert report["stages_completed"] == ["tissue"] and report["complete"] is False
    assert Path(report["slide"]["path"]) == slides["pos"][0]
    truth_tissue = slides["pos"][1]["areas_mm2"]["tissue"]
    assert abs(report["areas_mm2"]["tissue"] - truth_tissue) <= 0.1 * truth_tissue
    args = report["provenance"]["arguments"]
    assert args[args.index("--workers") + 1] == "1"  # from SLURM_CPUS_PER_TASK
    log = (out / ".workflow" / "logs" / "pos.log").read_text()
    assert "job 77 task 1" in log
    assert '"stage": "tissue", "status": "done"' in log


@pytest.mark.parametrize("unset, message", [
    ("SLIDE_LIST", "SLIDE_LIST is not set"),
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_ID is not set"),
])
def test_slurm_script_says_what_is_missing(tmp_path, unset, message):
    listing = tmp_path / "slides.txt"
    listing.write_text("a.svs\n")
    env = _env(SLIDE_LIST=str(listing), TASK="fls", OUTDIR=str(tmp_path / "out"),
               SLURM_ARRAY_TASK_ID="1")
    del env[unset]
    proc = subprocess.run(["bash", str(SLURM_SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and "usage:" in proc.stderr
    assert not (tmp_path / "out").exists()
