"""A `glomerular-dx` case folder (docs/design.md "glomerular-dx case folder") and its images.

    case/om/   one whole-slide image of the biopsy (light microscopy, PAS)
    case/im/   immunofluorescence image(s): the first in sorted order is used
    case/tem/  electron microscopy images: the first ``MAX_TEM`` (10) in sorted order

Images: ``.png .jpg .jpeg .tif .tiff .bmp`` (other files and hidden ones are ignored).
Every image becomes (H, W, 3) uint8 RGB:

- 8-bit greyscale or RGB as is; 16-bit scaled by its full range (value / 257) [choice:
  the IF intensity is meaningful, so no per-image contrast stretch]; 1-bit as 0/255;
- RGBA only when the alpha channel is fully opaque (else the colours are undefined);
- a multi-page TIFF: its first RGB page (a stack of greyscale pages, e.g. one channel per
  page, has no defined colour image and is refused);
- TEM greyscale becomes grey RGB (R = G = B); an IM greyscale image goes to the green
  channel [choice: the FITC convention, and what the model sees on RGB IF images];
- anything else (2 channels, 4+ channels, float pixels, palette-less odd modes) is one
  `CaseImageError` naming the file and its shape/mode.

A missing or empty ``om/`` (no slide file), ``im/`` or ``tem/`` is one `CaseIncomplete`
naming the modality [choice: an error, not a degraded mode: the fusion head was never
trained without a modality].
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import CaseImageError, CaseIncomplete
from .slide import find_slides

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
MAX_TEM = 10
MODALITY_NAMES = {"om": "light-microscopy (OM) slide", "im": "immunofluorescence (IM) image",
                  "tem": "electron-microscopy (TEM) image"}


@dataclass(frozen=True)
class Case:
    """A case folder, read and checked.

    om_path     the OM whole-slide image
    im          (H, W, 3) uint8 IM image (from ``im_path``); ``im_unused`` the other IM files
    tem         (H_i, W_i, 3) uint8 TEM images, one per ``tem_paths`` (sizes differ);
                ``tem_skipped`` the files after the first ``MAX_TEM``
    notes       what was converted (16-bit scaled, greyscale IM to green, RGB page picked)
    fingerprint names, sizes and mtimes of every IM/TEM image file (a cache key)
    """

    folder: Path
    case_id: str
    om_path: Path
    im_path: Path
    im: np.ndarray
    tem_paths: tuple[Path, ...]
    tem: tuple[np.ndarray, ...]
    im_unused: tuple[Path, ...] = ()
    tem_skipped: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary of the files used and not used (paths relative to the case)."""
        rel = self.relative
        return {"folder": str(self.folder), "case_id": self.case_id,
                "om": rel(self.om_path),
                "im": {"file": rel(self.im_path), "shape_px": list(self.im.shape[:2]),
                       "unused": [rel(p) for p in self.im_unused]},
                "tem": {"used": [rel(p) for p in self.tem_paths],
                        "shapes_px": [list(t.shape[:2]) for t in self.tem],
                        "skipped": [rel(p) for p in self.tem_skipped],
                        "max_used": MAX_TEM},
                "notes": list(self.notes)}

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.folder))
        except ValueError:
            return str(path)


def case_folder(path: str | os.PathLike) -> Path:
    """The case folder of ``path``: the folder itself, or for a slide inside ``om/`` the
    folder above ``om/``."""
    p = Path(path)
    if p.is_file() and p.parent.name == "om":
        return p.parent.parent
    return p


def read_case(path: str | os.PathLike, max_tem: int = MAX_TEM) -> Case:
    """Read and check the case at ``path`` (a case folder, or its OM slide in ``om/``):
    the OM slide path, the IM image and the first ``max_tem`` TEM images as RGB uint8.
    Raises `CaseIncomplete` (a modality missing) or `CaseImageError` (an unusable image)."""
    folder = case_folder(path)
    if not folder.is_dir():
        raise CaseIncomplete(f"{folder}: not a case folder (expected om/, im/ and tem/)")
    om_dir = folder / "om"
    slides = find_slides(om_dir) if om_dir.is_dir() else []
    if Path(path).is_file() and Path(path).parent == om_dir:
        slides = [Path(path)]
    if not slides:
        crops = _images(om_dir) if om_dir.is_dir() else []
        raise CaseIncomplete(f"{folder}: no {MODALITY_NAMES['om']} in om/"
                             + (" (it holds images only: OM glomerulus crops instead of a "
                                "slide are not supported in this version)" if crops
                                else "" if om_dir.is_dir() else " (om/ is missing)"))
    im_files, tem_files = (_modality_files(folder, m) for m in ("im", "tem"))
    notes: list[str] = []
    im = load_image(im_files[0], "im", notes)
    used, skipped = tem_files[:max_tem], tem_files[max_tem:]
    tem = tuple(load_image(p, "tem", notes) for p in used)
    if skipped:
        notes.append(f"{len(tem_files)} TEM images: the first {max_tem} in sorted order "
                     f"used, {len(skipped)} skipped")
    if len(im_files) > 1:
        notes.append(f"{len(im_files)} IM images: {im_files[0].name} used (first in sorted "
                     "order)")
    fingerprint = {"im": [_stat(p, folder) for p in im_files],
                   "tem": [_stat(p, folder) for p in tem_files], "max_tem": max_tem}
    return Case(folder=folder, case_id=folder.name, om_path=slides[0], im_path=im_files[0],
                im=im, tem_paths=tuple(used), tem=tem, im_unused=tuple(im_files[1:]),
                tem_skipped=tuple(skipped), notes=tuple(notes), fingerprint=fingerprint)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def _modality_files(folder: Path, modality: str) -> list[Path]:
    sub = folder / modality
    if not sub.is_dir():
        raise CaseIncomplete(f"{folder}: no {MODALITY_NAMES[modality]}: {modality}/ is "
                             "missing (a glomerular-dx case needs om/, im/ and tem/)")
    files = _images(sub)
    if not files:
        raise CaseIncomplete(f"{folder}: no {MODALITY_NAMES[modality]}: {modality}/ holds no "
                             f"{'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} file")
    return files


