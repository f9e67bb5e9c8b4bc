"""The normalised multiscale image: working MPP plus x2 and x4 context levels, in zarr.

Work is cut into *super-tiles*: the block of level-0 tiles that one tile of the coarsest
level covers (4 x 4 tiles for context 1, 2, 4). A super-tile reads its tissue tiles once
from the slide, normalises them, writes them to level 0, and box-averages the same pixels
into the coarser levels, so those cost no extra slide reads. Tiles are read in parallel one
by one, each super-tile is finished on the same threads once its last tile is in, and each
leaves a marker file when all its chunks are on disk: a killed run resumes at super-tile
granularity and a finished one is skipped whole.

Cost (benchmarks/bench_pyramid.py): reading the tiles is the floor. Normalising, halving,
encoding and writing add ~4.5 ms of CPU a 512 px tile (2.9 of it zstd and the chunk files)
to the ~35 ms of reading it at 0.5 um/px from a 0.25 um/px JPEG slide: the stage takes
~1.1x the CPU time of the reads alone, plus ~0.3 s a slide to build the stain LUT.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr
from numcodecs import Zstd
from PIL import Image
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.storage import LocalStore

from .slide import GLASS, Slide
from .store import SlideStore

Normalise = Callable[[np.ndarray], np.ndarray]
# finishes one super-tile: (key, member tiles, their RGB) -> tiles written
Finish = Callable[[tuple[int, int], list[tuple[int, int]], list[np.ndarray]], int]


@dataclass(frozen=True)
class PyramidSpec:
    """Geometry of the stored pyramid.

    mpp       level-0 (working) resolution, um/px
    tile_px   chunk edge at every level, px
    context   downsample factor of each level relative to level 0, powers of two from 1
    """

    mpp: float
    tile_px: int
    context: tuple[int, ...] = (1, 2, 4)

    def __post_init__(self) -> None:
        if self.context[0] != 1 or any(b != 2 * a for a, b in zip(self.context, self.context[1:],
                                                                    strict=False)):
            raise ValueError(f"context must be 1, 2, 4, ...; got {self.context}")

    @property
    def super_tiles(self) -> int:
        """Level-0 tiles along one edge of a super-tile."""
        return self.context[-1]

    def level_shape(self, level: int, size_um: tuple[float, float]) -> tuple[int, int, int]:
        """(3, H, W) of a level for a slide of ``size_um`` (width, height) microns."""
        level_mpp = self.mpp * self.context[level]
        return 3, math.ceil(size_um[1] / level_mpp), math.ceil(size_um[0] / level_mpp)


def create_levels(store: SlideStore, spec: PyramidSpec, size_um: tuple[float, float],
                  inputs: str) -> list[zarr.Array]:
    """Create (or reopen, when ``inputs`` match) the ``image/<k>`` arrays and their
    OME-Zarr multiscales metadata. Unwritten chunks read as glass white."""
    group = store.root.require_group("image")
    reuse = group.attrs.get("inputs") == inputs and all(str(k) in group for k in
                                                         range(len(spec.context)))
    if not reuse:
        # Unstamp first, then drop the old super-tile markers, then overwrite: a kill at any
        # point leaves no marker that could vouch for the new, still empty arrays.
        group.attrs["inputs"] = None
        store.forget("pyramid")
    arrays = []
    for k in range(len(spec.context)):
        if reuse:
            arrays.append(group[str(k)])
            continue
        arrays.append(group.create_array(
            str(k), shape=spec.level_shape(k, size_um), dtype="uint8",
            chunks=(3, spec.tile_px, spec.tile_px), fill_value=GLASS, overwrite=True,
            compressors=ZstdCodec(level=1),  # lossless; ~15% smaller, faster than blosc-lz4 here
            dimension_names=("c", "y", "x")))
    if not reuse:
        group.attrs.update(_ome_multiscales(spec) | {"inputs": inputs})
    return arrays


def super_tile_groups(tiles: np.ndarray, spec: PyramidSpec
                      ) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Level-0 tiles ((N, 2) row, col) grouped by the super-tile (row, col) holding them."""
    n = spec.super_tiles
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, c in tiles.tolist():
        groups.setdefault((r // n, c // n), []).append((r, c))
    return dict(sorted(groups.items()))


def _ome_multiscales(spec: PyramidSpec) -> dict[str, Any]:
    """OME-Zarr 0.5 multiscales (axes c, y, x; scale in micrometres)."""
    datasets = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, spec.mpp * f, spec.mpp * f]}]}
        for k, f in enumerate(spec.context)]
    return {"ome": {"version": "0.5", "multiscales": [{
        "name": "normalised",
        "axes": [{"name": "c", "type": "channel"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": datasets}],
        "omero": {"channels": [{"label": c, "color": col, "window": {"start": 0, "end": 255}}
                               for c, col in (("R", "FF0000"), ("G", "00FF00"),
                                              ("B", "0000FF"))],
                  "rdefs": {"model": "color"}}}}


def write_pyramid(slide: Slide, store: SlideStore, tiles: np.ndarray, spec: PyramidSpec,
                  normalise: Normalise | None, inputs: str, *, workers: int = 2,
                  scheduler: Any = "threads", progress: Callable[[int], None] | None = None
                  ) -> dict[str, Any]:
    """Write the normalised pyramid of the level-0 ``tiles`` ((N, 2) row, col) into
    ``store`` and return counts (tiles and megapixels written, super-tiles skipped).

    ``normalise`` maps a batch of RGB uint8 tiles (B, H, W, 3) to their normalised RGB;
    None keeps the slide's colours. ``progress`` is called with the number of super-tiles
    finished. ``scheduler`` "threads" (default) reads tile by tile on ``workers`` threads and
    finishes each super-tile on the same threads as soon as its last tile is in; any other
    dask scheduler (a name such as "sync" or "processes", or a client) runs one dask task per
    super-tile instead, reads included.
    """
    arrays = create_levels(store, spec, slide.size_um, inputs)
    marks = store.progress_dir("pyramid")
    groups = super_tile_groups(tiles, spec)
    writers = [_ChunkWriter(arr) for arr in arrays]

    todo = [(key, members) for key, members in groups.items()
            if not (marks / f"{key[0]}_{key[1]}").exists()]
    skipped = len(groups) - len(todo)
    if progress and skipped:
        progress(skipped)

    def finish(key: tuple[int, int], members: list[tuple[int, int]],
               rgb: list[np.ndarray]) -> int:
        _finish_super_tile(writers, key, members, rgb, spec, normalise)
        (marks / f"{key[0]}_{key[1]}").touch()
        return len(members)

    if scheduler == "threads":
        written = _run_threaded(slide, todo, spec, finish, workers, progress)
    else:
        def run(key: tuple[int, int], members: list[tuple[int, int]]) -> int:
            done = finish(key, members, [_read_tile(slide, spec, r, c) for r, c in members])
            if progress:
                progress(1)
            return done

        tasks = [dask.delayed(run)(key, members) for key, members in todo]
        written = sum(dask.compute(*tasks, scheduler=scheduler, num_workers=workers)) \
            if tasks else 0
    return {"tiles": int(len(tiles)), "tiles_written": int(written),
            "super_tiles": len(groups), "super_tiles_skipped": skipped,
            "mpx_written": round(written * spec.tile_px**2 / 1e6, 3),
            "level_shapes": [list(a.shape) for a in arrays]}


def _read_tile(slide: Slide, spec: PyramidSpec, row: int, col: int) -> np.ndarray:
    """Level-0 tile (row, col) from the slide, RGB uint8 (tile_px, tile_px, 3)."""
    t, tile_um = spec.tile_px, spec.tile_px * spec.mpp
    return slide.read(col * tile_um, row * tile_um, t, t, spec.mpp)


def _run_threaded(slide: Slide, todo: list[tuple[tuple[int, int], list[tuple[int, int]]]],
                  spec: PyramidSpec, finish: Finish, workers: int,
                  progress: Callable[[int], None] | None) -> int:
    """Read every member tile of ``todo`` as its own task on a pool of ``workers`` threads
    and ``finish`` each super-tile there once all its tiles are read; return the tiles
    written.

    Tile-sized tasks keep every thread busy to the end (one task per super-tile left the
    last, uneven super-tiles to one thread). At most ``2 * workers`` reads are queued and
    reading pauses while more than ``workers`` super-tiles wait to be written, so memory
    holds a few super-tiles whatever the slide size.
    """
    workers = max(1, workers)
    jobs = [(i, j, r, c) for i, (_, members) in enumerate(todo)
            for j, (r, c) in enumerate(members)]
    got: list[list[Any]] = [[None] * len(members) for _, members in todo]
    missing = [len(members) for _, members in todo]
    reads: dict[Future, tuple[int, int]] = {}
    finishing: set[Future] = set()
    written = queued = 0
    pool = ThreadPoolExecutor(workers, thread_name_prefix="pyramid")
    try:
        while queued < len(jobs) or reads or finishing:
            while (queued < len(jobs) and len(reads) < 2 * workers
                   and len(finishing) <= workers):
                i, j, r, c = jobs[queued]
                reads[pool.submit(_read_tile, slide, spec, r, c)] = (i, j)
                queued += 1
            done, _ = wait([*reads, *finishing], return_when=FIRST_COMPLETED)
            for future in done:
                if future in finishing:
                    finishing.remove(future)
                    written += future.result()
                    if progress:
                        progress(1)
                    continue
                i, j = reads.pop(future)
                got[i][j] = future.result()
                missing[i] -= 1
                if not missing[i]:
                    key, members = todo[i]
                    finishing.add(pool.submit(finish, key, members, got[i]))
                    got[i] = []  # the task holds the tiles now
    finally:
        pool.shutdown(cancel_futures=True)
    return written


def _finish_super_tile(writers: list[_ChunkWriter], key: tuple[int, int],
                       members: list[tuple[int, int]], rgb: list[np.ndarray],
                       spec: PyramidSpec, normalise: Normalise | None) -> None:
    """Normalise the read tiles ``rgb`` ((t, t, 3) each, in ``members`` order) of one
    super-tile and write them at every level."""
    n, t = spec.super_tiles, spec.tile_px
    # one (B, t, t, 3) call: a single transfer on a GPU backend
    batch = rgb if normalise is None else normalise(np.stack(rgb))
    places = [(r - key[0] * n, c - key[1] * n) for r, c in members]
    present = np.zeros((n, n), bool)
    for (r, c), (lr, lc), tile in zip(members, places, batch, strict=True):
        writers[0](r, c, tile)
        present[lr, lc] = True

    image = _halved_mosaic(batch, places, n, t) if len(writers) > 1 else None
    for k, write in enumerate(writers[1:], start=1):
        if k > 1:
            image = halve(image)
        per = n // spec.context[k]           # super-tile edge in level-k tiles
        span = spec.context[k]               # level-0 tiles along one level-k tile
        for i in range(per):
            for j in range(per):
                if present[i * span:(i + 1) * span, j * span:(j + 1) * span].any():
                    write(key[0] * per + i, key[1] * per + j,
                          image[i * t:(i + 1) * t, j * t:(j + 1) * t])


def _halved_mosaic(tiles: Sequence[np.ndarray], places: list[tuple[int, int]], n: int,
                   t: int) -> np.ndarray:
    """`halve` of the (n t, n t, 3) mosaic of the (t, t, 3) ``tiles`` at (row, col)
    ``places``, glass elsewhere.

    With t even no 2 x 2 block straddles two tiles, so each tile is halved on its own and
    glass stays glass: half the work of halving the whole mosaic.
    """
    if t % 2:
        mosaic = np.full((n * t, n * t, 3), GLASS, np.uint8)
        for (r, c), tile in zip(places, tiles, strict=True):
            mosaic[r * t:(r + 1) * t, c * t:(c + 1) * t] = tile
        return halve(mosaic)
    h = t // 2
    out = np.full((n * h, n * h, 3), GLASS, np.uint8)
    for (r, c), tile in zip(places, tiles, strict=True):
        out[r * h:(r + 1) * h, c * h:(c + 1) * h] = halve(tile)
    return out


class _ChunkWriter:
    """Writes (t, t, 3) tiles into the chunks of one (3, H, W) level array.

    Where the array has the plain bytes + zstd codecs of `create_levels` in a local store,
    a chunk is encoded here and written as zarr's LocalStore writes it (a temporary file,
    then a rename): ~1.4 ms of CPU a 512 px chunk against ~3.3 ms for ``arr[...] =``,
    most of which is zarr's asyncio machinery. Any other array goes through zarr.
    """

    def __init__(self, arr: zarr.Array) -> None:
        self.arr, self.edge = arr, arr.chunks[1]
        self.encode: Callable[[np.ndarray], bytes] | None = None
        self.folder: Path | None = None    # the array's folder in the local store
        codecs, store = getattr(arr.metadata, "codecs", ()), arr.store_path.store
        if (isinstance(store, LocalStore) and arr.metadata.zarr_format == 3
                and arr.dtype == np.uint8 and arr.fill_value == GLASS
                and arr.chunks == (3, self.edge, self.edge) and len(codecs) == 2
                and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec)):
            self.encode = Zstd(level=codecs[1].level, checksum=codecs[1].checksum).encode
            self.folder = Path(store.root) / arr.store_path.path

    def __call__(self, row: int, col: int, rgb: np.ndarray) -> None:
        """Write ``rgb`` (t, t, 3) into chunk (row, col), cropped at the array's edge."""
        arr, t = self.arr, self.edge
        y0, x0 = row * t, col * t
        h, w = min(t, arr.shape[1] - y0), min(t, arr.shape[2] - x0)
        if h <= 0 or w <= 0:
            return
        block = rgb[:h, :w].transpose(2, 0, 1)
        if self.encode is None or self.folder is None:
            # a contiguous copy: zarr's own copy of a strided view is ~5x slower
            arr[:, y0:y0 + h, x0:x0 + w] = np.ascontiguousarray(block)
            return
        if h < t or w < t:  # an edge chunk is stored whole, padded with the fill value
            chunk = np.full((3, t, t), GLASS, np.uint8)
            chunk[:, :h, :w] = block
        else:
            chunk = np.ascontiguousarray(block)
        path = self.folder / arr.metadata.encode_chunk_key((0, row, col))
        if chunk.min() == GLASS:  # all glass (255 is the top): as zarr, no file; reads as fill
            path.unlink(missing_ok=True)
            return
        data = self.encode(chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def halve(rgb: np.ndarray) -> np.ndarray:
    """2 x 2 box average of an (H, W, 3) uint8 image with even H and W, rounded.

    Pillow's ``reduce`` gives the same bytes as a numpy reshape-mean, ~7x faster.
    """
    return np.asarray(Image.fromarray(rgb).reduce(2))
