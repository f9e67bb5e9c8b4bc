"""Bad input and faults, each against real ``wsi-run`` processes: a disk that fills up
mid-run, a slide that changes or disappears between runs, slide names that try to leave
``--out``, and Ctrl-C (SIGINT) in the middle of the pyramid."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

WSI_RUN = [sys.executable, "-m", "wsi_pipeline.cli"]


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*WSI_RUN, *map(str, args), "--workers", "1"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON stage log lines wsi-run writes to stderr when not on a terminal."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def stages_with(stderr: str, status: str) -> list[str]:
    return [e["stage"] for e in events(stderr) if e["status"] == status]


def plain_lines(stderr: str) -> list[str]:
    """stderr without the JSON log lines."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("{")]


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "store.zarr" / "manifest.json").read_text())["stages"]


def summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


def half_files(folder: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes (ours: .*.tmp; zarr's: *.partial)."""
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial"))]


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory) -> tuple[Path, Path]:
    """Two small synthetic fls slides of different seeds (different pixels and sizes)."""
    from wsi_pipeline.synth import write_slide

    folder = tmp_path_factory.mktemp("small")
    a, b = folder / "a.svs", folder / "b.svs"
    write_slide("fls", a, width=1536, height=1536, mpp=0.5, seed=31, label="negative")
    write_slide("fls", b, width=1792, height=1536, mpp=0.5, seed=32, label="positive")
    return a, b


# -- disk full -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (room for the tissue and stain stages, not for the pyramid), unmounted
    afterwards; skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_fails_cleanly_and_a_rerun_with_space_resumes(fls_slide, small_disk):
    slide, _ = fls_slide
    out = small_disk / "out"
    folder = out / slide.stem
    full = run(slide, "--task", "fls", "--out", out, "--until", "pyramid")
    assert full.returncode == 1, full.stderr
    assert "Traceback" not in full.stderr
    (line,) = plain_lines(full.stderr)
    assert line.startswith("wsi-run: error: ") and "No space left on device" in line
    assert stages_with(full.stderr, "done") == ["tissue", "stain"]
    # the pyramid that did not fit is not in the manifest, and no half file stayed behind
    assert list(manifest(folder)) == ["tissue", "stain"]
    assert half_files(out) == []
    assert not (folder / "report.json").exists()
    row = summary(out)[slide.stem]
    assert row["status"] == "failed" and "No space left on device" in row["error"]
    marked = {p.name for p in (folder / "store.zarr" / ".progress" / "pyramid").iterdir()}

    subprocess.run(["mount", "-o", "remount,size=256m", "tmpfs", str(small_disk)], check=True)
    roomy = run(slide, "--task", "fls", "--out", out, "--until", "pyramid")
    assert roomy.returncode == 0, roomy.stderr
    assert stages_with(roomy.stderr, "reused") == ["tissue", "stain"]
    assert stages_with(roomy.stderr, "done") == ["pyramid"]
    report = json.loads((folder / "report.json").read_text())
    assert report["pyramid"]["super_tiles_skipped"] == len(marked)
    assert list(manifest(folder)) == ["tissue", "stain", "pyramid"]
    assert summary(out)[slide.stem]["status"] == "ok (until pyramid)"
    assert half_files(out) == []


# -- a slide that changes or disappears between runs ----------------------------------------
def test_changed_slide_is_recomputed_and_a_missing_one_fails_clearly(small_slides, tmp_path):
    a, b = small_slides
    slide = tmp_path / "slide.svs"
    shutil.copy2(a, slide)
    out = tmp_path / "out"
    # b is run alongside, under its own id, as the truth for "slide" once it holds b's bytes
    first = run(slide, b, "--task", "fls", "--out", out, "--until", "stain")
    assert first.returncode == 0, first.stderr

    same = run(slide, "--task", "fls", "--out", out, "--until", "stain")
    assert same.returncode == 0 and stages_with(same.stderr, "reused") == ["tissue", "stain"]

    shutil.copyfile(b, slide)  # another slide under the same name
    changed = run(slide, "--task", "fls", "--out", out, "--until", "stain")
    assert changed.returncode == 0, changed.stderr
    assert stages_with(changed.stderr, "reused") == []
    assert stages_with(changed.stderr, "done") == ["tissue", "stain"]
    report = json.loads((out / "slide" / "report.json").read_text())
    truth = json.loads((out / "b" / "report.json").read_text())
    assert report["slide"]["width_px"] == 1792
    for key in ("areas_mm2", "counts", "quality"):
        assert report[key] == truth[key], key
    assert report["provenance"]["stain"] == truth["provenance"]["stain"]

    # same bytes, new modification time: treated as a new file (cheap fingerprint), redone
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = run(slide, "--task", "fls", "--out", out, "--until", "stain")
    assert touched.returncode == 0 and stages_with(touched.stderr, "reused") == []

    slide.unlink()
    gone = run(slide, "--task", "fls", "--out", out, "--until", "stain")
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    (line,) = plain_lines(gone.stderr)
    assert line.startswith("wsi-run: error: ") and "no such file" in line
    row = summary(out)["slide"]
    assert row["status"] == "failed" and "no such file" in row["error"]


# -- names that try to escape --out ------------------------------------------------------------
def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_odd_slide_names_get_safe_ids_and_stay_inside_out(small_slides, tmp_path):
    a, _ = small_slides
    inputs = tmp_path / "in put é"
    (inputs / "lists").mkdir(parents=True)
    odd = inputs / "a b é..svs"
    shutil.copy(a, odd)
    shutil.copy(a, inputs / "x.svs")
    listing = inputs / "lists" / "list.csv"
    listing.write_text("path,slide_id\n../x.svs,\n../x.svs,../../escape\n../x.svs,..\n",
                       encoding="utf-8")
    out = tmp_path / "out é x"
    before = snapshot(tmp_path)

    done = run(odd, listing, "--task", "fls", "--out", out, "--until", "tissue")
    assert done.returncode == 0, done.stderr
    rows = summary(out)
    assert sorted(rows) == sorted(["a_b", "x", "escape", "slide"])
    assert rows["a_b"]["path"] == str(odd)
    assert Path(rows["escape"]["path"]).resolve() == (inputs / "x.svs").resolve()
    for slide_id, row in rows.items():
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", slide_id)
        assert row["status"] == "ok (until tissue)"
        assert (out / slide_id / "report.json").is_file()
    # nothing created or modified anywhere else (the inputs' parent included)
    after = snapshot(tmp_path)
    assert {p: t for p, t in after.items() if not (tmp_path / p).is_relative_to(out)} == before
    assert not list(tmp_path.parent.glob("escape*"))


# -- Ctrl-C ------------------------------------------------------------------------------------
def test_sigint_stops_cleanly_and_a_rerun_resumes(fls_slide, tmp_path):
    slide, _ = fls_slide
    out = tmp_path / "out"
    folder = out / slide.stem
    marks = folder / "store.zarr" / ".progress" / "pyramid"
    # SIGINT as a terminal's Ctrl-C delivers it: pytest-xdist workers ignore SIGINT, and a
    # child would inherit that (Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([*WSI_RUN, str(slide), "--task", "fls", "--out", str(out),
                             "--until", "pyramid", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (marks.is_dir() and any(marks.iterdir())):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (line,) = plain_lines(err)
    assert "interrupted" in line and "rerun" in line
    assert summary(out)[slide.stem]["status"] == "interrupted"
    assert "pyramid" not in manifest(folder) and not (folder / "report.json").exists()
    marked = len(list(marks.iterdir()))

    again = run(slide, "--task", "fls", "--out", out, "--until", "pyramid")
    assert again.returncode == 0, again.stderr
    assert stages_with(again.stderr, "reused") == ["tissue", "stain"]
    report = json.loads((folder / "report.json").read_text())
    assert 0 < report["pyramid"]["super_tiles_skipped"] == marked < report["pyramid"][
        "super_tiles"]
    assert summary(out)[slide.stem]["status"] == "ok (until pyramid)"
