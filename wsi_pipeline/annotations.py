"""A slide's annotations as a label source for training, read with bounded memory.

`find_annotations(slide)` looks beside the slide, in this order, for

* ``<stem>.truth.zarr``  our synthetic ground truth (`wsi-synth`): a chunked ``labels``
  array with attrs ``mpp`` and ``legend`` {id: name};
* ``<stem>.geojson``     a QuPath export: a FeatureCollection (or a bare list of features)
  of Polygon / MultiPolygon annotations in slide level-0 pixel coordinates, the class in
  ``properties.classification.name``; the slide's MPP converts pixels to microns;
* ``<stem>.labels.tif`` / ``.tiff`` / ``.png``  a label mask (one class id per pixel) with
  ``<stem>.labels.json`` = {"legend": {id: name}, "mpp": um/px} (or just the legend); the
  mask's MPP comes from that file, else from TIFF resolution tags, else from the ratio of
  the slide's size to the mask's size.

Every source answers two questions in slide microns:
`AnnotationSource.crop` rasterises (polygons) or resamples (nearest; masks) the
annotations onto a requested pixel grid as per-class targets plus a validity mask, and
`AnnotationSource.positive_points_um` lists points inside the positive annotations for
class-balanced sampling. Annotation class names map to model classes through the task's
``ModelSpec.annotations`` (case-insensitive). Unannotated pixels count as background;
pixels outside the slide or of an ignore-like class (QuPath's ``Ignore*``, pen, ink) are
invalid, so a loss can skip them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from skimage.draw import polygon as fill_polygon
from skimage.measure import points_in_poly

from .errors import UsageError, WsiError

# Annotation classes whose pixels carry no label: excluded from the loss, never sampled.
IGNORE_NAMES = frozenset({"ignore", "ignore*", "pen", "ink", "marker", "pen ink",
                          "marker ink", "exclude", "excluded"})
MASK_SUFFIXES = (".tif", ".tiff", ".png")
POINT_STRIDE_UM = 16.0    # default spacing of the positive sample points
_POINT_ROWS_PER_READ = 256  # sample rows per read of a label array (bounds memory)

Classes = Mapping[str, tuple[str, ...]]


def find_annotations(slide_path: str | Path, mpp: float | None = None) -> AnnotationSource:
    """The annotations beside ``slide_path`` (see the module docstring for the order).

    ``mpp`` overrides the slide's level-0 microns per pixel (as ``--mpp`` does).
    Raises `UsageError` naming the files it looked for when there are none.
    """
    slide = Path(slide_path)
    stem = slide.with_suffix("")
    truth = stem.with_name(stem.name + ".truth.zarr")
    if truth.is_dir():
        return TruthZarrSource(truth)
    geojson = stem.with_name(stem.name + ".geojson")
    if geojson.is_file():
        return GeoJsonSource(geojson, slide, mpp=mpp)
    masks = [stem.with_name(stem.name + ".labels" + s) for s in MASK_SUFFIXES]
    for mask in masks:
        if mask.is_file():
            return LabelMaskSource(mask, slide, mpp=mpp)
    looked = ", ".join(p.name for p in (truth, geojson, *masks))
    raise UsageError(f"{slide}: no annotations found beside it (looked for {looked})")


def _norm(name: Any) -> str:
    return str(name).strip().casefold()


def _class_names(classes: Classes) -> list[frozenset[str]]:
    """Per model class (in order), the set of annotation names that mean it."""
    return [frozenset(_norm(n) for n in names) | {_norm(c)} for c, names in classes.items()]


def _classification(props: Mapping[str, Any] | None) -> str | None:
    """QuPath's class name of a feature: properties.classification.name (older exports
    and other tools write the name as a plain string)."""
    if not props:
        return None
    cls = props.get("classification")
    if isinstance(cls, Mapping):
        cls = cls.get("name")
    return _norm(cls) if cls else None


class AnnotationSource:
    """Annotations of one slide in slide microns (see the module docstring)."""

    kind = "annotations"

    def __init__(self, path: Path, extent_um: tuple[float, float]) -> None:
        self.path = Path(path)
        self.extent_um = extent_um  # (width, height) of the annotated slide, um

    def __repr__(self) -> str:
        w, h = self.extent_um
        return f"{type(self).__name__}({str(self.path)!r}, {w:.0f} x {h:.0f} um)"

    def class_names(self) -> list[str]:
        """Annotation class names this source knows (lower case)."""
        raise NotImplementedError

    def crop(self, x_um: float, y_um: float, w_px: int, h_px: int, mpp: float,
             classes: Classes) -> tuple[np.ndarray, np.ndarray]:
        """Targets on the grid of ``h_px`` x ``w_px`` pixels of ``mpp`` um whose top-left
        corner is at (``x_um``, ``y_um``) from the slide origin.

        Returns (target (C, h_px, w_px) float32 in {0, 1}, one channel per key of
        ``classes``; valid (h_px, w_px) bool: inside the slide and not an ignore class).
        """
        raise NotImplementedError

    def positive_points_um(self, classes: Classes,
                           stride_um: float = POINT_STRIDE_UM) -> np.ndarray:
        """(N, 2) float64 (x_um, y_um): points about ``stride_um`` apart inside the
        annotations of any class in ``classes`` (at least one per annotated object)."""
        raise NotImplementedError


# -- label grids: truth.zarr and label masks ---------------------------------------------------
class _LabelGrid(AnnotationSource):
    """A (H, W) integer label array of ``mpp`` um/px whose pixel (0, 0) starts at the slide
    origin, with a legend {id: name}. Subclasses open the array lazily (`_open`), so a
    source pickles cheaply into DataLoader workers and each worker reads on its own."""

    def __init__(self, path: Path, mpp: float, legend: Mapping[Any, str],
                 shape: tuple[int, int]) -> None:
        if not (mpp > 0 and math.isfinite(mpp)):
            raise WsiError(f"{path}: label mask resolution {mpp!r} um/px is not usable")
        super().__init__(path, (shape[1] * mpp, shape[0] * mpp))
        self.mpp = float(mpp)
        self.shape = shape
        try:
            self.legend = {int(k): _norm(v) for k, v in legend.items()}
        except (TypeError, ValueError) as exc:
            raise WsiError(f"{path}: legend ids must be integers: {exc}") from None
        self._array: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_array": None}   # handles never cross processes

    def _open(self) -> Any:
        raise NotImplementedError

    def _labels(self) -> Any:
        if self._array is None:
            self._array = self._open()
        return self._array

    def class_names(self) -> list[str]:
        return sorted(set(self.legend.values()))

    def _ids(self, names: frozenset[str]) -> np.ndarray:
        return np.array([k for k, v in self.legend.items() if v in names], np.int64)

    def crop(self, x_um: float, y_um: float, w_px: int, h_px: int, mpp: float,
             classes: Classes) -> tuple[np.ndarray, np.ndarray]:
        # nearest: each output pixel takes the label under its centre
        rows = np.floor((y_um + (np.arange(h_px) + 0.5) * mpp) / self.mpp).astype(np.int64)
        cols = np.floor((x_um + (np.arange(w_px) + 0.5) * mpp) / self.mpp).astype(np.int64)
        rin = (rows >= 0) & (rows < self.shape[0])
        cin = (cols >= 0) & (cols < self.shape[1])
        labels = np.zeros((h_px, w_px), np.int64)
        if rin.any() and cin.any():
            r0, r1 = int(rows[rin].min()), int(rows[rin].max()) + 1
            c0, c1 = int(cols[cin].min()), int(cols[cin].max()) + 1
            block = np.asarray(self._labels()[r0:r1, c0:c1])
            labels[np.ix_(rin, cin)] = block[np.ix_(rows[rin] - r0, cols[cin] - c0)]
        valid = rin[:, None] & cin[None, :]
        target = np.stack([np.isin(labels, self._ids(names)) & valid
                           for names in _class_names(classes)]).astype(np.float32)
        valid &= ~np.isin(labels, self._ids(IGNORE_NAMES))
        return target, valid

    def positive_points_um(self, classes: Classes,
                           stride_um: float = POINT_STRIDE_UM) -> np.ndarray:
        ids = self._ids(frozenset().union(*_class_names(classes)))
        if not len(ids):
            return np.zeros((0, 2))
        step = max(1, round(stride_um / self.mpp))
        arr = self._labels()
        sample_rows = np.arange(step // 2, self.shape[0], step)
        found = []
        for i in range(0, len(sample_rows), _POINT_ROWS_PER_READ):
            band = sample_rows[i:i + _POINT_ROWS_PER_READ]
            sub = np.asarray(arr[int(band[0]):int(band[-1]) + 1:step, step // 2::step])
            r, c = np.nonzero(np.isin(sub, ids))
            found.append(np.stack([(step // 2 + c * step + 0.5) * self.mpp,
                                   (band[r] + 0.5) * self.mpp], axis=1))
        points = np.concatenate(found) if found else np.zeros((0, 2))
        return points.reshape(-1, 2).astype(np.float64)


class TruthZarrSource(_LabelGrid):
    """``<stem>.truth.zarr`` written by `wsi-synth`: ``labels`` with attrs mpp, legend."""

    kind = "truth.zarr"

    def __init__(self, path: Path) -> None:
        import zarr

        try:
            labels = zarr.open_group(str(path), mode="r")["labels"]
            attrs = dict(labels.attrs)
            mpp, legend = float(attrs["mpp"]), attrs["legend"]
        except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
            raise WsiError(f"{path}: not a truth.zarr with a 'labels' array carrying mpp "
                           f"and legend ({type(exc).__name__}: {exc})") from None
        super().__init__(path, mpp, legend, tuple(labels.shape))

    def _open(self) -> Any:
        import zarr

        return zarr.open_group(str(self.path), mode="r")["labels"]


class LabelMaskSource(_LabelGrid):
    """``<stem>.labels.tif|.tiff|.png`` with ``<stem>.labels.json`` beside it."""

    kind = "label mask"

    def __init__(self, path: Path, slide_path: str | Path, mpp: float | None = None) -> None:
        path = Path(path)
        legend_path = path.with_suffix(".json")
        if not legend_path.is_file():
            raise UsageError(f"{path}: label mask without its legend {legend_path.name} "
                             '({"legend": {"1": "focus", ...}, "mpp": um/px})')
        try:
            meta = json.loads(legend_path.read_text())
        except (OSError, ValueError) as exc:
            raise WsiError(f"{legend_path}: unreadable JSON: {exc}") from None
        legend = meta.get("legend", meta) if isinstance(meta, dict) else None
        if not isinstance(legend, dict):
            raise WsiError(f"{legend_path}: expected {{\"legend\": {{id: name}}, \"mpp\": ...}}")
        legend = {k: v for k, v in legend.items() if k != "mpp"}
        shape, tag_mpp = _mask_shape_and_mpp(path)
        mask_mpp = meta.get("mpp") if isinstance(meta.get("mpp"), int | float) else None
        mask_mpp = mask_mpp or tag_mpp or _mpp_from_slide(path, slide_path, shape, mpp)
        super().__init__(path, float(mask_mpp), legend, shape)
        self._tiff: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return super().__getstate__() | {"_tiff": None}

    def _open(self) -> Any:
        if self.path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(self.path) as im:
                return _label_plane(np.asarray(im), self.path)
        import tifffile
        import zarr

        self._tiff = tifffile.TiffFile(self.path)
        return zarr.open(self._tiff.series[0].aszarr(level=0), mode="r")


def _label_plane(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3:  # an RGB(A) export of grey labels: identical channels
        if not np.array_equal(arr[..., 0], arr[..., 1]):
            raise WsiError(f"{path}: a label mask holds one class id per pixel, not colours")
        arr = arr[..., 0]
    return arr


def _mask_shape_and_mpp(path: Path) -> tuple[tuple[int, int], float | None]:
    """(H, W) of a label mask and its MPP from TIFF resolution tags (None if absent)."""
    if path.suffix.lower() == ".png":
        from PIL import Image

        try:
            with Image.open(path) as im:
                return (im.height, im.width), None
        except OSError as exc:
            raise WsiError(f"{path}: unreadable label mask: {exc}") from None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.series[0].levels[0].pages[0]
            shape = tuple(int(v) for v in page.shape[:2])
            (xres, _), unit = page.resolution, page.resolutionunit
    except (tifffile.TiffFileError, OSError, IndexError, ValueError) as exc:
        raise WsiError(f"{path}: unreadable label mask: {exc}") from None
    per_um = {2: 1e4 / 25.4, 3: 1e4}.get(int(unit), 0) if unit else 0  # INCH, CENTIMETER
    mpp = per_um / xres if per_um and xres else None
    if mpp is not None and not 0.05 <= mpp <= 500:  # a default 72 dpi, not a microscope scale
        mpp = None
    return shape, mpp


def _mpp_from_slide(path: Path, slide_path: str | Path, shape: tuple[int, int],
                    mpp: float | None) -> float:
    """A mask's MPP when nothing states it: it covers the whole slide at a downsample."""
    from .slide import open_slide

    with open_slide(slide_path, mpp=mpp) as slide:
        w_um, h_um = slide.size_um
    mx, my = w_um / shape[1], h_um / shape[0]
    if abs(mx - my) > 0.02 * mx:
        raise UsageError(f"{path}: no mpp in {path.with_suffix('.json').name} or TIFF tags, and "
                         f"the mask's aspect ({shape[1]} x {shape[0]} px) differs from the "
                         "slide's; give \"mpp\" in the legend file")
    return (mx + my) / 2


