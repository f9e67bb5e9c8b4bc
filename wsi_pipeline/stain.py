"""Vahadane stain normalisation: fit once per slide, apply per tile through a lookup table.

Beer-Lambert: a pixel's optical density OD = -ln(I / 255) (per RGB channel) is a
non-negative mix of two stain vectors, OD = c @ M, where M is the (2, 3) stain matrix (unit
rows: haematoxylin, then eosin or PAS magenta) and c >= 0 the two concentrations.

* `fit_vahadane` learns M once per slide by sparse non-negative dictionary learning on
  sampled tissue OD pixels (Vahadane et al., IEEE TMI 2016: 2 atoms, lambda 0.1, luminosity
  threshold 0.8) with scikit-learn, and the 99th-percentile concentrations of the slide.
* Normalising a pixel to a reference stain is closed form: its two concentrations are the
  exact non-negative least-squares fit with Vahadane's small L1 term (lambda 0.01; for two
  stains this has a closed form, see `concentrations`), scaled per stain by
  max_ref / max_src, recomposed with M_ref, back to RGB. Once the slide is fitted that
  depends only on the pixel's RGB, so `build_lut` tabulates it for all 256^3 colours
  (64 MB uint32) and `normalise` is a single gather per pixel (one compiled pass with
  numba when the `fast` extra is installed, `stain_kernel`; the same bytes as numpy's).
* Glass stays glass: a pixel at or above L*/100 = 0.9 (glass, well above the fit's tissue
  threshold of 0.8) is left exactly as scanned, and pixels between 0.85 and 0.9 blend
  linearly from normalised to as-scanned, so the table has no step and background never
  darkens; pale tissue below 0.85 is normalised as the demo models were trained.
* The fit sample leaves out colours no bright-field stain makes (`non_stain`): marker ink
  and tissue-marking dye (they absorb red more than green), and black debris or folds.
* `backend="staintools"` (optional extra) runs staintools' per-tile Vahadane instead, as a
  reference implementation; spams is only ever imported there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_pipeline.errors import StainFitError, UsageError, WsiError

if TYPE_CHECKING:
    import torch

__all__ = [
    "REFERENCES",
    "Normaliser",
    "StainFit",
    "build_lut",
    "concentrations",
    "fit_vahadane",
    "luminosity",
    "lut_to_torch",
    "make_normaliser",
    "non_stain",
    "normalise",
    "normalise_direct",
    "normalise_torch",
    "resolve_reference",
    "rgb_to_od",
    "stain_pixels",
    "stain_similarity",
    "staintools_stain_matrix",
    "tissue_pixels",
]

Backend = Literal["numpy", "torch", "staintools"]
Kernel = Literal["auto", "numpy", "numba"]  # how `normalise` gathers (see there)

LUT_SIZE = 1 << 24  # one entry per 8-bit RGB colour; index = R | G << 8 | B << 16

# OD of each 8-bit intensity; 0 is read as 1 so that OD stays finite (as staintools does).
_OD_TABLE = -np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)
_OD_TABLE32 = _OD_TABLE.astype(np.float32)


# --------------------------------------------------------------------------- stain fits


@dataclass(frozen=True, eq=False)
class StainFit:
    """A slide's (or reference's) stain description.

    matrix: (2, 3) float32, unit-norm OD rows [haematoxylin, eosin | PAS].
    max_conc: (2,) float32, 99th-percentile concentration of each stain over tissue pixels.
    """

    matrix: np.ndarray
    max_conc: np.ndarray

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64).reshape(2, 3)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        if not np.all(norms > 1e-6):
            raise StainFitError(f"stain matrix has an all-zero row: {matrix.tolist()}")
        if np.any(np.abs(norms - 1.0) > 1e-6):  # e.g. published rows rounded to 4 digits
            matrix = matrix / norms
        matrix = matrix.astype(np.float32)
        max_conc = np.array(self.max_conc, dtype=np.float32).reshape(2)
        if not (np.all(np.isfinite(matrix)) and np.all(np.isfinite(max_conc))):
            raise StainFitError("stain fit holds non-finite numbers")
        if np.any(max_conc <= 0):
            raise StainFitError(f"stain fit has a non-positive max concentration {max_conc}")
        matrix.setflags(write=False)
        max_conc.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "max_conc", max_conc)

    def _key(self) -> bytes:
        return self.matrix.tobytes() + self.max_conc.tobytes()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StainFit) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def to_dict(self) -> dict[str, list]:
        """JSON-able form: {"matrix": [[3 floats], [3 floats]], "max_conc": [2 floats]}."""
        return {"matrix": self.matrix.tolist(), "max_conc": self.max_conc.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StainFit:
        """Inverse of `to_dict` (float32 values round-trip exactly)."""
        return cls(matrix=np.asarray(d["matrix"]), max_conc=np.asarray(d["max_conc"]))


REFERENCES: dict[str, StainFit] = {
    # H&E: the reference of Macenko et al. (ISBI 2009), published with their code and reused
    # by torchstain and others (their max concentrations came from plain least squares).
    "he": StainFit(
        matrix=[[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]],
        max_conc=[1.9705, 1.0308],
    ),
    # PAS kidney (haematoxylin + PAS magenta): fit_vahadane(seed=0, defaults) on the tissue
    # pixels of the two real PAS kidney tiles in the project's data (kidney-pas/images
    # 10025.png and 10149.png, 1024 x 1024 each), pooled; test_stain re-derives it.
    "pas": StainFit(
        matrix=[[0.5905, 0.7107, 0.3825], [0.2869, 0.8624, 0.4172]],
        max_conc=[1.9077, 1.6345],
    ),
}
# How each reference is written for people, and the spellings a slide list may use
STAIN_NAMES = {"he": "H&E", "pas": "PAS"}
STAIN_ALIASES = {"he": ("he", "h&e", "hne", "h-e", "hematoxylin-eosin", "haematoxylin-eosin"),
                 "pas": ("pas", "periodic acid-schiff", "periodic acid schiff")}


def stain_key(name: str) -> str | None:
    """The reference name ("he", "pas") that a written stain name means; None if unknown."""
    value = name.strip().casefold()
    return next((k for k, names in STAIN_ALIASES.items() if value in names), None)


def resolve_reference(reference: str | StainFit) -> StainFit:
    """A StainFit from a name in `REFERENCES` ("he", "pas") or a StainFit itself."""
    if isinstance(reference, StainFit):
        return reference
    try:
        return REFERENCES[reference.lower()]
    except (KeyError, AttributeError):
        raise UsageError(
            f"unknown stain reference {reference!r}; known: {', '.join(sorted(REFERENCES))}"
        ) from None


def stain_similarity(fit: StainFit, reference: str | StainFit) -> float:
    """How well a fit matches a reference stain: the lower cosine of the two matched rows.

    1.0 = same stain vectors. Measured on the project's real images: H&E 0.89-0.997
    against "he" but also 0.93-0.995 against "pas"; PAS kidney 0.997-1.0 against "pas",
    0.98-0.99 against "he". So stain vectors flag an unusual stain (< ~0.9) far better
    than they tell H&E from PAS: compare against both references, not one threshold.
    """
    ref = resolve_reference(reference)
    cos = np.sum(fit.matrix * ref.matrix, axis=1)  # rows are unit norm
    return float(cos.min())


# --------------------------------------------------------------------------- OD and tissue


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (..., 3) float32 optical density, -ln(max(I, 1) / 255)."""
    return _OD_TABLE32[np.asarray(rgb, dtype=np.uint8)]


