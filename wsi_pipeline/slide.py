"""Slide access over two backends, openslide and tiffslide, in physical units.

One `Slide` type answers the questions every stage asks: how big is the slide, at which
microns per pixel (MPP) was it scanned and where did that number come from, and what are the
pixels of a region at a requested MPP. A region is read from the pyramid level nearest below
the requested resolution and only the remaining factor is resized, so a thumbnail never
decodes level 0 when a coarser level serves.

A `Slide` is safe to share between threads (each thread gets its own backend handle) and
between processes (it pickles as its path and options and reopens on arrival).

>>> slide = open_slide("CMU-1-Small-Region.svs")            # doctest: +SKIP
>>> slide.mpp, slide.mpp_source                              # doctest: +SKIP
(0.499, 'vendor metadata (aperio.MPP)')
>>> tile = slide.read(x_um=100.0, y_um=200.0, w_px=512, h_px=512, mpp=1.0)  # doctest: +SKIP
>>> tile.shape, tile.dtype                                  # doctest: +SKIP
((512, 512, 3), dtype('uint8'))
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .errors import MissingMpp, SlideNotFound, TileReadError, UnreadableSlide, UsageError

Backend = Literal["auto", "openslide", "tiffslide"]
BACKENDS: tuple[str, ...] = ("auto", "openslide", "tiffslide")

# Formats only openslide reads; everything tiff-like can go to either backend.
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
     ".dcm", ".qptiff"}
)
# A microscope slide is scanned between ~0.1 and ~20 um/px; TIFF resolution tags outside this
# range are almost always a 72/96/300 dpi default written by a generic image library.
PLAUSIBLE_MPP = (0.05, 50.0)
GLASS = 255  # value painted where there is no slide or tissue: blank glass (all channels)


def is_url(path: str | os.PathLike) -> bool:
    """True for fsspec-style URLs (``s3://``, ``https://``, ``memory://``...)."""
    return "://" in str(path)


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels and its downsample relative to level 0."""

    width: int
    height: int
    downsample: float


class Slide:
    """A whole-slide image opened with one backend, addressed in microns.

    Parameters
    ----------
    path
        Local file path or an fsspec URL (URLs always use tiffslide).
    backend
        ``"openslide"``, ``"tiffslide"`` or ``"auto"`` (openslide for local files, with a
        fall-back to tiffslide for TIFFs openslide does not recognise; tiffslide for URLs).
    mpp
        Microns per pixel at level 0, overriding the slide's metadata (``--mpp``).

    Raises
    ------
    SlideNotFound, UnreadableSlide, MissingMpp
    """

    def __init__(self, path: str | os.PathLike, backend: Backend = "auto",
                 mpp: float | None = None) -> None:
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.path = str(path)
        self._requested_backend = backend
        self._mpp_override = mpp
        self._local = threading.local()
        if not is_url(self.path) and not Path(self.path).exists():
            raise SlideNotFound(f"{self.path}: no such file")
        if not is_url(self.path) and Path(self.path).is_dir():
            raise UnreadableSlide(f"{self.path}: is a folder, not a slide file")
        handle, self.backend = _open_handle(self.path, backend)
        self._local.handle = handle
        self._local.pid = os.getpid()
        props = {str(k): v for k, v in handle.properties.items()}
        self.properties: Mapping[str, Any] = props
        self.vendor: str = str(props.get(f"{self.backend}.vendor") or "unknown")
        self.levels: tuple[Level, ...] = tuple(
            Level(int(w), int(h), float(d))
            for (w, h), d in zip(handle.level_dimensions, handle.level_downsamples, strict=True)
        )
        self.mpp, self.mpp_source = _resolve_mpp(self.path, props, self.backend, mpp)

    # -- pickling: a worker process reopens the file with the same options ------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "backend": self.backend, "mpp": self._mpp_override}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["backend"], state["mpp"])  # type: ignore[misc]

    def _handle(self) -> Any:
        """This thread's (and this process's) own backend handle."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid() or not hasattr(local, "handle"):
            local.handle, _ = _open_handle(self.path, self.backend)
            local.pid = os.getpid()
        return local.handle

    def close(self) -> None:
        handle = getattr(self._local, "handle", None)
        if handle is not None:
            handle.close()
            del self._local.handle

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.path!r}, {w}x{h} px, mpp={self.mpp:g} [{self.mpp_source}], " \
               f"backend={self.backend}, levels={len(self.levels)})"

    # -- geometry ---------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.levels[0].width, self.levels[0].height

    @property
    def size_um(self) -> tuple[float, float]:
        """(width, height) of the slide in microns."""
        w, h = self.dimensions
        return w * self.mpp, h * self.mpp

    @property
    def level_mpps(self) -> tuple[float, ...]:
        """Microns per pixel of each pyramid level."""
        return tuple(self.mpp * lv.downsample for lv in self.levels)

    def best_level(self, mpp: float) -> int:
        """Index of the coarsest level whose MPP is at or below ``mpp`` (nearest below).

        A 1 % tolerance lets a 0.5034 um/px level serve a 0.5 um/px request.
        """
        below = [i for i, m in enumerate(self.level_mpps) if m <= mpp * 1.01]
        return max(below, key=lambda i: self.level_mpps[i]) if below else 0

    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro and thumbnail images stored in the file, as RGB uint8 arrays."""
        out = {}
        for name, image in self._handle().associated_images.items():
            if isinstance(image, np.ndarray):
                arr = image
            else:
                arr = np.asarray(image.convert("RGB"))
            out[str(name)] = arr[..., :3] if arr.ndim == 3 else np.stack([arr] * 3, axis=-1)
        return out

    # -- pixels ------------------------------------------------------------------------------
    def read_level(self, level: int, x_px: int, y_px: int, w_px: int, h_px: int) -> np.ndarray:
        """Raw pixels of a level-``level`` region, RGB uint8 (h_px, w_px, 3).

        ``x_px, y_px`` are in that level's own pixel grid. Parts outside the slide are glass
        white (255).
        """
        lv = self.levels[level]
        out = np.full((h_px, w_px, 3), GLASS, np.uint8)
        x0, y0 = max(x_px, 0), max(y_px, 0)
        x1, y1 = min(x_px + w_px, lv.width), min(y_px + h_px, lv.height)
        if x1 <= x0 or y1 <= y0:
            return out
        # Backends address regions by their level-0 top-left corner.
        loc = (round(x0 * lv.downsample), round(y0 * lv.downsample))
        try:
            size = (x1 - x0, y1 - y0)
            if self.backend == "tiffslide":
                region = self._handle().read_region(loc, level, size, as_array=True)
            else:
                region = self._handle().read_region(loc, level, size)
        except Exception as exc:  # backends raise their own types for corrupt tiles
            raise TileReadError(
                f"{self.path}: reading pixels failed at level {level} ({x0},{y0}): "
                f"{_one_line(exc)}") from exc
        out[y0 - y_px:y1 - y_px, x0 - x_px:x1 - x_px] = _to_rgb(region)
        return out

    def read(self, x_um: float, y_um: float, w_px: int, h_px: int, mpp: float) -> np.ndarray:
        """RGB uint8 (h_px, w_px, 3) of the region whose top-left corner is at
        (``x_um``, ``y_um``) microns from the slide origin, resampled to ``mpp`` um/px.

        Reads the level nearest below ``mpp`` and resizes only the remaining factor
        (area-averaging when shrinking). Outside the slide is glass white.
        """
        level = self.best_level(mpp)
        level_mpp = self.level_mpps[level]
        scale = mpp / level_mpp  # source pixels per output pixel, >= ~1
        # Source window in level pixels (fractional), then the integer box that contains it.
        sx, sy = x_um / level_mpp, y_um / level_mpp
        sw, sh = w_px * scale, h_px * scale
        if abs(scale - 1.0) < 1e-3 and _is_int(sx) and _is_int(sy):
            return self.read_level(level, round(sx), round(sy), w_px, h_px)
        ix, iy = math.floor(sx), math.floor(sy)
        iw, ih = math.ceil(sx + sw) - ix, math.ceil(sy + sh) - iy
        src = self.read_level(level, ix, iy, iw, ih)
        box = (sx - ix, sy - iy, sx - ix + sw, sy - iy + sh)
        resample = Image.Resampling.BOX if scale > 1 else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(src).resize((w_px, h_px), resample, box=box))

    def thumbnail(self, mpp: float, max_read_px: int = 4096) -> np.ndarray:
        """The whole slide at about ``mpp`` um/px, RGB uint8 (H, W, 3).

        Read in strips of at most ``max_read_px``^2 source pixels so that memory stays bounded
        by the thumbnail size even on a single-level slide.
        """
        w_um, h_um = self.size_um
        out_w, out_h = max(1, round(w_um / mpp)), max(1, round(h_um / mpp))
        level = self.best_level(mpp)
        source_rows = max(1, max_read_px**2 // self.levels[level].width)  # <= max_read_px^2 px
        rows = max(1, int(source_rows * self.level_mpps[level] / mpp))
        strips = [
            self.read(0.0, y * mpp, out_w, min(rows, out_h - y), mpp)
            for y in range(0, out_h, rows)
        ]
        return np.concatenate(strips, axis=0)


def open_slide(path: str | os.PathLike, backend: Backend = "auto",
               mpp: float | None = None) -> Slide:
    """Open a slide file or URL; see `Slide`."""
    return Slide(path, backend=backend, mpp=mpp)


def find_slides(path: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Slide files in a folder, sorted; ground-truth sidecars (``*.truth.*``) are skipped."""
    folder = Path(path)
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in folder.glob(pattern)
        if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and ".truth." not in p.name
    )