# -- QuPath GeoJSON ------------------------------------------------------------------------------
class GeoJsonSource(AnnotationSource):
    """QuPath GeoJSON polygons in slide level-0 pixels (small: held in memory)."""

    kind = "geojson"

    def __init__(self, path: Path, slide_path: str | Path, mpp: float | None = None) -> None:
        from .slide import open_slide

        with open_slide(slide_path, mpp=mpp) as slide:
            self.slide_mpp = float(slide.mpp)
            extent = slide.size_um
        super().__init__(path, extent)
        self.names, self.polygons, self.skipped = _read_geojson(Path(path))
        # per feature bounding box in um: x0, y0, x1, y1
        outlines = [np.concatenate([rings[0] for rings in polys]) for polys in self.polygons]
        self.boxes_um = np.array([np.concatenate([o.min(0), o.max(0)]) for o in outlines]
                                 ).reshape(-1, 4) * self.slide_mpp

    def class_names(self) -> list[str]:
        return sorted({n for n in self.names if n})

    def crop(self, x_um: float, y_um: float, w_px: int, h_px: int, mpp: float,
             classes: Classes) -> tuple[np.ndarray, np.ndarray]:
        wanted = _class_names(classes)
        target = np.zeros((len(wanted), h_px, w_px), bool)
        ignore = np.zeros((h_px, w_px), bool)
        b = self.boxes_um
        near = np.nonzero((b[:, 2] >= x_um) & (b[:, 0] <= x_um + w_px * mpp)
                          & (b[:, 3] >= y_um) & (b[:, 1] <= y_um + h_px * mpp))[0]
        for i in near:
            name = self.names[i]
            layers = [k for k, names in enumerate(wanted) if name in names]
            is_ignore = name in IGNORE_NAMES
            if not (layers or is_ignore):
                continue
            # polygon vertices -> output grid, where pixel (r, c) has its centre at (r, c)
            scale = self.slide_mpp / mpp
            shift = np.array([x_um / mpp + 0.5, y_um / mpp + 0.5])
            mask = _rasterise(self.polygons[i], scale, shift, (h_px, w_px))
            for k in layers:
                target[k] |= mask
            if is_ignore:
                ignore |= mask
        # pixel centres inside the slide
        xs = x_um + (np.arange(w_px) + 0.5) * mpp
        ys = y_um + (np.arange(h_px) + 0.5) * mpp
        inside = ((ys >= 0) & (ys < self.extent_um[1]))[:, None] \
            & ((xs >= 0) & (xs < self.extent_um[0]))[None, :]
        return (target & inside).astype(np.float32), inside & ~ignore

    def positive_points_um(self, classes: Classes,
                           stride_um: float = POINT_STRIDE_UM) -> np.ndarray:
        names = frozenset().union(*_class_names(classes))
        found = [np.zeros((0, 2))]
        for name, polys in zip(self.names, self.polygons, strict=True):
            if name not in names:
                continue
            for rings in polys:
                found.append(_points_in_polygon(rings, self.slide_mpp, stride_um))
        return np.concatenate(found).astype(np.float64)