def _srgb_luminance_tables() -> np.ndarray:
    """(3, 256) contributions of R, G, B to relative luminance Y (sRGB, D65)."""
    v = np.arange(256) / 255.0
    linear = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    return np.outer([0.212671, 0.715160, 0.072169], linear)


_Y_TABLES = _srgb_luminance_tables()


def luminosity(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) float CIE L* / 100 (0 black, 1 white; as OpenCV Lab L)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    y = _Y_TABLES[0][rgb[..., 0]] + _Y_TABLES[1][rgb[..., 1]] + _Y_TABLES[2][rgb[..., 2]]
    f = np.where(y > 0.008856, np.cbrt(y), 7.787 * y + 16.0 / 116.0)
    return (116.0 * f - 16.0) / 100.0


def tissue_pixels(rgb: np.ndarray, *, max_luminosity: float = 0.8) -> np.ndarray:
    """Stained pixels of an image or pixel list: (..., 3) uint8 -> (N, 3) uint8.

    Drops glass and background: keeps pixels with L*/100 < max_luminosity (Vahadane's 0.8).
    """
    px = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
    return px[luminosity(px) < max_luminosity]


# Haematoxylin, the bluest bright-field stain, absorbs less red than green (OD red/green
# 0.78 in Macenko's H&E reference, 0.83 in the PAS one, at most 0.96 in any slide fitted
# here); eosin, PAS magenta and DAB far less. Blue, green and black marker inks and
# tissue-marking dyes absorb red most. Real H&E/PAS tiles lose 0-1 % of their pixels to
# this rule, CMU-1 2.4 % (its blue-green marking dye) and a slide with blue pen 12 %.
MAX_RED_GREEN_OD = 1.1
MIN_BRIGHTEST_RGB = 40  # darker than this in every channel: ink, debris, folds (not a stain)


