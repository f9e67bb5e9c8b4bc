"""The normalised multiscale image: working MPP plus x2 and x4 context levels, in zarr.

Work is cut into *super-tiles*: the block of level-0 tiles that one tile of the coarsest
level covers (4 x 4 tiles for context 1, 2, 4). A super-tile reads its tissue tiles once
from the slide, normalises them, writes them to level 0, and box-averages the same pixels
into the coarser levels, so those cost no extra slide reads. Super-tiles run in parallel
with dask and each leaves a marker file when all its chunks are on disk: a killed run
resumes at super-tile granularity and a finished one is skipped whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import zarr
from PIL import Image
from zarr.codecs import ZstdCodec

from .slide import GLASS, Slide
from .store import SlideStore

Normalise = Callable[[np.ndarray], np.ndarray]


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
    None keeps the slide's colours. ``progress`` is called with the number of super-tiles finished.
    """
    arrays = create_levels(store, spec, slide.size_um, inputs)
    marks = store.progress_dir("pyramid")
    groups = super_tile_groups(tiles, spec)

    todo = [(key, members) for key, members in groups.items()
            if not (marks / f"{key[0]}_{key[1]}").exists()]
    skipped = len(groups) - len(todo)
    if progress and skipped:
        progress(skipped)

    def run(key: tuple[int, int], members: list[tuple[int, int]]) -> int:
        _write_super_tile(slide, arrays, key, members, spec, normalise)
        (marks / f"{key[0]}_{key[1]}").touch()
        if progress:
            progress(1)
        return len(members)

    tasks = [dask.delayed(run)(key, members) for key, members in todo]
    written = sum(dask.compute(*tasks, scheduler=scheduler, num_workers=workers)) if tasks else 0
    return {"tiles": int(len(tiles)), "tiles_written": int(written),
            "super_tiles": len(groups), "super_tiles_skipped": skipped,
            "mpx_written": round(written * spec.tile_px**2 / 1e6, 3),
            "level_shapes": [list(a.shape) for a in arrays]}


def _write_super_tile(slide: Slide, arrays: list[zarr.Array], key: tuple[int, int],
                      members: list[tuple[int, int]], spec: PyramidSpec,
                      normalise: Normalise | None) -> None:
    """Read, normalise and write one super-tile at every level."""
    n, t = spec.super_tiles, spec.tile_px
    canvas = np.full((n * t, n * t, 3), GLASS, np.uint8)
    present = np.zeros((n, n), bool)
    tile_um = t * spec.mpp
    batch = np.stack([slide.read(c * tile_um, r * tile_um, t, t, spec.mpp) for r, c in members])
    if normalise is not None:
        batch = normalise(batch)  # one (B, t, t, 3) call: a single transfer on a GPU backend
    for (r, c), rgb in zip(members, batch, strict=True):
        lr, lc = r - key[0] * n, c - key[1] * n
        canvas[lr * t:(lr + 1) * t, lc * t:(lc + 1) * t] = rgb
        present[lr, lc] = True

    image = canvas
    for k, arr in enumerate(arrays):
        if k > 0:
            image = halve(image)
        per = n // spec.context[k]           # super-tile edge in level-k tiles
        span = spec.context[k]               # level-0 tiles along one level-k tile
        for i in range(per):
            for j in range(per):
                if not present[i * span:(i + 1) * span, j * span:(j + 1) * span].any():
                    continue
                _write_chunk(arr, key[0] * per + i, key[1] * per + j,
                             image[i * t:(i + 1) * t, j * t:(j + 1) * t])


def _write_chunk(arr: zarr.Array, row: int, col: int, rgb: np.ndarray) -> None:
    """Write one (t, t, 3) tile into chunk (row, col) of a (3, H, W) array, cropped at the
    array's edge."""
    t = arr.chunks[1]
    y0, x0 = row * t, col * t
    h, w = min(t, arr.shape[1] - y0), min(t, arr.shape[2] - x0)
    if h <= 0 or w <= 0:
        return
    arr[:, y0:y0 + h, x0:x0 + w] = np.moveaxis(rgb[:h, :w], -1, 0)


def halve(rgb: np.ndarray) -> np.ndarray:
    """2 x 2 box average of an (H, W, 3) uint8 image with even H and W, rounded.

    Pillow's ``reduce`` gives the same bytes as a numpy reshape-mean, ~7x faster.
    """
    return np.asarray(Image.fromarray(rgb).reduce(2))
