"""Slide access: backends, MPP and its source, level choice, reads in physical units."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import shared, write_generic_tiff

from wsi_pipeline.errors import MissingMpp, SlideNotFound, TileReadError, UnreadableSlide
from wsi_pipeline.slide import find_slides, open_slide


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory):
    rng = np.random.default_rng(0)
    # smooth structure so that JPEG keeps it and downsampled levels stay comparable
    base = rng.integers(60, 230, (24, 32, 3)).astype(np.uint8)
    rgb = np.kron(base, np.ones((64, 64, 1), np.uint8))  # 1536 x 2048
    return write_generic_tiff(tmp_path_factory.mktemp("pyr") / "pyr.tiff", rgb, mpp=0.5)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_real_aperio_slide_mpp_and_source(backend):
    slide = open_slide(shared("slides", "CMU-1-Small-Region.svs"), backend=backend)
    assert slide.backend == backend
    assert slide.vendor == "aperio"
    assert slide.dimensions == (2220, 2967)
    assert slide.mpp == pytest.approx(0.499)
    assert "aperio.MPP" in slide.mpp_source
    assert {"label", "macro", "thumbnail"} <= set(slide.associated_images)


def test_backends_agree_on_pixels():
    path = shared("slides", "CMU-1-Small-Region.svs")
    a = open_slide(path, backend="openslide").read(300.0, 400.0, 256, 256, 0.499)
    b = open_slide(path, backend="tiffslide").read(300.0, 400.0, 256, 256, 0.499)
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    # both decode the same JPEG tiles; libjpeg versions may differ by a grey level or two
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


def test_read_at_coarser_mpp_is_area_average():
    slide = open_slide(shared("slides", "CMU-1-Small-Region.svs"))
    fine = slide.read(0.0, 0.0, 512, 512, slide.mpp).astype(float)
    coarse = slide.read(0.0, 0.0, 256, 256, 2 * slide.mpp).astype(float)
    expected = fine.reshape(256, 2, 256, 2, 3).mean((1, 3))
    assert np.abs(coarse - expected).mean() < 1.0


def test_mpp_from_tiff_resolution_tags_and_nearest_level_below(pyramid_tiff):
    slide = open_slide(pyramid_tiff)
    assert slide.mpp == pytest.approx(0.5)
    assert slide.mpp_source == "TIFF resolution tags"
    assert [round(m, 3) for m in slide.level_mpps] == [0.5, 1.0, 2.0]
    assert slide.best_level(2.0) == 2
    assert slide.best_level(1.9) == 1   # nearest level *below* the request
    assert slide.best_level(0.3) == 0
    # a read at a level's own MPP returns that level's pixels untouched
    direct = slide.read_level(2, 10, 20, 64, 64)
    via_um = slide.read(10 * 2.0, 20 * 2.0, 64, 64, 2.0)
    assert np.array_equal(direct, via_um)


def test_read_outside_slide_is_glass_white(pyramid_tiff):
    slide = open_slide(pyramid_tiff)
    w_um, h_um = slide.size_um
    tile = slide.read(w_um - 50.0, h_um - 50.0, 200, 200, 0.5)
    assert tile[:100, :100].mean() < 250      # inside: slide content
    assert (tile[100:, :] == 255).all() and (tile[:, 100:] == 255).all()


def test_missing_mpp_is_an_error_naming_the_option(tmp_path):
    rgb = np.full((512, 512, 3), 200, np.uint8)
    path = write_generic_tiff(tmp_path / "nompp.tiff", rgb, mpp=None, levels=1)
    with pytest.raises(MissingMpp, match="--mpp"):
        open_slide(path)
    slide = open_slide(path, mpp=0.25)
    assert slide.mpp == 0.25 and slide.mpp_source == "override (--mpp)"


def test_default_dpi_is_not_taken_for_a_microscope_mpp():
    # boxes.tiff carries 72 dpi resolution tags = 352.8 um/px: a default, not a scan
    with pytest.raises(MissingMpp, match="not a microscope scale"):
        open_slide(shared("fixtures", "openslide", "boxes.tiff"))


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(SlideNotFound):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(UnreadableSlide, match="not a TIFF"):
        open_slide(shared("fixtures", "broken.svs"))
    with pytest.raises(UnreadableSlide, match="Unsupported TIFF compression"):
        open_slide(shared("fixtures", "openslide", "unopenable.tiff"))
    slide = open_slide(shared("fixtures", "openslide", "unreadable.svs"))
    with pytest.raises(TileReadError, match="Bogus marker"):
        slide.read(0.0, 0.0, 8, 8, slide.mpp)


def test_pickles_and_reads_from_threads(pyramid_tiff):
    slide = open_slide(pyramid_tiff, backend="tiffslide")
    clone = pickle.loads(pickle.dumps(slide))
    assert clone.backend == "tiffslide" and clone.mpp == slide.mpp
    spots = [(x * 97.0, y * 61.0) for x in range(4) for y in range(4)]
    serial = [slide.read(x, y, 128, 128, 1.0) for x, y in spots]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda s: clone.read(s[0], s[1], 128, 128, 1.0), spots))
    assert all(np.array_equal(a, b) for a, b in zip(serial, threaded, strict=True))


def test_thumbnail_in_strips_matches_one_read(pyramid_tiff):
    slide = open_slide(pyramid_tiff)
    whole = slide.read(0.0, 0.0, 256, 192, 4.0)
    strips = slide.thumbnail(4.0, max_read_px=100)   # forces many strips
    assert strips.shape == whole.shape
    assert np.abs(strips.astype(int) - whole.astype(int)).max() <= 1


def test_find_slides_skips_truth_sidecars(tmp_path):
    for name in ("a.svs", "b.tiff", "a.truth.json", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.truth.zarr").mkdir()
    assert [p.name for p in find_slides(tmp_path)] == ["a.svs", "b.tiff"]


def test_fsspec_url_opens_with_tiffslide():
    fsspec = pytest.importorskip("fsspec")
    data = shared("fixtures", "openslide", "small.svs").read_bytes()
    with fsspec.open("memory://slides/small.svs", "wb") as f:
        f.write(data)
    slide = open_slide("memory://slides/small.svs")
    assert slide.backend == "tiffslide"
    assert slide.dimensions == (16, 16) and slide.mpp == pytest.approx(0.499)
    local = open_slide(shared("fixtures", "openslide", "small.svs"), backend="tiffslide")
    assert np.array_equal(slide.read(0.0, 0.0, 16, 16, slide.mpp),
                          local.read(0.0, 0.0, 16, 16, local.mpp))
