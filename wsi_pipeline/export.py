"""Per-slide exports that QuPath, napari and openslide import as they are.

``mask.ome.tif``     pyramidal tiled label mask with physical pixel size (`write_mask_ome_tiff`)
``objects.geojson``  QuPath FeatureCollection of annotations and detections (`write_geojson`)
``overlay.png``      thumbnail with the label map, tissue outline and objects (`write_overlay`)

Conventions: slide coordinates are x (right), y (down) in µm from the top-left corner of
level 0; pixel (r, c) of a grid with pixel size ``mpp`` covers [c, c+1) x [r, r+1) times
``mpp``. Every file is written to a hidden temporary name in its own folder and renamed
into place, so a killed or failing run never leaves a half file under the final name.
Label maps are read from zarr a tile or chunk at a time; no whole-slide array is built.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import tempfile
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile
import zarr
from PIL import Image, ImageDraw
from skimage import measure

from .errors import OutputNotWritable, UsageError

LEGEND_NAMESPACE = "wsi_pipeline/legend"
# Outline colours unlike any marker ink (red, green, blue, black) and any Okabe-Ito class
TISSUE_OUTLINE_RGB = (90, 90, 90)     # dark grey
INK_OUTLINE_RGB = (190, 0, 190)       # magenta: ink left out of the tissue
OBJECT_TYPES = ("annotation", "detection")
# Okabe & Ito (2008) colour-blind-safe palette, reordered so that the first classes get the
# most distinct hues; class 0 (background) is black and never painted in overlays.
OKABE_ITO = (
    (0, 0, 0),          # black
    (213, 94, 0),       # vermillion
    (0, 114, 178),      # blue
    (230, 159, 0),      # orange
    (86, 180, 233),     # sky blue
    (204, 121, 167),    # reddish purple
    (240, 228, 66),     # yellow
    (0, 158, 115),      # bluish green
)


# -- atomic files ---------------------------------------------------------------------------


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """An open binary file at a temporary name beside ``path``, renamed to ``path`` when the
    block ends normally and deleted when it raises."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fh = open(tmp, "xb")
    except OSError as exc:
        raise OutputNotWritable(f"{path}: cannot write ({exc.strerror or exc})") from exc
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- colours --------------------------------------------------------------------------------


def class_colors(legend: dict[int, str]) -> dict[int, tuple[int, int, int]]:
    """RGB colour per class id of ``legend``: Okabe-Ito for ids 0-7 (0 = black background),
    then hues spaced by the golden angle. Depends on the id only, never on the names or on
    which other classes exist, so a class keeps its colour across tasks and files."""
    return {int(k): _class_color(int(k)) for k in legend}


