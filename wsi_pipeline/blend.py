"""Blend overlapping window predictions into slide-level maps in the zarr store.

Windows overlap, and a network's output is least reliable near a window's edge (zero
padding, missing context). Each window's prediction is therefore weighted by a ramp that
falls linearly from 1 in its centre to nearly 0 at its edge, and every output pixel is the
weighted mean of the windows covering it.

The map is built one *band* at a time: a band is one row of output chunks. Windows arrive
in raster order, so once the windows have moved below a band nothing more can land in it:
the band is divided by its weights, written to zarr and marked done. Memory is a couple of
bands (channels x chunk height x slide width), never the whole slide; a killed run redoes
only the bands that were not marked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr


def ramp_weights(size_px: int, ramp_px: int, margin_px: int = 0,
                 floor: float = 1e-3) -> np.ndarray:
    """(size_px, size_px) float32 blending weights, a separable tent: ``floor`` in the
    outer ``margin_px`` pixels of each edge (where zero padding corrupts a network's
    output), rising linearly to 1 over the next ``ramp_px - margin_px`` pixels.

    >>> w = ramp_weights(64, 16, margin_px=4)
    >>> float(w[32, 32]), round(float(w[2, 32]), 4)
    (1.0, 0.001)
    """
    if ramp_px <= 0:
        return np.ones((size_px, size_px), np.float32)
    i = np.arange(size_px, dtype=np.float32)
    edge = np.minimum(i + 0.5, size_px - i - 0.5)          # distance to the nearer edge, px
    rise = max(ramp_px - margin_px, 1)
    w1 = np.clip((edge - margin_px) / rise, floor, 1.0).astype(np.float32)
    return np.outer(w1, w1)


class BandStitcher:
    """Accumulates weighted window predictions into ``out`` ((C, H, W) uint8 zarr array,
    probability x 255), band by band.

    ``add`` takes windows in raster order (non-decreasing top row); ``done`` holds the
    band indices already on disk from an earlier, interrupted run: their contributions are
    dropped, so a resumed run neither recomputes nor double-counts them.
    """

    def __init__(self, out: zarr.Array, weights: np.ndarray, marks: Path | None = None,
                 on_band: Callable[[int], None] | None = None) -> None:
        self.out = out
        self.weights = weights.astype(np.float32)
        self.band_px = out.chunks[1]
        self.marks = marks
        self.on_band = on_band
        self.done = {int(p.name) for p in marks.iterdir()} if marks else set()
        self._bands: dict[int, np.ndarray] = {}   # band -> (C + 1, band_px, W) sums, weights

    @property
    def n_bands(self) -> int:
        return -(-self.out.shape[1] // self.band_px)

    def bands_of(self, y0: int, h: int) -> range:
        """Bands touched by output rows [y0, y0 + h), clipped to the map."""
        lo, hi = max(y0, 0), min(y0 + h, self.out.shape[1])
        return range(lo // self.band_px, (hi - 1) // self.band_px + 1) if hi > lo else range(0)

    def needed(self, y0: int, h: int) -> bool:
        """Whether a window at output row ``y0`` of height ``h`` still has a band to fill."""
        return any(b not in self.done for b in self.bands_of(y0, h))

    def add(self, y0: int, x0: int, probs: np.ndarray) -> None:
        """Add one window's (C, h, w) probabilities whose top-left output pixel is (y0, x0)
        (may lie outside the map; the outside part is dropped)."""
        self.flush_above(y0)
        c, h, w = probs.shape
        _, height, width = self.out.shape
        xs, xe = max(x0, 0), min(x0 + w, width)
        if xe <= xs:
            return
        for b in self.bands_of(y0, h):
            if b in self.done:
                continue
            acc = self._bands.get(b)
            if acc is None:
                acc = self._bands[b] = np.zeros((c + 1, self.band_px, width), np.float32)
            ys, ye = max(y0, b * self.band_px), min(y0 + h, (b + 1) * self.band_px, height)
            wy = slice(ys - y0, ye - y0)
            wx = slice(xs - x0, xe - x0)
            ay = slice(ys - b * self.band_px, ye - b * self.band_px)
            weight = self.weights[wy, wx]
            acc[:c, ay, xs:xe] += probs[:, wy, wx] * weight
            acc[c, ay, xs:xe] += weight

    def flush_above(self, y: int) -> None:
        """Write every band that ends at or above output row ``y`` (no later window can
        reach it)."""
        for b in sorted(self._bands):
            if (b + 1) * self.band_px <= y:
                self._write(b)

    def close(self) -> None:
        """Write every band still in memory."""
        for b in sorted(self._bands):
            self._write(b)

    def _write(self, b: int) -> None:
        acc = self._bands.pop(b)
        c = acc.shape[0] - 1
        weight = acc[c]
        probs = np.divide(acc[:c], weight, out=np.zeros_like(acc[:c]), where=weight > 0)
        y0 = b * self.band_px
        h = min(self.band_px, self.out.shape[1] - y0)
        self.out[:, y0:y0 + h, :] = np.rint(probs[:, :h] * 255).astype(np.uint8)
        if self.marks is not None:
            (self.marks / str(b)).touch()  # only after the band's chunks are on disk
        self.done.add(b)
        if self.on_band:
            self.on_band(b)