def non_stain(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) bool: colours no bright-field stain mix makes.

    True where the optical density in red exceeds MAX_RED_GREEN_OD times that in green
    (blue/green/black ink, tissue-marking dye) or every channel is below MIN_BRIGHTEST_RGB
    (black ink, debris, folds). Stained tissue (haematoxylin, eosin, PAS, DAB) absorbs at
    least as much green as red.
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    od = rgb_to_od(rgb)
    return (od[..., 0] > MAX_RED_GREEN_OD * od[..., 1]) | (rgb.max(axis=-1) < MIN_BRIGHTEST_RGB)


def stain_pixels(rgb: np.ndarray, *, max_luminosity: float = 0.8) -> np.ndarray:
    """Pixels fit for a stain estimate: `tissue_pixels` less `non_stain` colours (N, 3)."""
    px = tissue_pixels(rgb, max_luminosity=max_luminosity)
    return px[~non_stain(px)]


CONC_LAMBDA = 0.01  # L1 weight of the concentration fit (Vahadane; staintools' default)


def concentrations(
    od: np.ndarray, matrix: np.ndarray, *, lambda2: float = CONC_LAMBDA
) -> np.ndarray:
    """(N, 3) OD, (2, 3) stain matrix -> (N, 2) concentrations >= 0.

    Each pixel's c minimises 0.5 |od - c @ matrix|^2 + lambda2 * sum(c) subject to c >= 0
    (lambda2 = 0: non-negative least squares), solved exactly in closed form.
    """
    m = np.asarray(matrix, dtype=np.float64)
    b = np.asarray(od, dtype=np.float64) @ m.T - lambda2  # (N, 2)
    c0, c1 = _two_stain_lasso(b[:, 0], b[:, 1], m @ m.T)
    return np.stack([c0, c1], axis=1)


