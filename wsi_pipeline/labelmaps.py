"""Label maps in the zarr store: new maps shaped like a probability map, band-by-band
iteration, connected components across bands, and the tissue mask resampled to a band.
The tasks' stitch and measure stages are built from these; nothing here holds a
whole-slide array in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import zarr
from scipy import ndimage


def nearest_index(n: int, mpp: float, src_mpp: float, src_n: int, start: int = 0) -> np.ndarray:
    """Index into a grid of ``src_mpp`` um/px (``src_n`` long) of the centre of each of
    ``n`` pixels at ``mpp``, starting at pixel ``start``: nearest-neighbour resampling of a
    small map (e.g. the tissue mask) onto a band of a finer one.

    >>> nearest_index(4, 2.0, 8.0, 10).tolist()
    [0, 0, 0, 0]
    """
    centres_um = (np.arange(start, start + n) + 0.5) * mpp
    return np.clip((centres_um / src_mpp).astype(np.int64), 0, src_n - 1)


def tissue_band(tissue: np.ndarray, tissue_mpp: float, y0: int, shape: tuple[int, int],
                mpp: float) -> np.ndarray:
    """The (h, w) part of the thumbnail-sized boolean ``tissue`` mask (at ``tissue_mpp``)
    under a band of a map at ``mpp`` whose first row is ``y0`` (nearest neighbour)."""
    rows = nearest_index(shape[0], mpp, tissue_mpp, tissue.shape[0], start=y0)
    cols = nearest_index(shape[1], mpp, tissue_mpp, tissue.shape[1])
    return tissue[np.ix_(rows, cols)]


def thumbnail_tissue(store) -> tuple[np.ndarray, float]:
    """The tissue stage's mask as a boolean thumbnail-sized array (small) and its MPP."""
    mask = store.root["tissue/mask"]
    return np.asarray(mask) == 1, float(mask.attrs["mpp"])


def new_label_map(store, name: str, like: zarr.Array, legend: dict[int, str],
                  copy: bool = False) -> zarr.Array:
    """``name`` in ``store``: a (H, W) uint8 label map on the grid and chunks of ``like``
    ((C, H, W) probabilities or another (H, W) map), attrs ``mpp`` and ``legend``; zeros,
    or with ``copy`` a band-by-band copy of ``like`` (a 2-D map)."""
    height, width = like.shape[-2:]
    out = store.root.create_array(name, shape=(height, width), dtype="uint8",
                                  chunks=like.chunks[-2:], fill_value=0, overwrite=True)
    out.attrs.update({"mpp": float(like.attrs["mpp"]),
                      "legend": {str(k): v for k, v in legend.items()}})
    if copy:
        for y0, band in iter_bands(like):
            out[y0:y0 + band.shape[0], :] = band
    return out


def argmax_labels(store, channels: tuple[int, ...], legend: dict[int, str],
                  name: str = "pred/labels") -> tuple[float, np.ndarray]:
    """The stitch stage of a region-segmentation task: ``name`` ((H, W) uint8) band by band
    from ``pred/prob``; label i (1, 2, ...) where ``channels[i]`` is the most probable of
    ``channels`` (``channels[0]`` the background) inside the tissue mask, else 0. Returns
    (the map's MPP, pixel count per label (len(legend),) int64)."""
    prob = store.root["pred/prob"]
    mpp = float(prob.attrs["mpp"])
    tissue_lowres, tissue_mpp = thumbnail_tissue(store)
    width = prob.shape[-1]
    labels = new_label_map(store, name, prob, legend)
    counts = np.zeros(len(legend), np.int64)
    for y0, band in iter_bands(prob):
        h = band.shape[1]
        band_labels = np.argmax(band[list(channels)], axis=0).astype(np.uint8)
        band_labels[~tissue_band(tissue_lowres, tissue_mpp, y0, (h, width), mpp)] = 0
        labels[y0:y0 + h, :] = band_labels
        counts += np.bincount(band_labels.ravel(), minlength=len(legend))[:len(legend)]
    return mpp, counts


def iter_bands(array: zarr.Array, band_px: int | None = None):
    """Yield (y0, band) over a 2-D or (C, H, W) zarr array in row bands of ``band_px``
    rows (default: the chunk height), full width — bounded memory for slide-sized maps."""
    axis = array.ndim - 2
    band_px = band_px or array.chunks[axis]
    for y0 in range(0, array.shape[axis], band_px):
        yield y0, array[..., y0:y0 + band_px, :]


def connected_components(array: zarr.Array, predicate: Callable[[np.ndarray], np.ndarray],
                         *, connectivity: int = 2
                         ) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Connected components of ``predicate(band)`` (a boolean (h, W) image of a band of a
    2-D or (C, H, W) zarr array), band by band.

    Components are labelled within each band and merged across band edges (union-find
    on the touching rows), so no slide-sized label image is ever held. Returns, per
    component, its bounding box (y0, x0, y1, x1) in array pixels and its boolean mask
    cropped to that box.
    """
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    structure = ndimage.generate_binary_structure(2, connectivity)
    boxes: dict[int, list[int]] = {}
    seeds: dict[int, tuple[int, int]] = {}
    previous_row: np.ndarray | None = None   # last row of the previous band's labels
    next_id = 1
    for y0, band in iter_bands(array):
        labels, n = ndimage.label(predicate(band), structure=structure)
        if n:
            objects = ndimage.find_objects(labels)
            labels[labels > 0] += next_id - 1
            for i, sl in enumerate(objects, start=next_id):
                if sl is None:
                    continue
                parent[i] = i
                boxes[i] = [sl[0].start + y0, sl[1].start, sl[0].stop + y0, sl[1].stop]
                r = sl[0].start
                c = sl[1].start + int(np.argmax(labels[r, sl[1]] == i))
                seeds[i] = (r + y0, c)
            if previous_row is not None:
                _merge_rows(previous_row, labels[0], connectivity, parent, find)
            next_id += n
        previous_row = labels[-1].copy() if n else np.zeros(band.shape[-1], np.int64)

    groups: dict[int, list[int]] = {}
    for i in parent:
        groups.setdefault(find(i), []).append(i)
    components = []
    for members in groups.values():
        y0 = min(boxes[i][0] for i in members)
        x0 = min(boxes[i][1] for i in members)
        y1 = max(boxes[i][2] for i in members)
        x1 = max(boxes[i][3] for i in members)
        crop = predicate(array[..., y0:y1, x0:x1])
        labels, _ = ndimage.label(crop, structure=structure)
        keep = {int(labels[seeds[i][0] - y0, seeds[i][1] - x0]) for i in members}
        components.append(((y0, x0, y1, x1), np.isin(labels, list(keep))))
    components.sort(key=lambda c: (c[0][0], c[0][1]))
    return components


def _merge_rows(upper: np.ndarray, lower: np.ndarray, connectivity: int,
                parent: dict[int, int], find: Callable[[int], int]) -> None:
    """Union labels of two vertically adjacent rows that touch."""
    shifts = (-1, 0, 1) if connectivity == 2 else (0,)
    for s in shifts:
        a = upper[max(0, -s):len(upper) - max(0, s)]
        b = lower[max(0, s):len(lower) - max(0, -s)]
        touch = (a > 0) & (b > 0)
        for i, j in set(zip(a[touch].tolist(), b[touch].tolist(), strict=True)):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[rj] = ri


def count_regions(labels: zarr.Array, value: int) -> int:
    """Number of connected regions (8-connected, any size) of ``value`` in a 2-D label map,
    counted band by band."""
    return len(connected_components(labels, lambda band: band == value))
