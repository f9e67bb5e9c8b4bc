"""The compiled stain LUT gather (numba, the `fast` extra) gives the numpy path's bytes."""

from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline import stain, stain_kernel
from wsi_pipeline.errors import UsageError, WsiError

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SLIDE = DATA / "slides" / "CMU-1-Small-Region.svs"
needs_numba = pytest.mark.skipif(not stain_kernel.AVAILABLE,
                                 reason="numba not installed (pip install wsi_pipeline[fast])")


@pytest.fixture(scope="module")
def lut() -> np.ndarray:
    # PAS kidney -> H&E: a real fit, so every entry is a mix of normalised and as-scanned
    return stain.build_lut(stain.REFERENCES["pas"], stain.REFERENCES["he"])


@pytest.fixture
def numpy_only(monkeypatch):
    """Fail if anything reaches the compiled kernel."""
    def refuse(*args):
        raise AssertionError("the numpy path called the compiled kernel")

    monkeypatch.setattr(stain_kernel, "gather", refuse)


def every_colour() -> np.ndarray:
    """(4096, 4096, 3) uint8: all 2**24 colours, entry i = (i & 255, i >> 8 & 255, i >> 16)."""
    i = np.arange(stain.LUT_SIZE, dtype=np.uint32)
    return i.view(np.uint8).reshape(-1, 4)[:, :3].reshape(4096, 4096, 3).copy()


def test_numpy_path_runs_when_asked_and_matches_the_closed_form(lut, numpy_only):
    rgb = np.random.default_rng(0).integers(0, 256, (61, 67, 3), dtype=np.uint8)
    out = stain.normalise(rgb, lut, kernel="numpy")
    direct = stain.normalise_direct(rgb, stain.REFERENCES["pas"], stain.REFERENCES["he"])
    np.testing.assert_array_equal(out, direct)
    norm = stain.make_normaliser(stain.REFERENCES["pas"], "he", kernel="numpy")
    np.testing.assert_array_equal(norm(rgb), out)


@needs_numba
def test_every_colour_same_bytes(lut):
    rgb = every_colour()
    expected = stain.normalise(rgb, lut, kernel="numpy")
    np.testing.assert_array_equal(expected.reshape(-1, 3),
                                  lut.view(np.uint8).reshape(-1, 4)[:, :3])
    assert np.array_equal(stain.normalise(rgb, lut, kernel="numba"), expected)


@needs_numba
@pytest.mark.parametrize("shape", [(0, 3), (1, 3), (2, 3), (3, 3), (4, 3), (5, 3), (7, 3),
                                   (8, 3), (1, 1, 3), (61, 67, 3), (3, 33, 17, 3)])
def test_synthetic_shapes_same_bytes(lut, shape):
    """Pixel counts off the kernel's 4-pixel step exercise its tail."""
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    expected = stain.normalise(rgb, lut, kernel="numpy")
    assert np.array_equal(stain.normalise(rgb, lut, kernel="numba"), expected)
    assert np.array_equal(stain.normalise(rgb, lut), expected)  # "auto" picks numba


@needs_numba
def test_odd_layouts_same_bytes(lut):
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    expected = stain.normalise(batch, lut, kernel="numpy")
    out = np.empty_like(batch)
    assert stain.normalise(batch, lut, out=out, kernel="numba") is out
    assert np.array_equal(out, expected)
    # strided input (copied to contiguous), read-only input and table
    assert np.array_equal(stain.normalise(batch[:, ::2], lut, kernel="numba"),
                          expected[:, ::2])
    frozen, frozen_lut = batch.copy(), lut.copy()
    frozen.setflags(write=False)
    frozen_lut.setflags(write=False)
    assert np.array_equal(stain.normalise(frozen, frozen_lut, kernel="numba"), expected)
    # not 4-byte aligned: the kernel declines and the numpy path runs
    raw = np.empty(batch.nbytes + 1, np.uint8)
    shifted = raw[1:].reshape(batch.shape)
    shifted[...] = batch
    assert shifted.ctypes.data % 4
    assert not stain_kernel.gather(shifted.reshape(-1), lut, out.reshape(-1))
    assert np.array_equal(stain.normalise(shifted, lut, kernel="numba"), expected)


@pytest.mark.skipif(not SLIDE.is_file(), reason=f"real slide not found: {SLIDE}")
def test_real_tiles_same_bytes():
    """CMU-1 level-0 512 x 512 tiles normalised with the slide's own fit to H&E and PAS: the
    numpy path against the closed form (two tissue tiles) and, with numba, the kernel."""
    from wsi_pipeline.slide import open_slide

    with open_slide(SLIDE) as slide:
        region = slide.read_level(0, 0, 0, *slide.dimensions)
    h, w = (s - s % 512 for s in region.shape[:2])
    tiles = region[:h, :w].reshape(h // 512, 512, w // 512, 512, 3).swapaxes(1, 2)
    tiles = np.ascontiguousarray(tiles.reshape(-1, 512, 512, 3))
    tissue = np.argsort([(stain.luminosity(t) < 0.8).mean() for t in tiles])[-2:]
    fit = stain.fit_vahadane(region)
    for ref in ("he", "pas"):
        target = stain.REFERENCES[ref]
        lut = stain.build_lut(fit, target)
        expected = stain.normalise(tiles, lut, kernel="numpy")
        assert not np.array_equal(expected, tiles)  # the table does change these tiles
        np.testing.assert_array_equal(expected[tissue],
                                      stain.normalise_direct(tiles[tissue], fit, target))
        if stain_kernel.AVAILABLE:
            assert np.array_equal(stain.normalise(tiles, lut, kernel="numba"), expected), ref


def test_kernel_argument(lut, monkeypatch):
    rgb = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(UsageError, match="unknown stain kernel"):
        stain.normalise(rgb, lut, kernel="cuda")
    with pytest.raises(UsageError, match="unknown stain kernel"):
        stain.make_normaliser(stain.REFERENCES["pas"], "he", kernel="cuda")
    monkeypatch.setattr(stain_kernel, "AVAILABLE", False)  # as without numba
    with pytest.raises(WsiError, match=r"wsi_pipeline\[fast\]"):
        stain.normalise(rgb, lut, kernel="numba")
    np.testing.assert_array_equal(stain.normalise(rgb, lut),  # "auto" falls back to numpy
                                  stain.normalise(rgb, lut, kernel="numpy"))