def _two_stain_lasso(
    b0: np.ndarray, b1: np.ndarray, gram: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact non-negative lasso for two stain vectors m0, m1 with gram = M M^T (2, 2).

    b_k = m_k . od - lambda2. The problem is strictly convex (independent stains), so the
    solution is the one candidate meeting the KKT conditions: both stains present (the
    2x2 solve), else stain 0 alone if adding stain 1 would not lower the cost, else stain 1
    alone (a lone stain's max with 0 covers "neither"). Computes in b0's dtype (float32
    for the LUT).
    """
    t = b0.dtype.type
    g00, g01, g11 = t(gram[0, 0]), t(gram[0, 1]), t(gram[1, 1])
    inv_det = t(1.0 / (float(gram[0, 0]) * float(gram[1, 1]) - float(gram[0, 1]) ** 2))
    both0 = (g11 * b0 - g01 * b1) * inv_det
    both1 = (g00 * b1 - g01 * b0) * inv_det
    both = (both0 >= 0) & (both1 >= 0)
    only0 = np.maximum(b0, t(0)) / g00
    only1 = np.maximum(b1, t(0)) / g11
    stain0_alone = g01 * only0 - b1 >= 0
    c0 = np.where(both, both0, np.where(stain0_alone, only0, t(0)))
    c1 = np.where(both, both1, np.where(stain0_alone, t(0), only1))
    return c0, c1


# --------------------------------------------------------------------------- fitting


def fit_vahadane(
    rgb_pixels: np.ndarray,
    *,
    lambda1: float = 0.1,
    max_luminosity: float = 0.8,
    max_pixels: int = 20_000,
    min_pixels: int = 500,
    percentile: float = 99.0,
    seed: int = 0,
    exclude_non_stain: bool = True,
) -> StainFit:
    """Fit a slide's stain matrix and max concentrations (Vahadane's sparse NMF).

    rgb_pixels: (N, 3) or (H, W, 3) uint8, e.g. pixels sampled from a slide's tissue mask;
    background is dropped again here (L*/100 >= max_luminosity), and so are ink, dye and
    black debris (`non_stain`) unless exclude_non_stain is False. Dictionary learning uses
    at most `max_pixels` of them (random, `seed`); the `percentile` of the concentrations
    up to a million. Raises StainFitError when fewer than `min_pixels` are stained.
    """
    px = (stain_pixels if exclude_non_stain else tissue_pixels)(
        rgb_pixels, max_luminosity=max_luminosity)
    if len(px) < min_pixels:
        raise StainFitError(
            f"only {len(px)} stained pixels (luminosity < {max_luminosity}); at least "
            f"{min_pixels} are needed to fit a stain matrix (blank glass or unstained region?)"
        )
    rng = np.random.default_rng(seed)
    sample = px[rng.choice(len(px), max_pixels, replace=False)] if len(px) > max_pixels else px
    matrix = _learn_two_stains(_OD_TABLE[sample], lambda1=lambda1, seed=seed)
    if len(px) > 1_000_000:
        px = px[rng.choice(len(px), 1_000_000, replace=False)]
    max_conc = np.percentile(concentrations(rgb_to_od(px), matrix), percentile, axis=0)
    if np.any(max_conc <= 1e-6):
        raise StainFitError(
            "one of the two stains is absent from the sampled pixels; cannot fit a stain matrix"
        )
    return StainFit(matrix=matrix, max_conc=max_conc)


def _learn_two_stains(od: np.ndarray, *, lambda1: float, seed: int) -> np.ndarray:
    """(N, 3) OD -> (2, 3) unit rows, haematoxylin first, by non-negative sparse coding."""
    import warnings

    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.exceptions import ConvergenceWarning

    # The online algorithm (Mairal et al. 2009) is the one spams.trainDL implements; its
    # objective 0.5 |x - c D|^2 + lambda1 |c|_1 with |D_k| <= 1 matches spams' mode 2.
    learner = MiniBatchDictionaryLearning(
        n_components=2,
        alpha=lambda1,
        batch_size=256,
        max_iter=30,
        fit_algorithm="cd",
        positive_code=True,
        positive_dict=True,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        atoms = learner.fit(od).components_.astype(np.float64)
    norms = np.linalg.norm(atoms, axis=1, keepdims=True)
    if not np.all(np.isfinite(atoms)) or np.any(norms < 1e-8):
        raise StainFitError("dictionary learning found fewer than two stains in these pixels")
    atoms /= norms
    # Haematoxylin (blue-purple) absorbs more red than eosin or PAS magenta.
    if atoms[0, 0] < atoms[1, 0]:
        atoms = atoms[::-1]
    return atoms


# --------------------------------------------------------------------------- closed form


def _closed_form_parts(
    source: StainFit, target: StainFit
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 pieces of the per-pixel transform.

    proj (2, 3, 256): proj[k, ch, v] = source stain k's row entry for channel ch times the
    OD of value v (minus CONC_LAMBDA in channel 0), so b_k = proj[k,0,R] + proj[k,1,G] +
    proj[k,2,B] feeds `_two_stain_lasso`; gram: M_src M_src^T (2, 2); recomp (2, 3):
    target rows scaled by max_target / max_source, so the output OD = c @ recomp.
    """
    m = source.matrix.astype(np.float64)
    proj = m[:, :, None] * _OD_TABLE[None, None, :]
    proj[:, 0, :] -= CONC_LAMBDA
    scale = target.max_conc.astype(np.float64) / source.max_conc.astype(np.float64)
    recomp = target.matrix.astype(np.float64) * scale[:, None]
    return proj.astype(np.float32), m @ m.T, recomp.astype(np.float32)


# Glass stays glass: pixels at or above GLASS_LUMINOSITY (L*/100) keep their scanned colour;
# below it the output blends linearly into the normalised colour over BLEND_LUMINOSITY, so
# the table has no step. Not at the fit's 0.8: pale tissue between 0.7 and 0.9 left as
# scanned cost the liver and kidney demo models their held-out targets.
GLASS_LUMINOSITY = 0.9
BLEND_LUMINOSITY = 0.05
_Y_TABLES32 = _Y_TABLES.astype(np.float32)
_VALUES32 = np.arange(256, dtype=np.float32)


def _normalised_weight(y: np.ndarray) -> np.ndarray:
    """float32 relative luminance Y of input pixels -> weight of the normalised colour:
    0 at and above GLASS_LUMINOSITY (L*/100), 1 at and below it minus BLEND_LUMINOSITY."""
    f = np.where(y > np.float32(0.008856), np.cbrt(y),
                 np.float32(7.787) * y + np.float32(16.0 / 116.0))
    lum = (np.float32(116.0) * f - np.float32(16.0)) * np.float32(0.01)
    w = (np.float32(GLASS_LUMINOSITY) - lum) * np.float32(1.0 / BLEND_LUMINOSITY)
    return np.clip(w, np.float32(0.0), np.float32(1.0)).astype(np.float32, copy=False)


def _recompose(c0: np.ndarray, c1: np.ndarray, recomp: np.ndarray, ch: int,
               weight: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Channel ch of the output for concentrations c0, c1 >= 0 (float32), blended with the
    input channel values `original` (float32) by `weight` (of the normalised colour) -> uint8."""
    od = c0 * recomp[0, ch]
    od += c1 * recomp[1, ch]
    np.maximum(od, np.float32(0.0), out=od)  # only a hand-made reference could go below 0
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= np.float32(255.0)
    # weight * normalised + (1 - weight) * original: exact at weight 0 and 1
    od *= weight
    od += (np.float32(1.0) - weight) * original
    np.rint(od, out=od)
    return od.astype(np.uint8)


def normalise_direct(rgb: np.ndarray, source: StainFit, target: StainFit) -> np.ndarray:
    """Closed-form normalisation without a table: (..., 3) uint8 -> (..., 3) uint8.

    Same float32 arithmetic as `build_lut`, so it equals `normalise(rgb, build_lut(...))`;
    use it for a few pixels, or to check the table.
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    proj, gram, recomp = _closed_form_parts(source, target)
    r, gr, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    bk = []
    for k in range(2):
        x = proj[k, 0][r] + proj[k, 1][gr]  # same association order as build_lut
        x += proj[k, 2][b]
        bk.append(x)
    c0, c1 = _two_stain_lasso(bk[0], bk[1], gram)
    y = _Y_TABLES32[0][r] + _Y_TABLES32[1][gr]
    y += _Y_TABLES32[2][b]
    weight = _normalised_weight(y)
    out = np.empty(rgb.shape, np.uint8)
    for ch in range(3):
        out[..., ch] = _recompose(c0, c1, recomp, ch, weight, _VALUES32[rgb[..., ch]])
    return out


def build_lut(source: StainFit, target: StainFit, *, threads: int | None = None) -> np.ndarray:
    """Tabulate the closed form for all 256^3 colours.

    Returns (2**24,) uint32: entry R | G << 8 | B << 16 holds the output R | G << 8 | B << 16
    (little-endian bytes R, G, B, 0). Built in 256 slices of fixed B on `threads` threads
    (default: the CPU count, at most 8); about 0.3 s on 2 cores.
    """
    threads = threads or min(8, os.cpu_count() or 1)
    proj, gram, recomp = _closed_form_parts(source, target)
    # (G, R) grids of the R + G part of b_k and of the luminance, shared by every B slice
    rg = [proj[k, 0][None, :] + proj[k, 1][:, None] for k in range(2)]
    y_rg = _Y_TABLES32[0][None, :] + _Y_TABLES32[1][:, None]
    red = np.broadcast_to(_VALUES32[None, :], (256, 256)).ravel()
    green = np.broadcast_to(_VALUES32[:, None], (256, 256)).ravel()
    lut = np.empty((256, 256 * 256), np.uint32)

    def fill(b_values: range) -> None:
        for b in b_values:
            b0, b1 = ((rg[k] + proj[k, 2][b]).ravel() for k in range(2))
            c0, c1 = _two_stain_lasso(b0, b1, gram)
            weight = _normalised_weight((y_rg + _Y_TABLES32[2][b]).ravel())
            blue = np.full(256 * 256, _VALUES32[b], np.float32)
            row = lut[b]
            row[:] = _recompose(c0, c1, recomp, 0, weight, red)
            row |= _recompose(c0, c1, recomp, 1, weight, green).astype(np.uint32) << 8
            row |= _recompose(c0, c1, recomp, 2, weight, blue).astype(np.uint32) << 16

    if threads <= 1:
        fill(range(256))
    else:  # numpy releases the GIL in these ufuncs
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fill, [range(i, 256, threads) for i in range(threads)]))
    return lut.reshape(-1)