def _stat(path: Path, folder: Path) -> list[Any]:
    st = path.stat()
    return [str(path.relative_to(folder)), st.st_size, st.st_mtime_ns]


# -- pixels ---------------------------------------------------------------------------------
def load_image(path: str | os.PathLike, modality: str = "tem",
               notes: list[str] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of the IM or TEM image at ``path`` (see the module docstring);
    conversions are appended to ``notes``. `CaseImageError` when it cannot be one."""
    path = Path(path)
    notes = notes if notes is not None else []
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr, what = _read_tiff(path)
        else:
            arr, what = _read_pil(path)
    except CaseImageError:
        raise
    except Exception as exc:  # PIL/tifffile raise many types on a corrupt file
        raise CaseImageError(f"{path}: cannot read the {modality.upper()} image "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                             ) from None
    return _to_rgb(arr, path, modality, what, notes)


def _read_pil(path: Path) -> tuple[np.ndarray, str]:
    with Image.open(path) as img:
        mode = img.mode
        what = f"mode {mode}"
        if mode in ("CMYK", "LAB", "HSV"):
            raise CaseImageError(f"{path}: unsupported image mode {mode} (shape "
                                 f"{(img.height, img.width, len(img.getbands()))}); expected "
                                 "greyscale or RGB")
        if mode in ("P", "PA"):  # a palette image has defined colours
            img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
        elif mode in ("YCbCr", "1"):
            img = img.convert("RGB" if mode == "YCbCr" else "L")
        arr = np.asarray(img)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.min() >= 0
                                      and arr.max() <= 65535):
            arr = arr.astype(np.uint16)  # 16-bit greyscale (PIL may hold it as 32-bit "I")
        return arr, what


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        pages = [p for p in tif.pages if hasattr(p, "photometric")]
        if not pages:
            raise CaseImageError(f"{path}: the TIFF holds no image page")
        if len(pages) == 1:
            page = pages[0]
        else:
            rgb = [p for p in pages if p.photometric == tifffile.PHOTOMETRIC.RGB]
            if not rgb:
                raise CaseImageError(
                    f"{path}: a stack of {len(pages)} pages (shape {pages[0].shape}) with no "
                    "RGB page: give one RGB or greyscale image")
            page = rgb[0]
        arr = page.asarray()
        planar = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and arr.ndim == 3
        what = f"photometric {page.photometric.name.lower()}" + (
            f", page {pages.index(page) + 1} of {len(pages)}" if len(pages) > 1 else "")
    if planar:
        arr = np.moveaxis(arr, 0, -1)
    return arr, what


def _to_rgb(arr: np.ndarray, path: Path, modality: str, what: str,
            notes: list[str]) -> np.ndarray:
    shape = tuple(arr.shape)
    bad = f"{path}: unsupported {modality.upper()} image (shape {shape}, {arr.dtype}, {what})"
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1:
        raise CaseImageError(f"{bad}: expected greyscale (H, W) or RGB (H, W, 3)")
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise CaseImageError(f"{bad}: {arr.shape[-1]} channels; expected greyscale, RGB, or "
                             "RGBA with an opaque alpha")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
        notes.append(f"{path.name}: 16-bit scaled to 8-bit (value / 257)")
    elif arr.dtype != np.uint8:
        raise CaseImageError(f"{bad}: {arr.dtype} pixels; expected 8- or 16-bit integers")
    if arr.ndim == 3 and arr.shape[-1] == 4:
        if not (arr[..., 3] == 255).all():
            raise CaseImageError(f"{bad}: RGBA with a transparent alpha channel; expected "
                                 "RGB or greyscale")
        arr = arr[..., :3]
    if arr.ndim == 2:
        if modality == "im":
            grey, arr = arr, np.zeros((*arr.shape, 3), np.uint8)
            arr[..., 1] = grey
            notes.append(f"{path.name}: greyscale IM image shown in the green channel")
        else:
            arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr)


def resize_square(image: np.ndarray, size_px: int) -> np.ndarray:
    """(size_px, size_px, 3) uint8: ``image`` (H, W, 3) uint8 stretched to a square with an
    antialiased bilinear filter (as the paper resizes every modality to 224 x 224)."""
    if image.shape[:2] == (size_px, size_px):
        return image
    return np.asarray(Image.fromarray(image).resize((size_px, size_px), Image.BILINEAR))


def stack_tem(images: tuple[np.ndarray, ...] | list[np.ndarray], size_px: int,
              max_tem: int = MAX_TEM) -> tuple[np.ndarray, np.ndarray]:
    """The model's TEM bag: (max_tem, size_px, size_px, 3) uint8 zero-padded images and
    their (max_tem,) bool mask (True = real image)."""
    bag = np.zeros((max_tem, size_px, size_px, 3), np.uint8)
    mask = np.zeros(max_tem, bool)
    for i, img in enumerate(list(images)[:max_tem]):
        bag[i] = resize_square(img, size_px)
        mask[i] = True
    return bag, mask