# -- helpers -----------------------------------------------------------------------------------
# Ordinary image formats: a photo or an exported tile, not a whole-slide image
PHOTO_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP",
               b"RIFF": "WebP"}


def _refuse_photo(path: str) -> None:
    """One clear line for a photo or exported tile given as a slide."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return   # the backends say what is wrong with the file
    kind = next((name for magic, name in PHOTO_MAGIC.items() if head.startswith(magic)), None)
    if kind is not None:
        raise UnreadableSlide(
            f"{path}: a {kind} image, not a whole-slide image (no pyramid, no microns per "
            "pixel); scan the glass, or make image tiles into slides with "
            "wsi_pipeline.tiles.tiles_to_slides(folder, out, mpp=UM_PER_PX, colours=...)")


def _open_handle(path: str, backend: str) -> tuple[Any, str]:
    """Open ``path`` with the requested backend; return (handle, backend actually used)."""
    if not is_url(path):
        _refuse_photo(path)
    if backend == "auto":
        backend = "tiffslide" if is_url(path) else "openslide"
        if backend == "openslide":
            import openslide

            try:
                return openslide.OpenSlide(path), "openslide"
            except openslide.OpenSlideUnsupportedFormatError:
                backend = "tiffslide"  # a TIFF openslide does not recognise may still open
            except (openslide.OpenSlideError, OSError) as exc:
                raise UnreadableSlide(f"{path}: cannot open slide: {_one_line(exc)}") from exc
    if backend == "openslide":
        import openslide

        try:
            return openslide.OpenSlide(path), "openslide"
        except (openslide.OpenSlideError, OSError) as exc:
            raise UnreadableSlide(f"{path}: cannot open slide: {_one_line(exc)}") from exc
    import tiffslide

    try:
        return tiffslide.TiffSlide(path), "tiffslide"
    except Exception as exc:  # tifffile raises many types for non-TIFF or corrupt input
        raise UnreadableSlide(f"{path}: cannot open slide: {_one_line(exc)}") from exc


def _resolve_mpp(path: str, props: Mapping[str, Any], backend: str,
                 override: float | None) -> tuple[float, str]:
    """Level-0 MPP and a words description of where it came from."""
    if override is not None:
        if not PLAUSIBLE_MPP[0] <= override <= PLAUSIBLE_MPP[1]:
            raise UsageError(f"--mpp {override} is outside {PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]}"
                             " um/px")
        return float(override), "override (--mpp)"
    raw_x, raw_y = props.get(f"{backend}.mpp-x"), props.get(f"{backend}.mpp-y")
    if raw_x in (None, "", "0") and raw_y in (None, "", "0"):
        raise MissingMpp(f"{path}: the slide has no microns-per-pixel in its metadata; "
                         "give it with --mpp (e.g. --mpp 0.25 for a 40x scan, 0.5 for 20x)")
    mpp_x = float(raw_x or raw_y)
    mpp_y = float(raw_y or raw_x)
    if "aperio.MPP" in props:
        source = "vendor metadata (aperio.MPP)"
    elif props.get(f"{backend}.vendor") in (None, "generic-tiff"):
        source = "TIFF resolution tags"
    else:
        source = f"vendor metadata ({props.get(f'{backend}.vendor')})"
    if not PLAUSIBLE_MPP[0] <= mpp_x <= PLAUSIBLE_MPP[1]:
        raise MissingMpp(f"{path}: metadata says {mpp_x:g} um/px ({source}), which is not a "
                         "microscope scale (a default image dpi?); give the real value with --mpp")
    if abs(mpp_x - mpp_y) > 0.02 * mpp_x:
        source += f"; anisotropic pixels, x={mpp_x:g} y={mpp_y:g}, using their mean"
    return (mpp_x + mpp_y) / 2, source


def _to_rgb(region: Any) -> np.ndarray:
    """Backend region (PIL RGBA from openslide, array or PIL from tiffslide) as RGB uint8,
    transparent pixels (outside scanned areas) painted glass white."""
    arr = np.asarray(region)
    if arr.ndim == 2:
        return np.stack([arr] * 3, axis=-1).astype(np.uint8, copy=False)
    if arr.shape[-1] == 4:
        rgb = arr[..., :3].copy()
        rgb[arr[..., 3] == 0] = GLASS
        return rgb
    return arr[..., :3].astype(np.uint8, copy=False)


def _is_int(v: float) -> bool:
    return abs(v - round(v)) < 1e-6


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