# --------------------------------------------------------------------------- applying


_CHUNK = 32_768  # pixels per step: keeps the index and gather buffers in L2 cache


def _kernel_module():
    """`wsi_pipeline.stain_kernel`, imported on first use (it imports numba, ~0.3 s)."""
    from wsi_pipeline import stain_kernel

    return stain_kernel


def _use_numba(kernel: Kernel) -> bool:
    """Whether `normalise` runs the compiled gather for this `kernel` argument."""
    if kernel == "numpy":
        return False
    if kernel not in ("auto", "numba"):
        raise UsageError(f"unknown stain kernel {kernel!r}; use auto, numpy or numba")
    if kernel == "numba" and not _kernel_module().AVAILABLE:
        raise WsiError("the numba stain kernel needs the optional extra: "
                       "pip install wsi_pipeline[fast]")
    return _kernel_module().AVAILABLE


def normalise(tile: np.ndarray, lut: np.ndarray, *, out: np.ndarray | None = None,
              kernel: Kernel = "auto") -> np.ndarray:
    """Apply a LUT from `build_lut`: (..., 3) uint8 -> (..., 3) uint8 (e.g. (H, W, 3)).

    out: optional C-contiguous uint8 array of the same shape to write into.
    kernel: "numba" gathers in one compiled pass (`stain_kernel`, the `fast` extra; 1.6-2.5x
    faster on real tiles), "numpy" in the numpy passes below, "auto" (default) with numba
    when it is installed. The outputs are the same bytes (tests/test_stain_kernel.py).

    Why the plain R | G << 8 | B << 16 layout and one uint32 gather (benchmarks/bench_stain.py
    section 1b, real slide tiles): the index then costs a single masked read of each pixel's
    own bytes, and the three passes (index, gather, strided store) are the cost floor, even
    with the table hot. A Morton (Z-order) layout touches about as many 64-byte table lines
    per tile (tissue colours are sparse: ~2.5 per line in either order) and its index alone
    costs three small gathers, more than the whole lookup; planar uint8 tables need three
    gathers; a coarser 7-bit table is inexact and saves little. Per-tile unique colours run
    to ~200k of 262k pixels, so a colour cache does not pay either.
    """
    tile = np.ascontiguousarray(tile, dtype=np.uint8)
    if tile.shape[-1:] != (3,):
        raise ValueError(f"expected (..., 3) RGB, got shape {tile.shape}")
    if lut.shape != (LUT_SIZE,) or lut.dtype != np.uint32:
        raise ValueError("lut must be the (2**24,) uint32 array from build_lut")
    if out is None:
        out = np.empty(tile.shape, np.uint8)
    elif out.shape != tile.shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous uint8 array shaped like tile")
    use_numba = _use_numba(kernel)
    n = tile.size // 3
    if n == 0:
        return out
    src, dst = tile.reshape(-1), out.reshape(-1)
    if use_numba and _kernel_module().gather(src, lut, dst):
        return out
    index, gathered = np.empty(_CHUNK, np.intp), np.empty(_CHUNK, np.uint32)

    # Each pixel is read and written as one little-endian uint32 at a 3-byte stride: the
    # read picks up the next pixel's R as its top byte (masked off); the write spills a 0
    # into the next pixel's R, which that pixel's own write (next, in order) overwrites.
    # The last pixel has no next pixel inside the buffer, so it is done on its own.
    for start in range(0, n - 1, _CHUNK):
        m = min(_CHUNK, n - 1 - start)
        words = np.ndarray((m,), np.uint32, buffer=src, offset=3 * start, strides=(3,))
        np.bitwise_and(words, 0xFFFFFF, out=index[:m])
        np.take(lut, index[:m], out=gathered[:m], mode="wrap")  # indices < 2**24 already
        slots = np.ndarray((m,), np.uint32, buffer=dst, offset=3 * start, strides=(3,))
        slots[...] = gathered[:m]
    r, g, b = (int(v) for v in src[-3:])
    dst[-3:] = np.frombuffer(lut[r | g << 8 | b << 16].tobytes()[:3], np.uint8)
    return out


