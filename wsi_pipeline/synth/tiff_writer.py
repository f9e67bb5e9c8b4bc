"""Streamed writer of pyramidal, tiled, JPEG-compressed Aperio SVS files.

Layout (as written by Aperio scanners, and as openslide's `aperio` driver and tifffile's
SVS parser expect):

    IFD 0   level 0, tiled JPEG, ImageDescription "Aperio Image Library ...|MPP = ..|AppMag = .."
    IFD 1   thumbnail, stripped JPEG
    IFD 2.. further levels (downsample 4, 16, ...), tiled JPEG, NewSubfileType 0
    label   stripped LZW, NewSubfileType 1, description "...\\nlabel WxH"
    macro   stripped JPEG, NewSubfileType 9, description "...\\nmacro WxH"

Memory stays bounded by a few tiles whatever the slide size: level 0 arrives as an
iterator of already-encoded tiles (rendered elsewhere, possibly in worker processes), each
with its 4x-downsampled block; those blocks go to a temporary file, from which level 1 is
assembled tile by tile (producing the blocks of level 2), and so on. Empty-glass tiles are
marked `None` and replaced by pre-encoded glass, and their blocks are never stored.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import imagecodecs
import numpy as np
import tifffile

APERIO_HEADER = "Aperio Image Library v10.0.51"
MIN_LEVEL_SIDE_PX = 1000  # keep adding levels while the smaller side is at least this
DOWNSAMPLE = 4


def jpeg_tile(rgb: np.ndarray, quality: int) -> bytes:
    """Encode an RGB tile exactly as tifffile does for JPEG + YCbCr 2x2 subsampling."""
    return imagecodecs.jpeg_encode(rgb, level=quality, subsampling=(2, 2),
                                   outcolorspace="YCBCR")


def downsample4(rgb: np.ndarray) -> np.ndarray:
    """Area-average an (H, W, 3) uint8 image by 4 in each direction (H, W multiples of 4)."""
    h, w, c = rgb.shape
    s = rgb.reshape(h // 4, 4, w // 4, 4, c).sum(axis=(1, 3), dtype=np.uint16)
    return ((s + 8) >> 4).astype(np.uint8)


def level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) per level: downsample 1, 4, 16, ... until the smaller side < 1000."""
    sizes = [(int(width), int(height))]
    while min(sizes[-1]) >= MIN_LEVEL_SIDE_PX:
        w, h = sizes[-1]
        sizes.append((max(w // DOWNSAMPLE, 1), max(h // DOWNSAMPLE, 1)))
    return sizes


def aperio_mag(mpp: float) -> int:
    """Nominal objective magnification for a pixel size (0.25 um/px -> 40x)."""
    return max(1, int(round(10.0 / mpp)))


@dataclass
class Level0Tile:
    """One rendered level-0 tile: JPEG bytes and its 4x-downsampled RGB block."""

    jpeg: bytes
    block: np.ndarray  # (tile/4, tile/4, 3) uint8


class _BlockStore:
    """Downsampled blocks of non-glass tiles in a temporary file, keyed by tile (row, col)."""

    def __init__(self, folder: str, block_shape: tuple[int, int, int]):
        self.fh = tempfile.TemporaryFile(dir=folder, prefix=".wsi-synth-blocks-")
        self.shape = block_shape
        self.nbytes = int(np.prod(block_shape))
        self.offsets: dict[tuple[int, int], int] = {}
        self.end = 0

    def put(self, key: tuple[int, int], block: np.ndarray) -> None:
        self.fh.seek(self.end)
        self.fh.write(np.ascontiguousarray(block).tobytes())
        self.offsets[key] = self.end
        self.end += self.nbytes

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        off = self.offsets.get(key)
        if off is None:
            return None
        buf = os.pread(self.fh.fileno(), self.nbytes, off)
        return np.frombuffer(buf, np.uint8).reshape(self.shape)

    def close(self) -> None:
        self.fh.close()


def _description(first_line: str, fields: dict[str, object]) -> str:
    return f"{APERIO_HEADER}\r\n{first_line}" + "".join(f"|{k} = {v}" for k, v in fields.items())


def write_aperio(
    path: str | os.PathLike,
    level0: Iterable[Level0Tile | None],
    *,
    width: int,
    height: int,
    mpp: float,
    tile: int,
    quality: int,
    glass_rgb: Callable[[int], np.ndarray],
    label_rgb: np.ndarray | None = None,
    macro_rgb: Callable[[np.ndarray], np.ndarray] | None = None,
    extra_fields: dict[str, object] | None = None,
    on_level: Callable[[int, int], None] | None = None,
) -> dict:
    """Write an Aperio SVS pyramid from an iterator of level-0 tiles (row-major order).

    level0: one item per tile, `None` for empty glass; glass_rgb(k): the k-th glass
    tile variant (tile, tile, 3) uint8. label_rgb: label image; macro_rgb(thumbnail)
    returns the macro image. on_level(level, n_tiles) is called as each level starts.
    Returns {"levels": [(w, h), ...], "thumbnail": (w, h), "bytes": file size}.
    """
    path = os.fspath(path)
    sizes = level_sizes(width, height)
    mag = aperio_mag(mpp)
    fields = {"AppMag": mag, "StripeWidth": 2040, "ScanScope ID": "WSI-SYNTH",
              "Filename": os.path.splitext(os.path.basename(path))[0],
              "MPP": f"{mpp:.6g}", **(extra_fields or {})}
    res_per_cm = 1e4 / mpp
    bigtiff = width * height * 3 > 2**31
    block = tile // DOWNSAMPLE

    glass_variants = [glass_rgb(k) for k in range(4)]
    glass_jpegs = [jpeg_tile(g, quality) for g in glass_variants]
    glass_block = downsample4(glass_variants[0])
    glass_colour = glass_block.reshape(-1, 3).mean(0).round().astype(np.uint8)

    # thumbnail: power-of-two factor >= 4 so that the longer side is <= 1024 px
    f_thumb = 4
    while max(width, height) / f_thumb > 1024 and f_thumb < tile:
        f_thumb *= 2
    thumb = np.empty((-(-height // f_thumb), -(-width // f_thumb), 3), np.uint8)
    thumb[:] = glass_colour
    tb = tile // f_thumb
    cols0 = -(-width // tile)

    folder = os.path.dirname(os.path.abspath(path))
    stores: list[_BlockStore] = []
    try:
        with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
            common = dict(photometric="rgb", compression="jpeg",
                          compressionargs={"level": quality}, subsampling=(2, 2),
                          metadata=None, software="wsi_pipeline.synth",
                          resolutionunit="CENTIMETER")
            # ---- level 0
            store = _BlockStore(folder, (block, block, 3))
            stores.append(store)

            def level0_bytes() -> Iterator[bytes]:
                for n, item in enumerate(level0):
                    ty, tx = divmod(n, cols0)
                    if item is None:
                        yield glass_jpegs[(tx * 7 + ty * 13) % len(glass_jpegs)]
                        continue
                    store.put((ty, tx), item.block)
                    small = item.block
                    g = f_thumb // DOWNSAMPLE
                    if g > 1:
                        small = small.reshape(tb, g, tb, g, 3).mean(axis=(1, 3))
                    y, x = ty * tb, tx * tb
                    sub = thumb[y:y + tb, x:x + tb]
                    sub[:] = small[: sub.shape[0], : sub.shape[1]]
                    yield item.jpeg

            if on_level:
                on_level(0, cols0 * -(-height // tile))
            desc0 = _description(
                f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}",
                fields)
            tw.write(level0_bytes(), shape=(height, width, 3), dtype=np.uint8,
                     tile=(tile, tile), description=desc0,
                     resolution=(res_per_cm, res_per_cm), **common)

            # ---- thumbnail (2nd IFD)
            th, tw_ = height // f_thumb, width // f_thumb
            thumb_img = np.ascontiguousarray(thumb[:max(th, 1), :max(tw_, 1)])
            if max(thumb_img.shape[:2]) > 1024:
                from PIL import Image

                im = Image.fromarray(thumb_img)
                im.thumbnail((1024, 1024))
                thumb_img = np.asarray(im)
            desc_t = _description(
                f"{width}x{height} -> {thumb_img.shape[1]}x{thumb_img.shape[0]} - ", fields)
            tw.write(thumb_img, rowsperstrip=16, description=desc_t,
                     resolution=(res_per_cm * thumb_img.shape[1] / width,) * 2, **common)

            # ---- further levels, each assembled from the previous level's blocks
            prev_store, prev_cols, prev_rows = store, cols0, -(-height // tile)
            for lvl in range(1, len(sizes)):
                lw, lh = sizes[lvl]
                cols, rows = -(-lw // tile), -(-lh // tile)
                store = _BlockStore(folder, (block, block, 3))
                stores.append(store)
                glass_level = np.tile(glass_block, (DOWNSAMPLE, DOWNSAMPLE, 1))

                def level_tiles(prev=prev_store, pc=prev_cols, pr=prev_rows, cols=cols,
                                rows=rows, store=store, glass_level=glass_level):
                    for ty in range(rows):
                        for tx in range(cols):
                            out = None
                            for i in range(DOWNSAMPLE):
                                for j in range(DOWNSAMPLE):
                                    r, c = ty * DOWNSAMPLE + i, tx * DOWNSAMPLE + j
                                    b = prev.get((r, c)) if r < pr and c < pc else None
                                    if b is None:
                                        continue
                                    if out is None:
                                        out = glass_level.copy()
                                    out[i * block:(i + 1) * block,
                                        j * block:(j + 1) * block] = b
                            if out is None:
                                yield glass_level
                            else:
                                store.put((ty, tx), downsample4(out))
                                yield out

                if on_level:
                    on_level(lvl, cols * rows)
                ds = width / lw
                desc = _description(
                    f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) -> "
                    f"{lw}x{lh} JPEG/RGB Q={quality}", fields)
                tw.write(level_tiles(), shape=(lh, lw, 3), dtype=np.uint8,
                         tile=(tile, tile), description=desc, maxworkers=2,
                         buffersize=16 * tile * tile * 3,  # tifffile buffers ~16 tiles
                         resolution=(res_per_cm / ds, res_per_cm / ds), **common)
                prev_store.close()
                prev_store, prev_cols, prev_rows = store, cols, rows

            # ---- label and macro (associated images)
            if label_rgb is not None:
                desc_l = (f"{APERIO_HEADER}\nlabel "
                          f"{label_rgb.shape[1]}x{label_rgb.shape[0]}")
                tw.write(np.ascontiguousarray(label_rgb), photometric="rgb",
                         compression="lzw", predictor=True, rowsperstrip=8,
                         subfiletype=1, description=desc_l, metadata=None,
                         software="wsi_pipeline.synth")
            if macro_rgb is not None:
                macro = np.ascontiguousarray(macro_rgb(thumb_img))
                desc_m = f"{APERIO_HEADER}\nmacro {macro.shape[1]}x{macro.shape[0]}"
                tw.write(macro, photometric="rgb", compression="jpeg",
                         compressionargs={"level": 85}, subsampling=(2, 2),
                         rowsperstrip=16, subfiletype=9, description=desc_m,
                         metadata=None, software="wsi_pipeline.synth")
    finally:
        for s in stores:
            s.close()
    return {"levels": sizes, "thumbnail": (int(thumb_img.shape[1]), int(thumb_img.shape[0])),
            "thumbnail_rgb": thumb_img, "bytes": os.path.getsize(path)}