def _class_color(class_id: int) -> tuple[int, int, int]:
    if 0 <= class_id < len(OKABE_ITO):
        return OKABE_ITO[class_id]
    hue = (class_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


# -- mask.ome.tif ---------------------------------------------------------------------------


def write_mask_ome_tiff(path: Path, labels: zarr.Array, label_mpp: float, *,
                        out_mpp: float | None = None, legend: dict[int, str],
                        colors: Mapping[int, tuple[int, int, int]] | None = None,
                        tile_px: int = 512) -> dict[str, Any]:
    """Write a (H, W) uint8 class-index map as a pyramidal, tiled, deflate-compressed OME-TIFF
    with a colour palette: pixel values stay the class ids (for programs), and viewers that
    honour TIFF palettes (openslide, QuPath/Bio-Formats) show each class in its colour.

    labels     (H, W) uint8 zarr array of class ids at ``label_mpp`` µm/px; unwritten
               chunks read as 0
    out_mpp    µm/px of level 0 (default ``label_mpp``); may be ``label_mpp`` divided by a
               whole number, the map then being upsampled by nearest neighbour tile by tile
    legend     class id -> name, stored in the OME-XML as a MapAnnotation (namespace
               ``wsi_pipeline/legend``, keys the ids) linked to the image; `read_mask_legend`
               reads it back
    colors     class id -> RGB of the palette (default `class_colors`); background (0)
               is white, ids not in ``legend`` black
    tile_px    TIFF tile edge (a multiple of 16)

    Level k is level k-1 halved (rounding up) by the 2 x 2 majority class, ties going to
    the top-left pixel (never an average of class ids), until a level fits in one tile.
    Pixel size is in the OME-XML (PhysicalSizeX/Y, µm) and in every level's TIFF resolution
    tags (pixels per centimetre), from which openslide derives ``openslide.mpp-x/-y``.

    Layout, so that both pyramid conventions find every level: IFD 0 holds level 0 and
    the OME-XML and lists levels 1.. as SubIFDs (the OME-TIFF pyramid that Bio-Formats,
    hence QuPath, and tifffile read); the same levels follow again as reduced-resolution
    pages in the main IFD chain, which is what openslide's generic-tiff driver reads (it
    ignores SubIFDs). The OME-XML references IFD 0 only, so OME readers see one image. The
    copy makes the file about a third larger (+36% on a 16k x 16k map: 9.8 MB in all).
    Checked with tifffile, openslide 4.0.1 and Bio-Formats 7.3.1 (ImageInfo, ImageConverter).

    Memory stays at a few tiles: tiles go to tifffile as generators, and each level is
    built from the previous one through a temporary zarr store beside ``path``.
    Returns {"path", "shape" (H, W) of level 0, "levels", "mpp", "bytes"}.
    """
    path = Path(path)
    if labels.ndim != 2 or np.dtype(labels.dtype) != np.uint8:
        raise UsageError(f"{path.name}: labels must be a 2-D uint8 array, got "
                         f"{labels.ndim}-D {labels.dtype}")
    if tile_px < 16 or tile_px % 16:
        raise UsageError(f"{path.name}: tile_px must be a positive multiple of 16, got {tile_px}")
    out_mpp = float(label_mpp if out_mpp is None else out_mpp)
    factor = _upsample_factor(label_mpp, out_mpp)
    shapes = [(labels.shape[0] * factor, labels.shape[1] * factor)]
    while max(shapes[-1]) > tile_px:
        shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
    n_levels = len(shapes)
    description = _ome_xml(shapes[0], out_mpp, legend, name=path.name.split(".")[0])
    # the pyramid is stored 1 + 2/3 times uncompressed at most; stay clear of 4 GiB offsets
    bigtiff = shapes[0][0] * shapes[0][1] * 5 // 3 > 2**31
    common = {"dtype": np.uint8, "tile": (tile_px, tile_px), "compression": "zlib",
              "photometric": "palette", "colormap": mask_palette(legend, colors),
              "resolutionunit": "CENTIMETER", "metadata": None,
              "maxworkers": 2, "buffersize": 16 * tile_px * tile_px}

    def resolution(level: int) -> tuple[float, float]:
        px_per_cm = 1e4 / (out_mpp * 2**level)
        return px_per_cm, px_per_cm

    with _atomic_file(path) as fh, \
            tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.levels-") as tmp:
        half = tile_px // 2  # a level-k tile reduces to exactly one chunk of level k+1
        levels: list[Any] = [labels] + [
            zarr.create_array(store=os.path.join(tmp, str(k)), shape=shapes[k], dtype="uint8",
                              chunks=(half, half), fill_value=0)
            for k in range(1, n_levels)]
        with tifffile.TiffWriter(fh, bigtiff=bigtiff) as tif:
            tif.write(_level_tiles(labels, shapes[0], factor, tile_px, levels[1:2]),
                      shape=shapes[0], subifds=n_levels - 1, subfiletype=0,
                      resolution=resolution(0), description=description, **common)
            for k in range(1, n_levels):  # SubIFDs of IFD 0; each fills the next level
                tif.write(_level_tiles(levels[k], shapes[k], 1, tile_px, levels[k + 1:k + 2]),
                          shape=shapes[k], subfiletype=1, resolution=resolution(k), **common)
            for k in range(1, n_levels):  # main-chain copies for openslide
                tif.write(_level_tiles(levels[k], shapes[k], 1, tile_px, []),
                          shape=shapes[k], subfiletype=1, resolution=resolution(k), **common)
    return {"path": str(path), "shape": shapes[0], "levels": n_levels, "mpp": out_mpp,
            "bytes": path.stat().st_size}


def mask_palette(legend: Mapping[int, str],
                 colors: Mapping[int, tuple[int, int, int]] | None = None) -> np.ndarray:
    """The (3, 256) uint16 TIFF colormap of a class map: each class of ``legend`` in its
    colour (``colors``, else `class_colors`), the background (0) white, the rest black."""
    palette = np.zeros((256, 3), np.uint16)
    chosen = {**class_colors(dict(legend)), 0: (255, 255, 255), **(colors or {})}
    for class_id, rgb in chosen.items():
        if 0 <= int(class_id) < 256:
            palette[int(class_id)] = rgb
    return (palette * 257).T.copy()   # 8-bit -> the 16-bit range TIFF colormaps use


def read_mask_legend(path: Path) -> dict[int, str]:
    """The class id -> name legend that `write_mask_ome_tiff` stored in ``path``."""
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    if not xml:
        raise UsageError(f"{path}: not an OME-TIFF (no OME-XML)")
    legend: dict[int, str] = {}
    for ann in ET.fromstring(xml).iter():
        if ann.tag.endswith("MapAnnotation") and ann.get("Namespace") == LEGEND_NAMESPACE:
            for m in ann.iter():
                if m.tag.endswith("}M") or m.tag == "M":
                    legend[int(m.get("K"))] = m.text or ""
    return legend


def _upsample_factor(label_mpp: float, out_mpp: float) -> int:
    if not (label_mpp > 0 and out_mpp > 0):
        raise UsageError(f"pixel sizes must be positive, got label_mpp={label_mpp}, "
                         f"out_mpp={out_mpp}")
    factor = label_mpp / out_mpp
    whole = round(factor)
    if whole < 1 or abs(factor - whole) > 1e-6 * factor:
        raise UsageError(f"out_mpp={out_mpp} must be label_mpp={label_mpp} divided by a whole "
                         "number")
    return whole


def _ome_xml(shape: tuple[int, int], mpp: float, legend: dict[int, str], name: str) -> bytes:
    ome = tifffile.OmeXml()
    ome.addimage("uint8", shape, (1, 1, 1, shape[0], shape[1], 1), axes="YX", Name=name,
                 PhysicalSizeX=mpp, PhysicalSizeXUnit="µm",
                 PhysicalSizeY=mpp, PhysicalSizeYUnit="µm",
                 Channel={"Name": "class"},
                 MapAnnotation={"Namespace": LEGEND_NAMESPACE,
                                "Value": {str(int(k)): str(v) for k, v in sorted(legend.items())}})
    # UTF-8 (for "µm"), as tifffile writes OME-XML itself; TiffWriter only takes ASCII str
    return ome.tostring(declaration=True).encode()


def _level_tiles(source: Any, shape: tuple[int, int], factor: int, tile_px: int,
                 next_level: list[Any]) -> Iterator[np.ndarray]:
    """Row-major (tile_px, tile_px) tiles of a level of ``shape`` read from ``source``
    (upsampled by ``factor``), writing each tile's 2 x 2 majority into ``next_level[0]``."""
    height, width = shape
    for r0 in range(0, height, tile_px):
        for c0 in range(0, width, tile_px):
            r1, c1 = min(r0 + tile_px, height), min(c0 + tile_px, width)
            block = _read_upsampled(source, r0, r1, c0, c1, factor)
            if next_level and block.any():
                reduced = mode2x2(block)
                next_level[0][r0 // 2:r0 // 2 + reduced.shape[0],
                              c0 // 2:c0 // 2 + reduced.shape[1]] = reduced
            tile = np.zeros((tile_px, tile_px), np.uint8)
            tile[:r1 - r0, :c1 - c0] = block
            yield tile


def _read_upsampled(source: Any, r0: int, r1: int, c0: int, c1: int, factor: int) -> np.ndarray:
    """Rows r0:r1, columns c0:c1 of ``source`` upsampled ``factor`` times (nearest)."""
    if factor == 1:
        return np.asarray(source[r0:r1, c0:c1], np.uint8)
    s0, s1 = r0 // factor, -(-r1 // factor)
    t0, t1 = c0 // factor, -(-c1 // factor)
    block = np.asarray(source[s0:s1, t0:t1], np.uint8)
    block = block.repeat(factor, axis=0).repeat(factor, axis=1)
    return block[r0 - s0 * factor:r1 - s0 * factor, c0 - t0 * factor:c1 - t0 * factor]


def mode2x2(labels: np.ndarray) -> np.ndarray:
    """(ceil(H/2), ceil(W/2)) majority class of each 2 x 2 block of an (H, W) label map.

    Ties go to the block's top-left pixel (so a 2 x 2 of four classes keeps the nearest
    one); odd edges are padded by repeating the last row/column.
    """
    h, w = labels.shape
    if h % 2 or w % 2:
        labels = np.pad(labels, ((0, h % 2), (0, w % 2)), mode="edge")
    a, b = labels[0::2, 0::2], labels[0::2, 1::2]  # a: top-left
    c, d = labels[1::2, 0::2], labels[1::2, 1::2]
    ab, ac, ad = (a == b).view(np.uint8), (a == c).view(np.uint8), (a == d).view(np.uint8)
    bc, bd, cd = (b == c).view(np.uint8), (b == d).view(np.uint8), (c == d).view(np.uint8)
    # how many *other* pixels of the block share each pixel's class
    na, nb, nc, nd = ab + ac + ad, ab + bc + bd, ac + bc + cd, ad + bd + cd
    # two different classes cannot both beat a, so among b, c, d the first maximum is it
    other = np.where((nb >= nc) & (nb >= nd), b, np.where(nc >= nd, c, d))
    return np.where(na >= np.maximum(np.maximum(nb, nc), nd), a, other)


# -- polygons -------------------------------------------------------------------------------


def region_objects(labels, kinds: dict[int, tuple[str, tuple[int, int, int]]],
                   min_area_um2: float, *, holes: bool = False) -> list[dict[str, Any]]:
    """One report object per connected region of each label value in ``kinds`` ({value:
    (name, RGB colour)}) of a (H, W) zarr label map (attrs ``mpp``) of at least
    ``min_area_um2``: name, kind (lower-case name), colour, outer outline (with ``holes``,
    also the rings of its holes, ``holes_um``) and centroid (um), area (um2 and mm2).
    Regions are found band by band (`labelmaps.connected_components`)."""
    from .labelmaps import connected_components

    mpp = float(labels.attrs["mpp"])
    objects = []
    for value, (name, color) in kinds.items():
        for (y0, x0, _, _), mask in connected_components(labels, lambda b, v=value: b == v):
            area_um2 = float(mask.sum()) * mpp * mpp
            if area_um2 < min_area_um2:
                continue
            origin = (x0 * mpp, y0 * mpp)
            outline = max(polygons_from_mask(mask, mpp, origin, simplify_um=2 * mpp),
                          key=lambda p: p["area_um2"])
            ys, xs = np.nonzero(mask)
            objects.append({
                "name": name, "kind": name.lower(), "color": color,
                "polygon_um": np.round(outline["polygon_um"], 1).tolist(),
                **({"holes_um": [np.round(h, 1).tolist() for h in outline["holes_um"]]}
                   if holes else {}),
                "centroid_um": [round(origin[0] + (xs.mean() + 0.5) * mpp, 1),
                                round(origin[1] + (ys.mean() + 0.5) * mpp, 1)],
                "measurements": {"area_um2": round(area_um2, 1),
                                 "area_mm2": round(area_um2 / 1e6, 5)}})
    return objects


def polygons_from_mask(mask: np.ndarray, mpp: float,
                       origin_um: tuple[float, float] = (0.0, 0.0), *,
                       simplify_um: float = 0.0) -> list[dict[str, Any]]:
    """Outline every 4-connected component of a boolean (H, W) mask, in slide µm.

    Pixel (r, c) covers x in [c, c+1) * mpp + origin_um[0], y in [r, r+1) * mpp +
    origin_um[1]. Rings come from `skimage.measure.find_contours` at level 0.5 on the
    zero-padded component, so straight edges lie exactly on pixel edges and corners are cut
    by diagonals (1/8 px² less area per convex corner, 1/8 px² more per concave one).
    ``simplify_um`` > 0 applies Douglas-Peucker (`approximate_polygon`) with that tolerance.

    Each item: ``polygon_um`` (N, 2) closed outer ring of x, y with positive shoelace area
    (clockwise on screen, y pointing down), ``holes_um`` list of closed rings with negative
    area (background enclosed by the
    component; anything inside a hole is a component of its own), ``area_um2`` from the
    pixel count (not the polygon), ``centroid_um`` (x, y) of the pixels. Components come in
    raster order of their first pixel.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise UsageError(f"mask must be 2-D, got shape {mask.shape}")
    if not mpp > 0:
        raise UsageError(f"mpp must be positive, got {mpp}")
    tolerance_px = simplify_um / mpp
    x0, y0 = float(origin_um[0]), float(origin_um[1])
    objects = []
    for region in measure.regionprops(measure.label(mask, connectivity=1)):
        r0, c0 = region.bbox[:2]
        padded = np.pad(region.image, 1).astype(np.float32)
        contours = measure.find_contours(padded, 0.5)  # all closed thanks to the pad
        areas = [_signed_area(c[:, ::-1]) for c in contours]
        outer = int(np.argmax(np.abs(areas)))  # every other ring lies inside it: a hole
        shell, holes = None, []
        for i, contour in enumerate(contours):
            ring = contour
            if tolerance_px > 0:
                ring = measure.approximate_polygon(contour, tolerance_px)
                if len(ring) < 4:  # collapsed: the outer ring stays unsimplified, a hole goes
                    if i != outer:
                        continue
                    ring = contour
            # (row, col) in the padded crop -> x, y in µm; orientation from the unsimplified
            ring_um = np.column_stack([x0 + (ring[:, 1] - 1 + c0 + 0.5) * mpp,
                                       y0 + (ring[:, 0] - 1 + r0 + 0.5) * mpp])
            if (areas[i] < 0) == (i == outer):
                ring_um = ring_um[::-1]
            if i == outer:
                shell = ring_um
            else:
                holes.append(ring_um)
        cy, cx = region.centroid
        objects.append({"polygon_um": shell, "holes_um": holes,
                        "area_um2": float(region.area) * mpp * mpp,
                        "centroid_um": (x0 + (cx + 0.5) * mpp, y0 + (cy + 0.5) * mpp)})
    return objects


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of an (N, 2) ring (closed or not), positive when x -> y turns left."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# -- objects.geojson ------------------------------------------------------------------------


def write_geojson(path: Path, objects: Sequence[dict[str, Any]], *, slide_mpp: float) -> int:
    """Write objects as a QuPath-importable GeoJSON FeatureCollection; return the number of
    features written.

    Each object: ``polygon_um`` ((N, 2) x, y in slide µm, outer ring; optional ``holes_um``)
    or ``point_um`` (x, y); ``name`` (class name); ``color`` (r, g, b); ``object_type``
    ("annotation" or "detection"; default "annotation" for polygons, "detection" for
    points); ``measurements`` (name -> number; NaN/inf written as null); optional ``id`` and
    ``properties`` (extra keys, never overriding the ones above). Coordinates are converted
    to level-0 pixels (µm / ``slide_mpp``), as QuPath expects, and rounded to 0.01 px;
    rings are closed. Polygons with fewer than 3 distinct points after rounding are skipped
    (holes silently, outer rings with a warning giving their number). Features are streamed
    one per line, so the file costs no more memory than one feature.
    """
    path = Path(path)
    if not slide_mpp > 0:
        raise UsageError(f"{path.name}: slide_mpp must be positive, got {slide_mpp}")
    written = skipped = 0
    with _atomic_file(path) as fh:
        fh.write(b'{"type": "FeatureCollection", "features": [')
        for index, obj in enumerate(objects):
            feature = _feature(obj, slide_mpp, index)
            if feature is None:
                skipped += 1
                continue
            fh.write((",\n" if written else "\n").encode())
            fh.write(json.dumps(feature, separators=(",", ":"), allow_nan=False).encode())
            written += 1
        fh.write(b"\n]}\n")
    if skipped:
        warnings.warn(f"{path.name}: {skipped} degenerate polygon(s) (< 3 distinct points) "
                      "not written", stacklevel=2)
    return written


def _feature(obj: dict[str, Any], slide_mpp: float, index: int) -> dict[str, Any] | None:
    if "point_um" in obj:
        xy = np.asarray(obj["point_um"], dtype=np.float64).reshape(-1)
        if xy.size != 2 or not np.isfinite(xy).all():
            raise UsageError(f"object {index}: point_um must be a finite (x, y), got {xy}")
        geometry = {"type": "Point", "coordinates": np.round(xy / slide_mpp, 2).tolist()}
        default_type = "detection"
    elif "polygon_um" in obj:
        shell = _ring_px(obj["polygon_um"], slide_mpp, index)
        if shell is None:
            return None
        rings = [shell] + [r for hole in obj.get("holes_um", ())
                           if (r := _ring_px(hole, slide_mpp, index)) is not None]
        geometry = {"type": "Polygon", "coordinates": rings}
        default_type = "annotation"
    else:
        raise UsageError(f"object {index}: needs polygon_um or point_um")
    object_type = obj.get("object_type", default_type)
    if object_type not in OBJECT_TYPES:
        raise UsageError(f"object {index}: object_type must be one of {OBJECT_TYPES}, got "
                         f"{object_type!r}")
    color = [int(v) for v in obj.get("color", _class_color(1))]
    if len(color) != 3 or not all(0 <= v <= 255 for v in color):
        raise UsageError(f"object {index}: color must be (r, g, b) in 0-255, got {color}")
    properties = dict(obj.get("properties") or {})
    properties.update({"objectType": object_type,
                       "classification": {"name": str(obj.get("name", "")), "color": color},
                       "measurements": _measurements(obj.get("measurements") or {}, index),
                       "isLocked": False})
    return {"type": "Feature", "id": str(obj.get("id") or uuid.uuid4()), "geometry": geometry,
            "properties": properties}


def _ring_px(ring_um: Any, slide_mpp: float, index: int) -> list[list[float]] | None:
    """A closed ring in level-0 px rounded to 0.01, or None when degenerate."""
    ring = np.asarray(ring_um, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] != 2 or not np.isfinite(ring).all():
        raise UsageError(f"object {index}: rings must be finite (N, 2) arrays of x, y")
    ring = np.round(ring / slide_mpp, 2)
    keep = np.ones(len(ring), bool)
    keep[1:] = (np.diff(ring, axis=0) != 0).any(axis=1)  # drop repeats made by rounding
    ring = ring[keep]
    if len(np.unique(ring, axis=0)) < 3:
        return None
    if (ring[0] != ring[-1]).any():
        ring = np.vstack([ring, ring[:1]])
    return ring.tolist()


def _measurements(values: dict[str, Any], index: int) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {}
    for key, value in values.items():
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
            raise UsageError(f"object {index}: measurement {key!r} is not a number: {value!r}")
        number = value.item() if isinstance(value, np.generic) else value
        out[str(key)] = number if math.isfinite(number) else None
    return out


# -- overlay.png ----------------------------------------------------------------------------


def write_overlay(path: Path, thumbnail: np.ndarray, thumb_mpp: float, *,
                  labels: zarr.Array | None = None, label_mpp: float | None = None,
                  colors: dict[int, tuple[int, int, int]] | None = None, alpha: float = 0.4,
                  tissue_outline: np.ndarray | None = None,
                  ink_outline: np.ndarray | None = None,
                  polygons_um: Sequence[tuple[np.ndarray, tuple[int, int, int]]] = (),
                  title: str | None = None,
                  legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
                  scale_bar: bool = False) -> None:
    """Write ``thumbnail`` ((h, w, 3) uint8 at ``thumb_mpp`` µm/px) as a PNG with, in order:

    - the (H, W) class map ``labels`` at ``label_mpp`` blended with ``colors`` (default
      `class_colors`; when given, only the classes it names) at opacity ``alpha``; class 0
      stays transparent. Each thumbnail pixel
      takes the class at its centre (nearest neighbour), gathered chunk by chunk from the
      zarr array; chunks holding no thumbnail pixel centre are never read.
    - the outline of ``tissue_outline`` ((h, w) bool) in dark grey, and of the excluded
      marker ink ``ink_outline`` in magenta: 2 px wide, along the mask's sub-pixel contour
      (marching squares on the lightly smoothed mask: no staircase of thumbnail pixels);
    - each polygon ((N, 2) x, y in slide µm, with its RGB colour) as a 2-px outline;
    - with ``title``, ``legend`` ((name, RGB) swatches) or ``scale_bar``, a white band
      below the image holding them (the image's pixels keep their coordinates).

    Both grids start at the slide's top-left corner.
    """
    path = Path(path)
    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
        raise UsageError(f"{path.name}: thumbnail must be (h, w, 3) uint8, got "
                         f"{thumbnail.shape} {thumbnail.dtype}")
    if not thumb_mpp > 0:
        raise UsageError(f"{path.name}: thumb_mpp must be positive, got {thumb_mpp}")
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"{path.name}: alpha must be in [0, 1], got {alpha}")
    out = thumbnail.copy()
    if labels is not None:
        if label_mpp is None or not label_mpp > 0:
            raise UsageError(f"{path.name}: label_mpp is required with labels")
        grid = sample_labels(labels, label_mpp, thumbnail.shape[:2], thumb_mpp)
        for value in np.unique(grid):
            if value == 0 or (colors is not None and int(value) not in colors):
                continue   # given colours name the classes to draw; the rest stay clear
            colour = np.array((colors or {}).get(int(value), _class_color(int(value))),
                              np.float32)
            where = grid == value
            out[where] = np.round(out[where] * (1.0 - alpha) + colour * alpha).astype(np.uint8)
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    for name, outline, colour in (("ink_outline", ink_outline, INK_OUTLINE_RGB),
                                  ("tissue_outline", tissue_outline, TISSUE_OUTLINE_RGB)):
        if outline is None:
            continue
        outline = np.asarray(outline, dtype=bool)
        if outline.shape != thumbnail.shape[:2]:
            raise UsageError(f"{path.name}: {name} shape {outline.shape} is not the "
                             f"thumbnail's {thumbnail.shape[:2]}")
        for ring in mask_contours(outline):
            draw.line([tuple(p) for p in ring.tolist()], fill=colour, width=2, joint="curve")
    if len(polygons_um):
        for ring_um, colour in polygons_um:
            # grid pixel c spans [c, c+1), so a boundary at x lies between pixels x-1 and x;
            # PIL's 2-px line covers those two for vertical edges, y and y+1 for horizontal
            xy = np.asarray(ring_um, dtype=np.float64) / thumb_mpp
            if len(xy) < 2:
                continue
            points = [tuple(p) for p in xy.tolist()]
            draw.line(points + points[:1], fill=tuple(int(v) for v in colour), width=2,
                      joint="curve")
    if title or legend or scale_bar:
        image = _with_key(image, thumb_mpp, title, legend, scale_bar)
    with _atomic_file(path) as fh:
        image.save(fh, format="PNG")


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a boolean mask as (N, 2) x, y rings in pixel units (pixel c spans
    [c, c + 1)): marching squares at 0.5 on the mask smoothed by a 1-px Gaussian, so the
    outline follows the shape rather than the staircase of its pixels."""
    from scipy.ndimage import gaussian_filter

    padded = np.pad(mask.astype(np.float32), 1)
    rings = measure.find_contours(gaussian_filter(padded, 1.0), 0.5)
    # (row, col) of the padded grid -> (x, y) in pixel-edge units of the mask
    return [np.stack([r[:, 1] - 0.5, r[:, 0] - 0.5], 1) for r in rings if len(r) > 2]


def _with_key(image: Image.Image, mpp: float, title: str | None,
              legend: Sequence[tuple[str, tuple[int, int, int]]], scale_bar: bool
              ) -> Image.Image:
    """``image`` above a white band with the title, the legend swatches and a scale bar."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=13)
    width = max(image.width, 320)
    rows: list[list[tuple[str, tuple[int, int, int] | None]]] = [[]]
    x = 8
    for name, colour in legend:   # swatches wrapped into rows
        need = 22 + int(font.getlength(name)) + 14
        if x + need > width and rows[-1]:
            rows.append([])
            x = 8
        rows[-1].append((name, colour))
        x += need
    line = 20
    height = 8 + line * (bool(title) + (len(rows) if legend else 0) + bool(scale_bar))
    canvas = Image.new("RGB", (width, image.height + height), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = image.height + 4
    if title:
        draw.text((8, y), title, fill="black", font=font)
        y += line
    for row in rows if legend else []:
        x = 8
        for name, colour in row:
            draw.rectangle((x, y + 2, x + 14, y + 14), fill=colour, outline="black")
            draw.text((x + 20, y), name, fill="black", font=font)
            x += 22 + int(font.getlength(name)) + 14
        y += line
    if scale_bar:
        um = nice_length_um(image.width * mpp / 5)
        px = um / mpp
        draw.rectangle((8, y + 6, 8 + px, y + 10), fill="black")
        label = f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} um"
        draw.text((16 + px, y), label, fill="black", font=font)
    return canvas


def nice_length_um(at_most_um: float) -> float:
    """The largest 1, 2 or 5 x 10^k microns not above ``at_most_um`` (a scale bar length)."""
    if at_most_um <= 0:
        return 0.0
    power = 10 ** math.floor(math.log10(at_most_um))
    return max(f * power for f in (1, 2, 5) if f * power <= at_most_um)


def sample_labels(labels: zarr.Array, label_mpp: float, shape: tuple[int, int],
                  mpp: float) -> np.ndarray:
    """(h, w) uint8 class at the centre of each pixel of a grid of ``shape`` at ``mpp``
    µm/px, read from the (H, W) zarr ``labels`` at ``label_mpp`` one chunk at a time.
    Grid pixels beyond the label map get 0."""
    h, w = shape
    scale = mpp / label_mpp
    rows = np.floor((np.arange(h) + 0.5) * scale).astype(np.int64)
    cols = np.floor((np.arange(w) + 0.5) * scale).astype(np.int64)
    grid = np.zeros((h, w), np.uint8)
    chunk_h, chunk_w = labels.chunks[:2]
    height, width = labels.shape
    for r0 in range(0, height, chunk_h):
        ri = np.flatnonzero((rows >= r0) & (rows < r0 + chunk_h))
        if ri.size == 0:
            continue
        for c0 in range(0, width, chunk_w):
            ci = np.flatnonzero((cols >= c0) & (cols < c0 + chunk_w))
            if ci.size == 0:
                continue
            chunk = np.asarray(labels[r0:r0 + chunk_h, c0:c0 + chunk_w])
            grid[np.ix_(ri, ci)] = chunk[np.ix_(rows[ri] - r0, cols[ci] - c0)]
    return grid
