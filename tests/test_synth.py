"""Tests of the synthetic slide generator `wsi-synth` (small slides; a few seconds each)."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import tifffile
import zarr

from wsi_pipeline.errors import UsageError
from wsi_pipeline.synth import LEGENDS, label_downsample, truth_paths, write_slide
from wsi_pipeline.synth.cli import main as synth_main
from wsi_pipeline.synth.tiff_writer import (
    Level0Tile,
    downsample4,
    jpeg_tile,
    level_sizes,
    write_aperio,
)

openslide = pytest.importorskip("openslide")
tiffslide = pytest.importorskip("tiffslide")

TRUTH_KEYS = {"task", "diagnosis", "scores", "counts", "areas_mm2", "objects", "generator"}


@pytest.fixture(scope="module")
def fls_pos(tmp_path_factory):
    path = tmp_path_factory.mktemp("fls") / "fls_pos.svs"
    truth = write_slide("fls", path, width=2560, height=2048, mpp=0.5, seed=11,
                        label="positive", pen=True, fold=True)
    return path, truth


@pytest.fixture(scope="module")
def fls_neg(tmp_path_factory):
    path = tmp_path_factory.mktemp("fls") / "fls_neg.svs"
    truth = write_slide("fls", path, width=2048, height=1536, mpp=0.25, seed=12,
                        label="negative")
    return path, truth


def _labels(path):
    root = zarr.open_group(str(truth_paths(path)[1]), mode="r")
    return root


# ----------------------------------------------------------------------------- the SVS file


def test_openslide_reads_aperio_pyramid(fls_pos):
    path, truth = fls_pos
    s = openslide.OpenSlide(str(path))
    assert s.properties["openslide.vendor"] == "aperio"
    assert float(s.properties["openslide.mpp-x"]) == 0.5
    assert float(s.properties["openslide.mpp-y"]) == 0.5
    assert s.properties["openslide.objective-power"] == "20"
    assert s.dimensions == (2560, 2048)
    assert s.level_count == 2 == len(truth["generator"]["levels"])
    assert s.level_dimensions[1] == (640, 512)
    assert s.level_downsamples == pytest.approx((1.0, 4.0))
    assert {"thumbnail", "label", "macro"} <= set(s.associated_images)
    region = np.asarray(s.read_region((0, 0), 1, (640, 512)).convert("RGB"))
    assert region.std() > 10  # tissue, not a blank level


def test_tiff_layout_follows_aperio(fls_pos):
    path, _ = fls_pos
    with tifffile.TiffFile(path) as tf:
        pages = tf.pages
        p0 = pages[0]
        assert p0.is_tiled and p0.tilewidth == 512 and p0.compression == 7
        assert p0.description.startswith("Aperio Image Library")
        fields = dict(kv.split(" = ", 1) for kv in p0.description.split("|")[1:])
        assert fields["MPP"] == "0.5" and fields["AppMag"] == "20"
        assert p0.tags["ResolutionUnit"].value == 3  # centimetre
        xres = p0.tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(1e4 / 0.5)
        assert not pages[1].is_tiled  # thumbnail is the 2nd IFD, stripped
        assert pages[2].is_tiled and pages[2].shape[:2] == (512, 640)
        assert "label" in pages[-2].description and pages[-2].subfiletype == 1
        assert "macro" in pages[-1].description and pages[-1].subfiletype == 9
        assert tf.series[0].kind == "svs" and len(tf.series[0].levels) == 2


def test_tiffslide_matches_openslide(fls_pos):
    path, _ = fls_pos
    o = openslide.OpenSlide(str(path))
    t = tiffslide.TiffSlide(str(path))
    assert float(t.properties["tiffslide.mpp-x"]) == 0.5
    assert t.level_dimensions == o.level_dimensions
    for level, loc in ((0, (700, 500)), (1, (0, 0))):
        a = np.asarray(o.read_region(loc, level, (300, 200)).convert("RGB"), float)
        b = np.asarray(t.read_region(loc, level, (300, 200)).convert("RGB"), float)
        assert np.abs(a - b).mean() < 1.5


def test_glass_and_tissue_colour_are_plausible(fls_pos):
    path, _ = fls_pos
    s = openslide.OpenSlide(str(path))
    rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    lab = _labels(path)["labels"][:]
    glass = rgb[lab == 0]
    assert 228 < glass.mean() < 250  # near white, not 255
    assert glass.std() > 0.5  # sensor noise
    tissue = np.isin(lab, [1, 2, 3, 5, 6])
    od = -np.log(np.maximum(rgb[tissue], 1) / 255.0)
    assert 0.6 < od.sum(axis=1).mean() < 3.0
    assert od[:, 1].mean() > od[:, 2].mean()  # eosin/haematoxylin absorb green most


# ----------------------------------------------------------------------------- truth


def test_truth_json_positive(fls_pos):
    path, truth = fls_pos
    on_disk = json.loads(truth_paths(path)[0].read_text())
    assert on_disk == json.loads(json.dumps(truth))
    assert set(truth) == TRUTH_KEYS
    assert truth["task"] == "fls"
    fs = truth["scores"]["focus_score"]
    gl = truth["areas_mm2"]["glandular"]
    assert fs >= 1.0 and truth["diagnosis"]["label"] == "positive"
    assert fs == pytest.approx(4 * truth["counts"]["foci"] / gl, rel=1e-3)
    assert truth["diagnosis"]["adequate"] == (gl >= 8)
    foci = [o for o in truth["objects"] if o["type"] == "focus"]
    assert len(foci) == truth["counts"]["foci"] >= 1
    assert all(o["lymphocytes"] >= 50 for o in foci)
    assert sum(o["lymphocytes"] for o in foci) == truth["counts"]["lymphocytes_in_foci"]
    aggr = [o for o in truth["objects"] if o["type"] == "aggregate"]
    assert all(15 <= o["lymphocytes"] < 50 for o in aggr)
    gen = truth["generator"]
    assert {"seed", "width", "height", "mpp", "stain_matrix", "version", "options"} <= set(gen)
    m = np.array(gen["stain_matrix"])
    assert m.shape == (2, 3) and np.allclose(np.linalg.norm(m, axis=1), 1, atol=1e-3)


def test_truth_json_negative(fls_neg):
    _, truth = fls_neg
    assert truth["scores"]["focus_score"] < 1.0
    assert truth["diagnosis"]["label"] == "negative"
    assert truth["generator"]["mpp"] == 0.25


def test_label_zarr_matches_truth(fls_pos):
    path, truth = fls_pos
    root = _labels(path)
    labels = root["labels"]
    assert labels.dtype == np.uint8
    assert labels.attrs["mpp"] == 0.5
    legend = {int(k): v for k, v in labels.attrs["legend"].items()}
    assert legend == LEGENDS["fls"] and legend[7] == "pen"
    lab = labels[:]
    px_mm2 = 0.5 * 0.5 / 1e6
    assert np.isin(lab, [1, 2, 3, 5, 6]).sum() * px_mm2 == pytest.approx(
        truth["areas_mm2"]["glandular"], rel=1e-3)
    tissue = (lab != 0) & (lab != 7)
    assert tissue.sum() * px_mm2 == pytest.approx(truth["areas_mm2"]["tissue"], rel=1e-3)
    lym = root["lymphocytes"][:]
    group = root["lymphocyte_group"][:]
    assert lym.shape == (truth["counts"]["lymphocytes_total"], 2)
    in_foci = group >= 0
    in_focus_objects = np.array([truth["objects"][g]["type"] == "focus" for g in group[in_foci]])
    assert in_focus_objects.sum() == truth["counts"]["lymphocytes_in_foci"]
    # lymphocytes of foci lie in focus-labelled pixels
    ij = (lym[in_foci][in_focus_objects] / 0.5).astype(int)
    assert (lab[ij[:, 1], ij[:, 0]] == 5).mean() > 0.9


def test_pen_mark_present_only_when_asked(fls_pos, fls_neg):
    path, truth = fls_pos
    lab = _labels(path)["labels"][:]
    pen = lab == 7
    assert pen.sum() > 1000 and truth["areas_mm2"]["pen"] > 0
    s = openslide.OpenSlide(str(path))
    rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB")).astype(float)
    ink = rgb[pen].mean(axis=0)
    assert ink.min() < 150  # strongly absorbing marker ink, unlike glass
    assert not (_labels(fls_neg[0])["labels"][:] == 7).any()


@pytest.mark.parametrize("task,seed,drawn", [("fls", 11, "green"), ("fls", 3, "blue"),
                                             ("mesangial", 1, "black"), ("liver", 4, "blue")])
def test_pen_colour_forced_keeps_the_seeded_stroke(task, seed, drawn):
    """A plain pen draws its ink from the seed as before --pen COLOUR existed (``drawn``:
    the inks of these seeds then); forcing a colour changes the ink only."""
    from wsi_pipeline.synth.generate import get_spec
    from wsi_pipeline.synth.scene import pen_ink

    spec = get_spec(task)
    plain = spec.build(task, seed, 2560, 2048, 0.5, None, True, False)
    assert plain.pen.ink == drawn
    for colour in ("red", "green", "blue", "black"):
        with pen_ink(colour):
            forced = spec.build(task, seed, 2560, 2048, 0.5, None, True, False)
        assert forced.pen.ink == colour
        np.testing.assert_array_equal(forced.pen.pts, plain.pen.pts)
        assert forced.pen.width_um == plain.pen.width_um and forced.label == plain.label
    assert spec.build(task, seed, 2560, 2048, 0.5, None, True, False).pen.ink == drawn
    with pytest.raises(ValueError, match="pen colour"):
        with pen_ink("purple"):
            pass


def test_cli_pen_colour(tmp_path, capsys):
    out = tmp_path / "red.svs"
    assert synth_main(["--task", "fls", "--out", str(out), "--width", "2560", "--height",
                       "2048", "--seed", "11", "--pen", "red", "--quiet"]) == 0
    pen = _labels(out)["labels"][:] == 7
    assert pen.sum() > 1000
    s = openslide.OpenSlide(str(out))
    rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB")).astype(float)
    r, g, b = rgb[pen].mean(axis=0)
    assert r > g + 60 and r > b + 40           # red marker: passes red, absorbs green, blue
    code = synth_main(["--task", "fls", "--out", str(tmp_path / "p.svs"), "--pen", "purple"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("wsi-synth: error: --pen 'purple'") and "\n" not in err


def test_reproducible_for_a_seed(tmp_path):
    kw = dict(width=1024, height=1024, seed=5, label="positive")
    t1 = write_slide("fls", tmp_path / "a.svs", **kw)
    t2 = write_slide("fls", tmp_path / "b.svs", **kw)
    t3 = write_slide("fls", tmp_path / "c.svs", **{**kw, "seed": 6})
    assert t3["generator"]["stain_matrix"] != t1["generator"]["stain_matrix"]
    assert t1["counts"] == t2["counts"] and t1["objects"] == t2["objects"]
    assert t1["generator"]["stain_matrix"] == t2["generator"]["stain_matrix"]
    a = tifffile.imread(tmp_path / "a.svs", key=0)
    b = tifffile.imread(tmp_path / "b.svs", key=0)
    c = tifffile.imread(tmp_path / "c.svs", key=0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tiles_render_independently_without_seams():
    """A tile rendered alone equals the same area inside a larger render (up to noise)."""
    from scipy.ndimage import uniform_filter

    from wsi_pipeline.synth import salivary

    s = salivary.build("fls", 3, 4096, 3072, 0.5, "positive", False, False)
    big = salivary.render_tile(s, 1536, 1536, 1024)[:512, 512:].astype(float)
    alone = salivary.render_tile(s, 2048, 1536, 512).astype(float)
    assert big.std() > 20  # the area holds tissue
    diff = np.abs(uniform_filter(big, (5, 5, 1)) - uniform_filter(alone, (5, 5, 1)))
    assert diff.mean() < 4 and np.percentile(diff, 99.9) < 30


# ----------------------------------------------------------------------------- kidney


@pytest.mark.parametrize("label", ["M1", "M0"])
def test_mesangial_label_controls_hypercellularity(tmp_path, label):
    truth = write_slide("mesangial", tmp_path / "m.svs", width=4096, height=2048, seed=3,
                        label=label)
    frac = truth["scores"]["hypercellular_fraction"]
    n = truth["counts"]["glomeruli"]
    assert n >= 1 and truth["diagnosis"]["label"] == label
    assert (frac > 0.5) == (label == "M1")
    glom = [o for o in truth["objects"] if o["type"] == "glomerulus"]
    assert len(glom) == n
    for o in glom:
        assert 150 <= o["diameter_um"] <= 250
        assert o["hypercellular"] == (o["max_cells_per_area"] > 3)
    assert truth["diagnosis"]["adequate"] == (n >= 8)
    assert truth["areas_mm2"]["cortex"] > 0


def test_kidney_layer_inadequate_has_no_cortex(tmp_path):
    truth = write_slide("kidney-layer", tmp_path / "k.svs", width=2048, height=1536, seed=4,
                        label="inadequate")
    assert truth["areas_mm2"]["cortex"] == 0 and truth["areas_mm2"]["medulla"] > 0.3
    assert truth["diagnosis"] == {"label": "inadequate", "adequate": False}
    lab = zarr.open_group(str(truth_paths(tmp_path / "k.svs")[1]), mode="r")["labels"]
    assert {int(k) for k in lab.attrs["legend"]} == set(LEGENDS["kidney-layer"])


# ----------------------------------------------------------------------------- memory


def _tile_stream(width, height, tile, counter):
    rgb = np.full((tile, tile, 3), (180, 90, 160), np.uint8)
    enc = Level0Tile(jpeg_tile(rgb, 80), downsample4(rgb))
    for ty in range(-(-height // tile)):
        for tx in range(-(-width // tile)):
            counter[0] += 1
            yield None if (tx + ty) % 3 == 0 else enc


def _peak_bytes(tmp_path, side):
    counter = [0]
    tracemalloc.start()
    write_aperio(tmp_path / f"m{side}.svs", _tile_stream(side, side, 512, counter),
                 width=side, height=side, mpp=0.5, tile=512, quality=80,
                 glass_rgb=lambda k: np.full((512, 512, 3), 240, np.uint8))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert counter[0] == (-(-side // 512)) ** 2
    return peak


def test_writer_memory_does_not_grow_with_slide(tmp_path):
    small = _peak_bytes(tmp_path, 2048)
    big = _peak_bytes(tmp_path, 8192)  # 16x the pixels: a full level would be 200 MB
    assert big < 40 * 2**20
    assert big < 1.6 * small + 8 * 2**20


def test_label_mask_is_coarser_for_huge_slides():
    assert label_downsample(12000, 9000) == 1
    assert label_downsample(100_000, 100_000) == 16
    assert level_sizes(100_000, 100_000)[-1] == (390, 390)


# ----------------------------------------------------------------------------- CLI


def test_cli_bad_options(tmp_path, capsys):
    assert synth_main(["--task", "spleen", "--out", str(tmp_path / "x.svs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wsi-synth: error:") and "\n" not in err
    assert synth_main(["--task", "kidney-layer", "--out", str(tmp_path / "k.svs"),
                       "--positive"]) == 2
    assert synth_main(["--task", "fls", "--out", str(tmp_path / "f.svs"), "--label", "M1"]) == 2
    assert synth_main(["--task", "fls"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("wsi-synth: error:") for line in err)
    with pytest.raises(UsageError, match="unknown task"):
        write_slide("spleen", tmp_path / "g.svs")


def test_cli_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = synth_main(["--task", "fls", "--out", str(blocker / "sub" / "x.svs"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("wsi-synth: error:") and "Traceback" not in err


def test_cli_writes_slide(tmp_path, capsys):
    out = tmp_path / "cli" / "fls_001.svs"
    code = synth_main(["--task", "fls", "--out", str(out), "--width", "1024", "--height",
                       "768", "--seed", "2", "--negative"])
    assert code == 0 and out.exists()
    assert "wrote" in capsys.readouterr().out
    truth = json.loads(truth_paths(out)[0].read_text())
    assert truth["diagnosis"]["label"] == "negative" and truth["generator"]["seed"] == 2
