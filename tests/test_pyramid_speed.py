"""The pyramid's fast path (tile-level threads, chunks encoded and written without zarr's
setitem) writes exactly the pixels of a plain reference computation on a small slide."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import write_generic_tiff

from wsi_pipeline.errors import TileReadError
from wsi_pipeline.pyramid import (
    PyramidSpec,
    _ChunkWriter,
    _halved_mosaic,
    create_levels,
    halve,
    write_pyramid,
)
from wsi_pipeline.slide import GLASS, open_slide
from wsi_pipeline.store import SlideStore

SPEC = PyramidSpec(mpp=0.5, tile_px=64, context=(1, 2, 4))


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    """1700 x 1300 px at 0.25 um/px: tiles are read at half resolution, and neither edge
    is a whole number of tiles or super-tiles at any level."""
    rng = np.random.default_rng(4)
    base = rng.integers(40, 250, (13, 17, 3)).astype(np.uint8)
    rgb = np.kron(base, np.ones((100, 100, 1), np.uint8))
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    rgb[:, 1400:] = GLASS  # blank glass on the right
    return write_generic_tiff(tmp_path_factory.mktemp("pyr") / "small.tiff", rgb, mpp=0.25)


@pytest.fixture(scope="module")
def tiles():
    """About 60 % of the 11 x 14 tile grid, the last row and column included."""
    rng = np.random.default_rng(9)
    grid = np.stack(np.meshgrid(np.arange(11), np.arange(14), indexing="ij"), -1).reshape(-1, 2)
    keep = (rng.random(len(grid)) < 0.6) | (grid[:, 0] == 10) | (grid[:, 1] == 13)
    return grid[keep].astype(np.int32)


def tint(batch: np.ndarray) -> np.ndarray:
    """A stand-in stain normaliser: any per-pixel map of a (B, H, W, 3) batch."""
    assert batch.ndim == 4 and batch.shape[-1] == 3
    return (255 - batch // 3).astype(np.uint8)


def reference_levels(path, tiles, normalise) -> list[np.ndarray]:
    """Every level as (H, W, 3): tiles read one by one into a glass canvas, then 2 x 2
    means rounded half up, level after level."""
    t, n = SPEC.tile_px, SPEC.super_tiles
    with open_slide(path) as slide:
        rows, cols = tiles.max(0) + 1
        canvas = np.full((-(-rows // n) * n * t, -(-cols // n) * n * t, 3), GLASS, np.uint8)
        for r, c in tiles.tolist():
            rgb = slide.read(c * t * SPEC.mpp, r * t * SPEC.mpp, t, t, SPEC.mpp)
            if normalise is not None:
                rgb = normalise(rgb[None])[0]
            canvas[r * t:(r + 1) * t, c * t:(c + 1) * t] = rgb
        levels = [canvas]
        for _ in SPEC.context[1:]:
            h, w = levels[-1].shape[0] // 2, levels[-1].shape[1] // 2
            total = levels[-1].reshape(h, 2, w, 2, 3).astype(np.uint16).sum((1, 3))
            levels.append(((total + 2) // 4).astype(np.uint8))
        return [level[:shape[1], :shape[2]] for level, shape in
                zip(levels, (SPEC.level_shape(k, slide.size_um) for k in range(len(levels))),
                    strict=True)]


def written_levels(folder) -> list[np.ndarray]:
    group = zarr.open_group(str(folder), mode="r")["image"]
    return [np.moveaxis(group[str(k)][...], 0, -1) for k in range(len(SPEC.context))]


@pytest.mark.parametrize(("normalise", "workers", "scheduler"), [
    (tint, 2, "threads"), (None, 1, "threads"), (tint, 3, "threads"), (tint, 0, "threads"),
    (tint, 2, "sync")])
def test_levels_match_the_reference(small_slide, tiles, tmp_path, normalise, workers,
                                    scheduler):
    finished = []
    with open_slide(small_slide) as slide:
        stats = write_pyramid(slide, SlideStore(tmp_path / "s.zarr"), tiles, SPEC, normalise,
                              "x", workers=workers, scheduler=scheduler,
                              progress=finished.append)
    expected = reference_levels(small_slide, tiles, normalise)
    got = written_levels(tmp_path / "s.zarr")
    for k, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have.shape == want.shape, k
        np.testing.assert_array_equal(have, want, err_msg=f"level {k}")
    assert stats["tiles_written"] == len(tiles)
    assert sum(finished) == stats["super_tiles"] == len({(r // 4, c // 4) for r, c in tiles})


def test_a_rerun_skips_every_super_tile(small_slide, tiles, tmp_path):
    store = SlideStore(tmp_path / "s.zarr")
    with open_slide(small_slide) as slide:
        write_pyramid(slide, store, tiles, SPEC, tint, "x")
        again = write_pyramid(slide, store, tiles, SPEC, tint, "x")
    assert again["tiles_written"] == 0
    assert again["super_tiles_skipped"] == again["super_tiles"] > 1
    for want, have in zip(reference_levels(small_slide, tiles, tint),
                          written_levels(tmp_path / "s.zarr"), strict=True):
        np.testing.assert_array_equal(have, want)


class FailingSlide:
    """A slide whose read of one tile fails, as a corrupt JPEG tile would."""

    def __init__(self, slide, bad_x_um: float) -> None:
        self.slide, self.bad_x_um = slide, bad_x_um
        self.size_um = slide.size_um

    def read(self, x_um, y_um, w_px, h_px, mpp):
        if x_um == self.bad_x_um and y_um == 0:
            raise TileReadError("corrupt tile")
        return self.slide.read(x_um, y_um, w_px, h_px, mpp)


def test_a_failed_read_stops_the_stage_and_leaves_no_marker(small_slide, tmp_path):
    tiles = np.array([[r, c] for r in range(8) for c in range(8)], np.int32)
    store = SlideStore(tmp_path / "s.zarr")
    with open_slide(small_slide) as slide, pytest.raises(TileReadError):
        write_pyramid(FailingSlide(slide, 5 * 64 * SPEC.mpp), store, tiles, SPEC, None, "x")
    # tile (0, 5) is in super-tile (0, 1)
    assert "0_1" not in {p.name for p in store.progress_dir("pyramid").iterdir()}


def test_chunk_writer_fast_path_writes_what_zarr_writes(tmp_path):
    """Encoded and written here (create_levels' arrays) or through zarr (any other array):
    the same pixels, edge chunks and all-glass chunks included."""
    size_um = (150 * SPEC.mpp, 100 * SPEC.mpp)      # (3, 100, 150): 2 x 3 chunks of 64
    fast = create_levels(SlideStore(tmp_path / "a.zarr"), SPEC, size_um, "x")[0]
    plain = zarr.open_group(str(tmp_path / "b.zarr"), mode="w").create_array(
        "0", shape=fast.shape, dtype="uint8", chunks=fast.chunks, fill_value=GLASS,
        compressors=None)  # no zstd: through zarr
    writers = [_ChunkWriter(fast), _ChunkWriter(plain)]
    assert writers[0].encode is not None and writers[1].encode is None
    rng = np.random.default_rng(1)
    tiles = {(r, c): rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
             for r in range(2) for c in range(3)}
    tiles[(0, 1)][:] = GLASS                       # all glass: no chunk file
    for write in writers:
        for (r, c), rgb in tiles.items():
            write(r, c, rgb)
        write(1, 2, np.full((64, 64, 3), GLASS, np.uint8))  # glass over an earlier chunk
        write(2, 0, tiles[(0, 0)])                 # wholly outside the array: ignored
    np.testing.assert_array_equal(fast[...], plain[...])
    expected = np.full((128, 192, 3), GLASS, np.uint8)
    for (r, c), rgb in tiles.items():
        if (r, c) != (1, 2):
            expected[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64] = rgb
    np.testing.assert_array_equal(np.moveaxis(fast[...], 0, -1), expected[:100, :150])
    chunks = tmp_path / "a.zarr" / "image" / "0" / "c" / "0"
    assert {p.relative_to(chunks).as_posix() for p in chunks.rglob("*") if p.is_file()} == {
        "0/0", "0/2", "1/0", "1/1"}


@pytest.mark.parametrize("t", [6, 5])
def test_halved_mosaic_is_the_halved_whole(t):
    """Tiles halved one by one (even edge) or the pasted mosaic halved (odd edge): both
    equal halving the whole glass-padded mosaic."""
    rng = np.random.default_rng(t)
    places = [(0, 1), (2, 3), (3, 0), (1, 1)]
    tiles = [rng.integers(0, 256, (t, t, 3), dtype=np.uint8) for _ in places]
    mosaic = np.full((4 * t, 4 * t, 3), GLASS, np.uint8)
    for (r, c), tile in zip(places, tiles, strict=True):
        mosaic[r * t:(r + 1) * t, c * t:(c + 1) * t] = tile
    np.testing.assert_array_equal(_halved_mosaic(tiles, places, 4, t), halve(mosaic))