def _read_geojson(path: Path) -> tuple[list[str | None], list[list[list[np.ndarray]]], int]:
    """(class name per feature, polygons per feature as rings of (K, 2) (x, y) px, number of
    features skipped for not being polygons)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WsiError(f"{path}: unreadable GeoJSON: {exc}") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):  # QuPath's older "export as array of features"
        features = data
    else:
        raise WsiError(f"{path}: expected a GeoJSON FeatureCollection, Feature or list of "
                       "features")
    names, polygons, skipped = [], [], 0
    for n, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        coords = geometry.get("coordinates") if isinstance(geometry, dict) else None
        if kind not in ("Polygon", "MultiPolygon") or not coords:
            skipped += 1   # points, lines and empty geometries carry no area
            continue
        try:
            parts = [coords] if kind == "Polygon" else coords
            polys = [[np.asarray(ring, np.float64)[:, :2] for ring in part] for part in parts]
        except (ValueError, IndexError, TypeError):
            raise WsiError(f"{path}: feature {n} has malformed {kind} coordinates") from None
        polys = [p for p in polys if p and len(p[0]) >= 3]
        if not polys:
            skipped += 1
            continue
        names.append(_classification(feature.get("properties")))
        polygons.append(polys)
    return names, polygons, skipped


def _rasterise(polys: list[list[np.ndarray]], scale: float, shift: np.ndarray,
               shape: tuple[int, int]) -> np.ndarray:
    """Pixels of ``shape`` whose centres lie inside the polygons (holes cut out); vertex
    v (x, y) in slide pixels maps to grid coordinate v * scale - shift."""
    mask = np.zeros(shape, bool)
    for rings in polys:
        for k, ring in enumerate(rings):
            g = ring * scale - shift
            rr, cc = fill_polygon(g[:, 1], g[:, 0], shape)
            mask[rr, cc] = k == 0   # ring 0 is the outline, the others are holes
    return mask


def _points_in_polygon(rings: list[np.ndarray], slide_mpp: float,
                       stride_um: float) -> np.ndarray:
    """Grid points ``stride_um`` apart inside one polygon (x_um, y_um); a polygon smaller
    than the grid gets points from a finer grid, at worst its vertex mean."""
    outline = rings[0] * slide_mpp
    lo, hi = outline.min(0), outline.max(0)
    for stride in (stride_um, stride_um / 4):
        gx = np.arange(math.floor(lo[0] / stride), math.ceil(hi[0] / stride)) + 0.5
        gy = np.arange(math.floor(lo[1] / stride), math.ceil(hi[1] / stride)) + 0.5
        pts = np.stack(np.meshgrid(gx * stride, gy * stride), -1).reshape(-1, 2)
        keep = points_in_poly(pts, outline)
        for hole in rings[1:]:
            keep &= ~points_in_poly(pts, hole * slide_mpp)
        if keep.any():
            return pts[keep]
    return outline.mean(0, keepdims=True)