def lut_to_torch(lut: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """The uint32 LUT as a (2**24,) int32 tensor on `device` (same bits; torch lacks uint32)."""
    import torch

    words = np.ascontiguousarray(lut).view(np.int32)
    return torch.from_numpy(words).to(device)


def normalise_torch(batch: torch.Tensor, lut_t: torch.Tensor) -> torch.Tensor:
    """Apply a LUT on `lut_t`'s device: (B, H, W, 3) uint8 -> (B, H, W, 3) uint8 (any (..., 3)).

    lut_t: from `lut_to_torch`. The batch is moved to the LUT's device if needed.
    """
    import torch
    import torch.nn.functional as F

    if batch.dtype != torch.uint8 or batch.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) uint8, got {batch.dtype} {tuple(batch.shape)}")
    batch = batch.to(lut_t.device, non_blocking=True)
    # RGB + a zero byte viewed as one little-endian int32 is the index R | G << 8 | B << 16.
    index = F.pad(batch, (0, 1)).contiguous().view(torch.int32).reshape(-1)
    gathered = torch.index_select(lut_t, 0, index)
    return gathered.view(torch.uint8).reshape(*batch.shape[:-1], 4)[..., :3].contiguous()


# --------------------------------------------------------------------------- staintools


def _import_staintools():
    try:
        import staintools
    except ImportError as err:
        raise WsiError(
            "the staintools backend needs the optional extra: pip install wsi_pipeline[staintools]"
            f" ({err})"
        ) from None
    return staintools


