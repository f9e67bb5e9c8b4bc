"""wsi-run end to end: outputs, resume, and one clear line for every kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr
from conftest import shared, write_generic_tiff

from wsi_pipeline.batch import unique_ids
from wsi_pipeline.cli import main
from wsi_pipeline.tissue import dice


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """wsi-run, quiet, up to the pyramid unless the call names another --until."""
    argv = tuple(map(str, argv))
    until = () if "--until" in argv else ("--until", "pyramid")
    code = main([*argv, "--quiet", *until])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("wsi-run: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def fls_run(fls_slide, tmp_path_factory):
    """One finished `--until pyramid` run on the small synthetic FLS slide."""
    path, _ = fls_slide
    out = tmp_path_factory.mktemp("run")
    assert main([str(path), "--task", "fls", "--out", str(out), "--quiet",
                 "--until", "pyramid"]) == 0
    return out / path.stem


def test_report_overlay_and_store(fls_run, fls_slide):
    report = json.loads((fls_run / "report.json").read_text())
    assert report["task"] == "fls"
    assert report["complete"] is False and report["diagnosis"]["label"] is None
    assert report["stages_completed"] == ["tissue", "stain", "pyramid"]
    assert report["slide"]["vendor"] == "aperio"
    assert report["slide"]["mpp"] == pytest.approx(0.5)
    assert "aperio.MPP" in report["slide"]["mpp_source"]
    stain = report["provenance"]["stain"]
    assert np.asarray(stain["fit"]["matrix"]).shape == (2, 3)
    assert set(report["provenance"]["stage_timings"]) == {"open", "tissue", "stain", "pyramid"}
    assert (fls_run / "overlay.png").stat().st_size > 1000

    root = zarr.open_group(str(fls_run / "store.zarr"), mode="r")
    ms = root["image"].attrs["ome"]["multiscales"][0]
    assert [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]] == [
        [1.0, 0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]
    assert root["image"].attrs["stain"]["fit"] == stain["fit"]
    tiles = np.asarray(root["tiles"][...])
    level0 = root["image/0"]
    assert level0.chunks == (3, 512, 512)
    assert report["counts"]["tissue_tiles"] == len(tiles) > 0
    # only tissue chunks are stored
    assert level0.nchunks_initialized == len(tiles)
    # the x2 level is the 2x2 average of level 0 over a tissue tile
    r, c = tiles[len(tiles) // 2]
    fine = np.asarray(level0[:, r * 512:(r + 1) * 512, c * 512:(c + 1) * 512]).astype(float)
    coarse = np.asarray(root["image/1"][:, r * 256:(r + 1) * 256, c * 256:(c + 1) * 256])
    expected = fine.reshape(3, 256, 2, 256, 2).mean((2, 4))
    assert np.abs(coarse - expected).max() <= 1.0


def test_tissue_mask_matches_synthetic_truth(fls_run, fls_slide):
    path, _ = fls_slide
    root = zarr.open_group(str(fls_run / "store.zarr"), mode="r")
    mask = np.asarray(root["tissue/mask"][...]) == 1
    mask_mpp = root["tissue/mask"].attrs["mpp"]
    truth = zarr.open_group(str(path.with_suffix(".truth.zarr")), mode="r")["labels"]
    legend = {int(k): v for k, v in truth.attrs["legend"].items()}
    labels = np.asarray(truth[...])
    not_tissue = [k for k, v in legend.items() if v in ("background", "pen")]
    truth_tissue = ~np.isin(labels, not_tissue)
    # resample truth onto the detection grid by nearest neighbour in physical units
    ys = np.minimum((np.arange(mask.shape[0]) + 0.5) * mask_mpp / truth.attrs["mpp"],
                    labels.shape[0] - 1).astype(int)
    xs = np.minimum((np.arange(mask.shape[1]) + 0.5) * mask_mpp / truth.attrs["mpp"],
                    labels.shape[1] - 1).astype(int)
    assert dice(mask, truth_tissue[np.ix_(ys, xs)]) > 0.9


def test_rerun_skips_and_resumes_super_tiles(fls_run, fls_slide, capsys, tmp_path):
    path, _ = fls_slide
    out = tmp_path / "out"
    shutil.copytree(fls_run.parent, out)
    run_dir = out / fls_run.name
    store = run_dir / "store.zarr"
    before = np.asarray(zarr.open_group(str(store), mode="r")["image/0"][...])
    # as after a kill in the middle of the pyramid: two super-tiles never finished
    marks = sorted((store / ".progress" / "pyramid").iterdir())
    for mark in marks[:2]:
        mark.unlink()
    manifest = json.loads((store / "manifest.json").read_text())
    del manifest["stages"]["pyramid"]
    (store / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(store / "image" / "0" / "c", ignore_errors=False)   # lost chunks

    code, _, _ = run_cli(capsys, path, "--task", "fls", "--out", out)
    assert code == 0
    report = json.loads((run_dir / "report.json").read_text())
    timings = report["provenance"]["stage_timings"]
    assert timings["tissue"]["reused"] and timings["stain"]["reused"]
    assert not timings["pyramid"]["reused"]
    assert report["pyramid"]["super_tiles_skipped"] == len(marks) - 2
    after = np.asarray(zarr.open_group(str(store), mode="r")["image/0"][...])
    # the two redone super-tiles are identical to the first run's; the others were skipped
    redone = after != 255
    assert np.array_equal(after[redone], before[redone]) and redone.any()

    code, _, _ = run_cli(capsys, path, "--task", "fls", "--out", out)
    report = json.loads((run_dir / "report.json").read_text())
    assert all(v["reused"] for k, v in report["provenance"]["stage_timings"].items()
               if k != "open")


@pytest.mark.parametrize("name, needle", [
    (("fixtures", "broken.svs"), "not a TIFF"),
    (("fixtures", "openslide", "unopenable.tiff"), "Unsupported TIFF compression"),
    (("fixtures", "openslide", "unreadable.svs"), "reading pixels failed"),
    (("fixtures", "openslide", "boxes.tiff"), "--mpp"),
])
def test_bad_real_files(capsys, tmp_path, name, needle):
    code, _, err = run_cli(capsys, shared(*name), "--task", "fls", "--out", tmp_path)
    assert code == 1
    assert_one_error_line(err, needle)
    summary = (tmp_path / "summary.csv").read_text()
    assert "failed" in summary and not (tmp_path / name[-1].rsplit(".", 1)[0] / "report.json"
                                        ).exists()


def test_nonexistent_path_and_empty_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, tmp_path / "missing.svs", "--task", "fls", "--out",
                           tmp_path / "o")
    assert code == 1
    assert_one_error_line(err, "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, empty, "--task", "fls", "--out", tmp_path / "o")
    assert code == 1
    assert_one_error_line(err, "holds no slide files")


def test_missing_mpp_then_override(capsys, tmp_path, fls_slide):
    rgb = np.asarray(__import__("wsi_pipeline.slide", fromlist=["x"]).open_slide(
        fls_slide[0]).read(0.0, 0.0, 1536, 1536, 1.0))
    path = write_generic_tiff(tmp_path / "nompp.tif", rgb, mpp=None)
    code, _, err = run_cli(capsys, path, "--task", "fls", "--out", tmp_path / "o",
                           "--until", "tissue")
    assert code == 1
    assert_one_error_line(err, "--mpp")
    code, _, err = run_cli(capsys, path, "--task", "fls", "--out", tmp_path / "o",
                           "--until", "tissue", "--mpp", "1.0")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "nompp" / "report.json").read_text())
    assert report["slide"]["mpp_source"] == "override (--mpp)"


def test_blank_glass_is_no_tissue(capsys, tmp_path, glass_slide):
    code, _, err = run_cli(capsys, glass_slide, "--task", "fls", "--out", tmp_path)
    assert code == 1
    assert_one_error_line(err, "no tissue")
    # the report says why it stopped and cannot pass for an analysis
    report = json.loads((tmp_path / "glass" / "report.json").read_text())
    assert report["quality"]["no_tissue"] is True and report["complete"] is False
    assert report["diagnosis"]["label"] is None and report["stages_completed"] == ["tissue"]
    assert "failed" in (tmp_path / "summary.csv").read_text()


def test_truncated_slide(capsys, tmp_path, fls_slide):
    data = fls_slide[0].read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) * 6 // 10])
    code, _, err = run_cli(capsys, cut, "--task", "fls", "--out", tmp_path / "o")
    assert code == 1
    assert_one_error_line(err, "cut.svs")


def test_unwritable_output(capsys, tmp_path, fls_slide):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, fls_slide[0], "--task", "fls", "--out", blocker / "out")
    assert code == 1
    assert_one_error_line(err, "not writable")


def test_a_photo_and_an_out_file_get_clear_lines(capsys, tmp_path, fls_slide):
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(photo)
    code, _, err = run_cli(capsys, photo, "--task", "fls", "--out", tmp_path / "o")
    assert code == 1
    assert_one_error_line(err, "a JPEG image, not a whole-slide image", "tiles_to_slides")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, fls_slide[0], "--task", "fls", "--out", blocker)
    assert code == 2
    assert_one_error_line(err, f"--out {blocker}: is a file")


def test_batch_goes_on_after_a_bad_slide(capsys, tmp_path, fls_slide):
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(fls_slide[0], folder / "good.svs")
    shutil.copy(shared("fixtures", "broken.svs"), folder / "bad.svs")
    code, out, err = run_cli(capsys, folder, "--task", "fls", "--out", tmp_path / "o",
                             "--until", "tissue")
    assert code == 1
    rows = (tmp_path / "o" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("slide_id,")
    status = {r.split(",")[0]: r.split(",")[3] for r in rows[1:]}
    assert status == {"bad": "failed", "good": "ok (until tissue)"}
    assert (tmp_path / "o" / "good" / "report.json").exists()


def test_usage_errors_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wsi_pipeline.cli", "x.svs", "--task", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("wsi-run: error: unknown task 'nope'")
    assert proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, "-m", "wsi_pipeline.cli", "x.svs", "--task", "fsl"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'fls'?" in proc.stderr


def test_unique_safe_ids():
    assert unique_ids(["a b", "a b", "../x", "ok.1"]) == ["a_b", "a_b-2", "x", "ok.1"]
    assert unique_ids(["a", "a", "a-2", "A"]) == ["a", "a-2", "a-2-2", "A-3"]


def test_bad_mpp_and_missing_gpu_are_usage_errors(capsys, tmp_path, fls_slide):
    code, _, err = run_cli(capsys, fls_slide[0], "--task", "fls", "--out", tmp_path,
                           "--mpp", "400")
    assert code == 2
    assert_one_error_line(err, "--mpp 400")
    import torch

    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, fls_slide[0], "--task", "fls", "--out", tmp_path,
                               "--device", "cuda")
        assert code == 2
        assert_one_error_line(err, "no CUDA GPU")


def test_torch_stain_backend_writes_the_same_pyramid(fls_run, fls_slide, capsys, tmp_path):
    # rerun over a copy of the numpy run: new pyramid parameters, so nothing may be skipped
    shutil.copytree(fls_run.parent, tmp_path, dirs_exist_ok=True)
    code, _, err = run_cli(capsys, fls_slide[0], "--task", "fls", "--out", tmp_path,
                           "--stain-backend", "torch", "--device", "cpu")
    assert code == 0, err
    report = json.loads((tmp_path / fls_run.name / "report.json").read_text())
    assert report["pyramid"]["stain_backend"] == "torch"
    assert report["pyramid"]["super_tiles_skipped"] == 0
    assert report["provenance"]["stage_timings"]["stain"]["reused"]
    ours = zarr.open_group(str(tmp_path / fls_run.name / "store.zarr"), mode="r")["image/0"]
    ref = zarr.open_group(str(fls_run / "store.zarr"), mode="r")["image/0"]
    assert np.array_equal(np.asarray(ours[...]), np.asarray(ref[...]))


@pytest.mark.parametrize("task", ["fls", "liver", "kidney-layer", "mesangial"])
def test_every_task_runs_to_the_pyramid_on_a_real_slide(capsys, tmp_path, task):
    from wsi_pipeline.tasks import get_task

    code, _, err = run_cli(capsys, shared("slides", "CMU-1-Small-Region.svs"), "--task", task,
                           "--out", tmp_path)
    assert code == 0, err
    spec = get_task(task)
    root = zarr.open_group(str(tmp_path / "CMU-1-Small-Region" / "store.zarr"), mode="r")
    scales = [d["coordinateTransformations"][0]["scale"][1]
              for d in root["image"].attrs["ome"]["multiscales"][0]["datasets"]]
    assert scales == pytest.approx(list(spec.level_mpps))
    assert root["image/0"].chunks == (3, spec.tile_px, spec.tile_px)
    # 2220 x 2967 px at 0.499 um/px, resampled to the task's working MPP
    assert root["image/0"].shape[1:] == (round(2967 * 0.499 / spec.mpp + 0.5),
                                         round(2220 * 0.499 / spec.mpp + 0.5))


def test_glomerular_dx_takes_a_case_folder(capsys, tmp_path):
    case = tmp_path / "case01"
    (case / "om").mkdir(parents=True)
    shutil.copy(shared("slides", "CMU-1-Small-Region.svs"), case / "om" / "biopsy.svs")
    # a case missing a modality fails before any slide work, naming it
    code, _, err = run_cli(capsys, case, "--task", "glomerular-dx", "--out", tmp_path / "o",
                           "--until", "tissue")
    assert code == 1 and "im" in err and len(err.strip().splitlines()) <= 2, err
    from PIL import Image

    for folder, name in (("im", "if.png"), ("tem", "tem_01.png")):
        (case / folder).mkdir()
        Image.fromarray(np.full((64, 64, 3), 40, np.uint8)).save(case / folder / name)
    code, _, err = run_cli(capsys, case, "--task", "glomerular-dx", "--out", tmp_path / "o",
                           "--until", "tissue")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "case01" / "report.json").read_text())
    assert report["task"] == "glomerular-dx" and report["slide"]["vendor"] == "aperio"


def test_stain_fit_recovers_the_synthetic_stains(fls_run, fls_slide):
    """The slide's Vahadane fit points where the generator's true stain vectors point."""
    _, truth = fls_slide
    true = np.asarray(truth["generator"]["stain_matrix"], float)
    true /= np.linalg.norm(true, axis=1, keepdims=True)
    report = json.loads((fls_run / "report.json").read_text())
    fit = np.asarray(report["provenance"]["stain"]["fit"]["matrix"], float)
    cosine = (true * fit).sum(axis=1)   # row 0 haematoxylin, row 1 eosin
    assert cosine.min() > 0.98, cosine


def test_demo_input_is_written_once_and_never_half(tmp_path, monkeypatch):
    from dataclasses import replace

    from wsi_pipeline.cli import demo_input
    from wsi_pipeline.tasks import get_plugin
    from wsi_pipeline.tasks.hooks import demo_slide, synth_slides

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tiny = replace(get_plugin("fls"), demo=demo_slide(synth_slides("fls"), "fls_demo",
                                                      width=1024, height=768, seed=1,
                                                      label="positive", workers=0))
    path = demo_input(tiny)
    assert path == tmp_path / "wsi_pipeline" / "fls_demo" / "fls_demo.svs"
    assert path.is_file() and path.with_name("fls_demo.truth.json").is_file()
    stamp = path.stat().st_mtime_ns
    assert demo_input(tiny) == path and path.stat().st_mtime_ns == stamp   # reused

    def broken(folder):
        (folder / "half.svs").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo_input(replace(tiny, spec=replace(tiny.spec, name="other"), demo=broken))
    assert sorted(p.name for p in (tmp_path / "wsi_pipeline").iterdir()) == ["fls_demo"]


def test_another_task_never_replaces_results_silently(capsys, tmp_path, fls_slide):
    """kidney-layer then fls on one slide into one --out: the second run refuses with one
    line naming the first task and --force; --force replaces; summary.csv keeps one row per
    slide and task and never shows results that are gone."""
    import csv

    path, _ = fls_slide
    out = tmp_path / "o"
    code, _, _ = run_cli(capsys, path, "--task", "kidney-layer", "--until", "tissue",
                         "--out", out)
    assert code == 0
    code, _, err = run_cli(capsys, path, "--task", "fls", "--until", "tissue", "--out", out)
    assert code == 1
    assert_one_error_line(err, "holds results of task kidney-layer", "--force")
    report = json.loads((out / path.stem / "report.json").read_text())
    assert report["task"] == "kidney-layer"

    def rows() -> dict:
        with open(out / "summary.csv", newline="") as f:
            return {r["task"]: r["status"] for r in csv.DictReader(f)}

    assert rows() == {"kidney-layer": "ok (until tissue)", "fls": "failed"}
    code, _, _ = run_cli(capsys, path, "--task", "fls", "--until", "tissue", "--out", out,
                         "--force")
    assert code == 0
    assert json.loads((out / path.stem / "report.json").read_text())["task"] == "fls"
    assert rows() == {"fls": "ok (until tissue)"}


def test_progress_in_logs_and_on_a_terminal(tmp_path, fls_slide):
    """Off a terminal: a JSON line as each stage starts and ends, and progress events
    inside the long ones; on a terminal (a pty): a line per finished stage."""
    import os
    import pty

    path, _ = fls_slide
    proc = subprocess.run([sys.executable, "-m", "wsi_pipeline.cli", str(path), "--task",
                           "fls", "--model", "classical", "--out", str(tmp_path / "o"),
                           "--workers", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    done = [e["stage"] for e in events if e["status"] == "done"]
    assert done == ["tissue", "stain", "pyramid", "infer", "stitch", "measure", "export"]
    progress = [e for e in events if e["status"] == "progress" and e["stage"] == "infer"]
    assert progress and all(0 < e["done"] < e["total"] for e in progress)
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
    # regions.geojson: the tissue and the task's region classes as QuPath annotations
    regions = json.loads((tmp_path / "o" / path.stem / "regions.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in regions["features"]}
    assert names == {"Tissue", "glandular tissue", "fat"}
    assert {f["properties"]["objectType"] for f in regions["features"]} == {"annotation"}
    report = json.loads((tmp_path / "o" / path.stem / "report.json").read_text())
    tissue_px = sum(_polygon_area(f["geometry"]["coordinates"]) for f in regions["features"]
                    if f["properties"]["classification"]["name"] == "Tissue")
    tissue_mm2 = tissue_px * report["slide"]["mpp"] ** 2 / 1e6
    assert tissue_mm2 == pytest.approx(report["areas_mm2"]["tissue_mask"], rel=0.05)

    main_fd, child_fd = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "wsi_pipeline.cli", str(path), "--task",
                           "fls", "--until", "stain", "--out", str(tmp_path / "t")],
                          stdin=child_fd, stdout=child_fd, stderr=child_fd, timeout=600)
    os.close(child_fd)
    text = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        text += chunk
    os.close(main_fd)
    screen = text.decode(errors="replace")
    assert proc.returncode == 0, screen
    assert f"{path.stem}: tissue " in screen and f"{path.stem}: stain " in screen
    assert "{" not in screen.split("\n")[0]   # no JSON on a terminal


def _polygon_area(rings: list) -> float:
    """Area of a GeoJSON polygon (outer ring minus holes), in its coordinate units."""
    def shoelace(ring):
        xy = np.asarray(ring, float)
        return abs(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1])) / 2
    return shoelace(rings[0]) - sum(shoelace(r) for r in rings[1:])


def test_help_texts_say_what_a_newcomer_needs(capsys):
    from wsi_pipeline.synth.cli import build_parser as synth_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "REQUIRED" in out
    for needle in ("installed tasks:", "  fls ", "examples:", "exit codes:",
                   "--task fls --model classical"):
        assert needle in out, needle
    synth_help = synth_parser().format_help()
    assert "later" not in synth_help and "liver only" not in synth_help
    assert "glomerular-dx: N cases" in synth_help.replace("\n", " ").replace("  ", " ")


def test_reused_stages_log_no_time_spent_and_the_table_marks_inadequate(tmp_path, fls_slide):
    from wsi_pipeline.batch import summary_text
    from wsi_pipeline.pipeline import RunOptions, run_slide
    from wsi_pipeline.tasks import get_plugin

    path, _ = fls_slide
    opts = RunOptions(out=tmp_path, until="stain", workers=1)
    first, second = [], []
    run_slide(path, get_plugin("fls"), "s", opts, log=first.append)
    run_slide(path, get_plugin("fls"), "s", opts, log=second.append)
    done = {e["stage"]: e["seconds"] for e in first if e["status"] == "done"}
    reused = [e for e in second if e["status"] == "reused"]
    assert [e["stage"] for e in reused] == ["tissue", "stain"]
    assert all(e["seconds"] == 0.0 and e["first_run_seconds"] == done[e["stage"]]
               for e in reused)
    row = {"slide_id": "b1", "status": "ok", "diagnosis": "negative", "adequate": False,
           "scores": "focus_score=0.4", "counts": "", "error": ""}
    assert "negative; INADEQUATE; focus_score=0.4" in summary_text([row])
    assert "INADEQUATE" not in summary_text([{**row, "adequate": True}])
