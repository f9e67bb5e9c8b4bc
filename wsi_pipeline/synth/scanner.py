"""Scanner effects on rendered level-0 pixels (randomised slides only).

A `ScannerModel` (drawn per slide by `randomise.draw`) turns the rendered transmittance
of the whole slide into what a scanner records: optical blur that varies over the slide
(focus), an illumination gradient, scanner fields with their own gain and vignetting
(stitching seams), white balance and sensor noise; the JPEG quality is chosen per slide
too. Every effect is a function of absolute slide coordinates, and the blur reads the
rendered pixels around a tile (`apply` takes the whole rendered level 0, usually a
memory map), so tiles join without seams of their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import scene as sc

BLUR_LEVELS = 5  # sigma levels between which a tile's blur is interpolated


@dataclass(frozen=True)
class ScannerModel:
    """One slide's scanner (lengths in um at level 0, gains relative to 1).

    blur_base_um: Gaussian sigma of the in-focus optics; blur_extra_um: extra sigma in
    out-of-focus patches, which cover the slide where smooth noise of feature size
    blur_scale_um exceeds blur_threshold (-1..1; higher = fewer patches).
    gradient_per_mm: (gx, gy) linear illumination change per mm from the slide centre;
    shading_amp, shading_scale_um: smooth illumination noise.
    field_um: (w, h) of a scanner field (h = 0: full-height line-scan stripes);
    field_offset_um: (x, y) of the field grid; field_gain_sd: sd of a field's gain per
    channel; field_vignette: relative fall-off at a field's corners.
    white_balance: (3,) channel gains. read_noise_dn: sd of sensor noise (8-bit units);
    shot_noise: its variance per unit of signal. jpeg_quality: level-0 JPEG quality.
    """

    seed: int
    mpp: float
    width_px: int
    height_px: int
    blur_base_um: float
    blur_extra_um: float
    blur_scale_um: float
    blur_threshold: float
    gradient_per_mm: tuple[float, float]
    shading_amp: float
    shading_scale_um: float
    field_um: tuple[float, float]
    field_offset_um: tuple[float, float]
    field_gain_sd: float
    field_vignette: float
    white_balance: tuple[float, float, float]
    read_noise_dn: float
    shot_noise: float
    jpeg_quality: int

    def record(self) -> dict:
        """JSON-able parameters (rounded)."""
        out = {}
        for k, v in asdict(self).items():
            if k in ("seed", "mpp", "width_px", "height_px"):
                continue
            out[k] = [round(float(x), 4) for x in v] if isinstance(v, tuple) else (
                v if isinstance(v, int) else round(float(v), 4))
        return out

    # ------------------------------------------------------------------ fields (um in)

    def blur_sigma_um(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Blur sigma (um) at points: base everywhere, more in out-of-focus patches."""
        n = sc.value_noise(self.seed + 1, x_um, y_um, self.blur_scale_um)
        out = sc.smoothstep(self.blur_threshold, self.blur_threshold + 0.25, n)
        return (self.blur_base_um + self.blur_extra_um * out).astype(np.float32)

    def illumination(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Illumination gain at points: linear gradient plus smooth shading."""
        cx, cy = self.width_px * self.mpp / 2, self.height_px * self.mpp / 2
        gx, gy = self.gradient_per_mm
        g = 1 + gx * (x_um - cx) / 1000 + gy * (y_um - cy) / 1000
        g = g + self.shading_amp * sc.value_noise(self.seed + 2, x_um, y_um,
                                                  self.shading_scale_um)
        return np.asarray(g, np.float32)

    def _field_axis(self, pos_um: np.ndarray, size_um: float, offset_um: float):
        """Field index and fall-off (1 at the centre) along one axis."""
        if size_um <= 0:  # line-scan stripe: one field along this axis
            return np.zeros(pos_um.shape, np.int64), np.ones(pos_um.shape, np.float32)
        f = (pos_um - offset_um) / size_um
        idx = np.floor(f).astype(np.int64)
        r = 2 * (f - idx) - 1
        return idx, (1 - self.field_vignette * 0.5 * r * r).astype(np.float32)

    def field_gain(self, xs_um: np.ndarray, ys_um: np.ndarray) -> np.ndarray:
        """(len(ys), len(xs), 3) gain of the scanner fields (steps at their seams)."""
        ix, vx = self._field_axis(xs_um, self.field_um[0], self.field_offset_um[0])
        iy, vy = self._field_axis(ys_um, self.field_um[1], self.field_offset_um[1])
        sd = np.float32(self.field_gain_sd * np.sqrt(3.0))
        common = sc.hash_uniform(self.seed + 3, ix[None, :], iy[:, None], 7)
        g = np.empty((len(ys_um), len(xs_um), 3), np.float32)
        for ch in range(3):  # mostly a common step, a little colour shift per channel
            u = sc.hash_uniform(self.seed + 3, ix[None, :], iy[:, None], ch)
            g[..., ch] = 1 + sd * (0.8 * (2 * common - 1) + 0.2 * (2 * u - 1))
        return g * (vy[:, None] * vx[None, :])[..., None]

    # ------------------------------------------------------------------ per tile

    @property
    def blur_levels_um(self) -> np.ndarray:
        """Fixed sigma levels (um) the per-pixel blur is interpolated between."""
        return np.linspace(self.blur_base_um, self.blur_base_um + self.blur_extra_um,
                           BLUR_LEVELS).astype(np.float32)

    @property
    def margin_px(self) -> int:
        """Pixels of context each side a tile's blur reads."""
        return int(np.ceil(4 * (self.blur_base_um + self.blur_extra_um) / self.mpp)) + 1

    def apply(self, raw: np.ndarray, x0_px: int, y0_px: int, size: int) -> np.ndarray:
        """The scanned (size, size, 3) uint8 tile at (x0_px, y0_px) of the rendered level 0
        `raw` (H, W, 3) uint8 (transmittance x 255; H, W multiples of the tile)."""
        m = self.margin_px
        h, w = raw.shape[:2]
        ya, yb = max(y0_px - m, 0), min(y0_px + size + m, h)
        xa, xb = max(x0_px - m, 0), min(x0_px + size + m, w)
        region = np.asarray(raw[ya:yb, xa:xb], np.float32)
        pad = ((ya - (y0_px - m), y0_px + size + m - yb),
               (xa - (x0_px - m), x0_px + size + m - xb), (0, 0))
        if any(pad[0]) or any(pad[1]):  # slide border: mirror the rendered pixels
            region = np.pad(region, pad, mode="symmetric")
        mpp = self.mpp
        x0, y0 = x0_px * mpp, y0_px * mpp
        step = 16 if size % 16 == 0 else 1
        sigma = sc.coarse_fields(
            lambda gx, gy: {"s": self.blur_sigma_um(gx, gy)}, x0, y0, mpp, size, step)["s"]
        # per-pixel sigma: linear mix of the two fixed levels around it (the same levels in
        # every tile, so neighbouring tiles agree)
        levels = self.blur_levels_um
        pos = np.clip((sigma - levels[0]) / max(levels[-1] - levels[0], 1e-6)
                      * (len(levels) - 1), 0, len(levels) - 1 - 1e-3)
        lo = np.floor(pos).astype(np.int64)
        frac = (pos - lo)[..., None].astype(np.float32)
        blurred: dict[int, np.ndarray] = {}

        def level(k: int) -> np.ndarray:
            if k not in blurred:
                blurred[k] = self._blurred(region, float(levels[k]), m, size)
            return blurred[k]

        out = np.empty((size, size, 3), np.float32)
        for k in np.unique(lo):
            sel = lo == k
            a, b = level(int(k)), level(int(k) + 1)
            out[sel] = a[sel] + (b[sel] - a[sel]) * frac[sel]
        xs = ((x0_px + np.arange(size) + 0.5) * mpp).astype(np.float32)
        ys = ((y0_px + np.arange(size) + 0.5) * mpp).astype(np.float32)
        illum = sc.coarse_fields(lambda gx, gy: {"g": self.illumination(gx, gy)}, x0, y0,
                                 mpp, size, step)["g"]
        gain = self.field_gain(xs, ys) * illum[..., None] * np.asarray(
            self.white_balance, np.float32)
        out *= gain
        rng = np.random.default_rng(sc.tile_seed(self.seed + 4, x0_px, y0_px))
        sd = np.sqrt(self.read_noise_dn ** 2 + self.shot_noise * np.maximum(out, 0))
        out += rng.standard_normal(out.shape, np.float32) * sd
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def _blurred(self, region: np.ndarray, sigma_um: float, m: int, size: int) -> np.ndarray:
        """Gaussian blur (sigma in um) of the padded region, cropped to the tile."""
        from scipy import ndimage

        s = float(sigma_um) / self.mpp
        if s < 0.05:
            return region[m:m + size, m:m + size]
        out = ndimage.gaussian_filter(region, (s, s, 0), mode="nearest", truncate=3.5)
        return out[m:m + size, m:m + size]