def staintools_stain_matrix(rgb: np.ndarray, *, max_luminosity: float = 0.8) -> np.ndarray:
    """staintools' own Vahadane stain matrix of an image: (H, W, 3) uint8 -> (2, 3) float.

    For comparison with `fit_vahadane` on the same pixels (needs the staintools extra).
    """
    staintools = _import_staintools()
    image = np.array(rgb, dtype=np.uint8, copy=True)  # staintools edits its input in place
    if image.ndim == 2:
        image = image[None]
    return staintools.VahadaneStainExtractor.get_stain_matrix(
        image, luminosity_threshold=max_luminosity
    )


# --------------------------------------------------------------------------- normaliser


class Normaliser:
    """Normalises tiles of one slide to one reference stain. Build with `make_normaliser`.

    Call it on a (H, W, 3) or (B, H, W, 3) uint8 numpy array (returns numpy) or, with the
    torch backend, also on a uint8 tensor (returns a tensor on `device`). `kernel` is
    `normalise`'s, for the numpy backend.
    """

    def __init__(
        self,
        source: StainFit | None,
        target: StainFit | None,
        backend: Backend = "numpy",
        device: str = "cpu",
        *,
        staintools_normaliser: Any = None,
        kernel: Kernel = "auto",
    ) -> None:
        self.source, self.target = source, target
        self.backend, self.device, self.kernel = backend, device, kernel
        self._staintools = staintools_normaliser
        self.lut = build_lut(source, target) if backend in ("numpy", "torch") else None
        self.lut_t = lut_to_torch(self.lut, device) if backend == "torch" else None

    def __call__(self, tiles: Any) -> Any:
        if self.backend == "numpy":
            return normalise(np.asarray(tiles), self.lut, kernel=self.kernel)
        if self.backend == "torch":
            import torch

            if isinstance(tiles, torch.Tensor):
                return normalise_torch(tiles, self.lut_t)
            array = np.asarray(tiles)
            if not array.flags.writeable:  # torch.from_numpy wants writable memory
                array = array.copy()
            return normalise_torch(torch.from_numpy(array), self.lut_t).cpu().numpy()
        return self._staintools_transform(np.asarray(tiles))

    def _staintools_transform(self, tiles: np.ndarray) -> np.ndarray:
        if tiles.ndim == 4:
            return np.stack([self._staintools_transform(t) for t in tiles])
        try:
            # staintools refits the tile's own stains here (its per-tile Vahadane)
            return self._staintools.transform(tiles.copy())
        except Exception as err:  # staintools raises its own TissueMaskException on glass
            if type(err).__name__ == "TissueMaskException":
                return tiles.copy()
            raise

    def __repr__(self) -> str:
        return f"Normaliser(backend={self.backend!r}, device={self.device!r})"


def make_normaliser(
    source_fit: StainFit | None,
    reference: str | StainFit | np.ndarray,
    backend: Backend = "numpy",
    device: str = "cpu",
    *,
    kernel: Kernel = "auto",
) -> Normaliser:
    """A callable that normalises tiles fitted by `source_fit` to `reference`.

    reference: a name in REFERENCES ("he", "pas"), a StainFit, or a reference RGB image
    (H, W, 3) uint8 (fitted here). backend "numpy" or "torch" (on `device`, e.g. "cuda")
    use the cached LUT; "staintools" runs staintools' StainNormalizer('vahadane'), which
    refits every tile and ignores `source_fit` (a slow reference; optional extra).
    kernel: the numpy backend's gather, "auto" (numba when installed), "numpy" or "numba";
    see `normalise` (same output bytes either way).
    """
    if backend not in ("numpy", "torch", "staintools"):
        raise UsageError(f"unknown stain backend {backend!r}; use numpy, torch or staintools")
    _use_numba(kernel)  # an unknown kernel, or numba asked for but absent: fail now
    if backend == "staintools":
        staintools = _import_staintools()
        st = staintools.StainNormalizer("vahadane")
        if isinstance(reference, np.ndarray):
            st.fit(np.array(reference, dtype=np.uint8, copy=True))
        else:  # transform() only needs the target's stain matrix and max concentrations
            ref = resolve_reference(reference)
            st.stain_matrix_target = ref.matrix.astype(np.float64)
            st.maxC_target = ref.max_conc.astype(np.float64).reshape(1, 2)
        return Normaliser(source_fit, None, "staintools", "cpu", staintools_normaliser=st)
    if source_fit is None:
        raise UsageError("the numpy and torch stain backends need the slide's StainFit")
    target = fit_vahadane(reference) if isinstance(reference, np.ndarray) else (
        resolve_reference(reference))
    return Normaliser(source_fit, target, backend, device, kernel=kernel)
