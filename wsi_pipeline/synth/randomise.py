"""Domain-randomised synthesis: ``write_slide(..., randomise=True)``, ``wsi-synth --randomise``.

Per slide, deterministic from the slide seed but drawn from a random stream of its own
(so a default slide, and every random draw it makes, stays exactly as it was):

- stains: each stain vector turned by a random rotation drawn around the real reference
  (`stain.REFERENCES`, H&E or PAS by the task's stain), concentration scales, glass tint,
  tissue grain; `STAIN_SPREAD` gives the ranges and where they come from;
- section: smooth thickness variation (both stains) and uneven uptake (per stain);
- nuclei: size, elongation, staining density and chromatin grain (`scene.NuclearVariation`);
- artefacts: tissue folds (doubled absorbance bands), air bubbles (dark rims, slight
  darkening), debris (small dark specks), marking dye along tissue edges;
- scanner (`scanner.ScannerModel`, applied after rendering): focus blur in patches,
  illumination gradient, scanner fields with gain steps (stitching seams), white balance,
  sensor noise, JPEG quality.

Artefacts change pixels only: the label mask and the truth counts are those of the slide
without them. The truth JSON records every draw under ``generator.randomise``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import scene as sc
from .common import coarse_step, window
from .scanner import ScannerModel

RANDOM_STREAM = 0x52414E44  # the randomisation's own stream key (with the slide seed)

# Stain spreads, measured with stain.fit_vahadane (seed 0, defaults) on the real images
# in ../shared/data:
# - H&E, 20 fits (CMU-1-Small-Region in 4 quadrants; the 12 TCGA slides of MoNuSAC, each
#   slide's regions pooled; the 4 stain/ reference images): rms angle of a slide's vector
#   to their mean 5.1 deg (haematoxylin) and 8.2 deg (eosin); sd of log 99th-percentile
#   concentration 0.19 and 0.33. For comparison, the published H&E vectors of Ruifrok &
#   Johnston (2001) and of Macenko et al. (2009) differ by ~25 deg for eosin, as the two
#   torchstain images here do from the reference.
# - PAS, 14 fits (the AIDPATH kidney tiles): 1.3 and 1.7 deg; log sd 0.07 and 0.16. These
#   come from one lab and understate other labs' spread; no between-lab figure was at hand.
# Angles and log-scales are drawn normal with these sd and cut at 2.5 sd.
# conc_centre, two measured candidates: (a) the scale that brings the mean tissue OD of
# randomised slides to that of the real tiles of bench_realism (128 px, >= 50% tissue;
# H&E 0.53, 1.09, 0.64 and PAS 0.30, 0.56, 0.29 in R, G, B), solved in the renderer's
# own stain vectors from slides rendered at scale 1 (fls and liver, kidney-layer and
# mesangial; seeds 1-4, 2048 px): H&E 1.9, 0.74, PAS 1.32, 0.69; (b) the real images'
# median 99th-percentile concentration (fitted as above, relative to the reference: H&E
# 1.45, 1.81; PAS 1.04, 0.93) over that of default synthetic slides fitted alike (H&E
# 1.14, 1.24; PAS 1.02, 1.00): H&E 1.28, 1.45, PAS 1.02, 0.93. They disagree because real
# and synthetic tissues differ in make-up; each stain uses the one whose slides came out
# nearer the real tiles in bench_realism (pooled Frechet, seeds 1-3, with a wider glass
# tint than now: H&E 8.3 (a) vs 20.1 (b); PAS 35.5 (a) vs 29.0 (b)). That benchmark uses
# the same real images, so its distances are optimistic.
STAIN_SPREAD = {
    "he": {"angle_deg": (5.1, 8.2), "log_conc_sd": (0.19, 0.33), "conc_centre": (1.9, 0.74)},
    "pas": {"angle_deg": (1.3, 1.7), "log_conc_sd": (0.07, 0.16), "conc_centre": (1.02, 0.93)},
}
TRUNCATE_SD = 2.5

# Tissue-marking dye colours (OD per R, G, B channel at full coverage)
DYES = {
    "blue": np.array([1.2, 0.6, 0.15], np.float32),
    "green": np.array([1.1, 0.3, 0.85], np.float32),
    "black": np.array([1.4, 1.35, 1.3], np.float32),
    "red": np.array([0.15, 1.1, 0.9], np.float32),
    "yellow": np.array([0.05, 0.3, 1.1], np.float32),
}
BUBBLE_OD = np.array([1.0, 1.0, 0.95], np.float32)


def _truncated_normal(rng: np.random.Generator, sd, size=None):
    return np.clip(rng.normal(0.0, 1.0, size), -TRUNCATE_SD, TRUNCATE_SD) * np.asarray(sd)


def turn(v: np.ndarray, angle_rad: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vector `v` turned by `angle_rad` towards a random perpendicular direction."""
    v = v / np.linalg.norm(v)
    t = rng.normal(size=3)
    t -= t.dot(v) * v
    t /= np.linalg.norm(t)
    return np.cos(angle_rad) * v + np.sin(angle_rad) * t


def rotation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, 3) rotation taking the direction of `a` to that of `b` (about a x b)."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    k = np.cross(a, b)
    s, c = np.linalg.norm(k), float(np.dot(a, b))
    if s < 1e-12:
        return np.eye(3)
    k = k / s
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + s * K + (1 - c) * K @ K


def stain_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) between two OD vectors."""
    c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


BASE_VECTORS = {"he": sc.HE_VECTORS, "pas": sc.PAS_VECTORS}


def draw_stains(rng: np.random.Generator, kind: str, names: tuple[str, str]):
    """(StainModel, record) of a randomised slide of stain `kind` ('he' or 'pas').

    A target vector per stain is drawn around the real reference (`stain.REFERENCES`);
    the renderer's own base vector (`scene.HE_VECTORS`, `PAS_VECTORS`) is turned by the
    same rotation. (A fitted reference lies inside the pure-stain directions, since
    fitting mixes the stains of real pixels; the base vectors reproduce the real pixel
    colours, so they are turned rather than replaced.)
    """
    from ..stain import REFERENCES

    spread = STAIN_SPREAD[kind]
    ref = np.asarray(REFERENCES[kind].matrix, np.float64)
    base = np.asarray(BASE_VECTORS[kind], np.float64)
    rows, targets, angles = [], [], []
    for k in range(2):
        a = abs(float(_truncated_normal(rng, 1.0))) * np.radians(spread["angle_deg"][k])
        t = turn(ref[k], a, rng)
        v = np.clip(rotation(ref[k], t) @ (base[k] / np.linalg.norm(base[k])), 0.02, None)
        rows.append(v / np.linalg.norm(v))
        targets.append(t)
        angles.append(stain_angle_deg(t, ref[k]))
    scale = np.asarray(spread["conc_centre"]) * np.exp(
        _truncated_normal(rng, spread["log_conc_sd"], 2))
    # glass tint: CMU-1's glass is OD 0.040, 0.047, 0.048 and the PAS tiles' ~0.048, 0.052,
    # 0.048 (R, G, B); scanners white-balance on glass, so slides differ by a few 0.001
    glass = np.clip(np.array([0.040, 0.047, 0.046]) + rng.normal(0, 0.004, 3), 0.01, 0.09)
    stains = sc.StainModel(names=names, matrix=np.array(rows, np.float32),
                           glass_od=glass.astype(np.float32),
                           noise_od=float(rng.uniform(0.012, 0.03)),
                           intensity=scale.astype(np.float32))
    record = {"stain": kind, "reference": [[round(float(x), 4) for x in r] for r in ref],
              "target": [[round(float(x), 4) for x in r] for r in targets],
              "angle_to_reference_deg": [round(a, 2) for a in angles],
              "concentration_scale": [round(float(x), 4) for x in scale],
              "tissue_grain_od": round(stains.noise_od, 4)}
    return stains, record


# ----------------------------------------------------------------------------- artefacts


@dataclass(frozen=True)
class Bubble:
    """An air bubble under the coverslip: circle (um) with a dark rim of `rim_um`."""

    x_um: float
    y_um: float
    r_um: float
    rim_um: float
    rim_od: float
    inner_od: float

    @property
    def bbox(self):
        r = self.r_um + 2
        return (self.x_um - r, self.y_um - r, self.x_um + r, self.y_um + r)

    def alpha(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        d = np.hypot(X - self.x_um, Y - self.y_um) - self.r_um  # < 0 inside
        rim = sc.smoothstep(-self.rim_um, 0.0, d) * sc.smoothstep(1.0, -0.5, d)
        inner = sc.smoothstep(0.5, -0.5, d)
        return (self.rim_od * rim + self.inner_od * inner).astype(np.float32)


@dataclass(frozen=True)
class DyePatch:
    """Marking dye painted over a tissue edge near (x, y), within about `r_um`."""

    x_um: float
    y_um: float
    r_um: float
    depth_um: float  # how far into the tissue it soaks
    bleed_um: float  # how far onto the glass it runs
    colour: str
    strength: float

    @property
    def bbox(self):
        r = self.r_um * 1.3
        return (self.x_um - r, self.y_um - r, self.x_um + r, self.y_um + r)

    def coverage(self, seed: int, X, Y, tissue_um: np.ndarray) -> np.ndarray:
        n = sc.value_noise(seed, X, Y, 40.0)
        dist = np.hypot(X - self.x_um, Y - self.y_um) + 0.25 * self.r_um * sc.value_noise(
            seed + 1, X, Y, 150.0)
        region = sc.smoothstep(self.r_um, 0.7 * self.r_um, dist)
        band = sc.smoothstep(-self.bleed_um, 0.0, tissue_um) * sc.smoothstep(
            self.depth_um * (1 + 0.4 * n), 0.3 * self.depth_um, tissue_um)
        return (region * band * (0.65 + 0.35 * n) * self.strength).astype(np.float32)


@dataclass(frozen=True)
class Debris:
    """Specks of debris: centres (um), semi-axes (um), angles; one OD colour per slide."""

    x_um: np.ndarray
    y_um: np.ndarray
    a_um: np.ndarray
    b_um: np.ndarray
    angle: np.ndarray
    od: np.ndarray  # (N,) strength
    colour_od: np.ndarray  # (3,)


# ----------------------------------------------------------------------------- the draw


@dataclass
class Randomisation:
    """Everything randomised about one slide (see the module docstring)."""

    seed: int
    stains: sc.StainModel
    stain_record: dict
    thickness_amp: float
    thickness_scale_um: float
    uptake_amp: tuple[float, float]
    uptake_scale_um: float
    granularity: float
    nuclei: sc.NuclearVariation
    folds: list = field(default_factory=list)
    bubbles: list = field(default_factory=list)
    debris: Debris | None = None
    dyes: list = field(default_factory=list)
    scanner: ScannerModel | None = None

    # ------------------------------------------------------------------ per tile

    def nuclei_at(self, x0_px: int, y0_px: int) -> sc.NuclearVariation:
        """The nuclear variation for painting the tile at (x0_px, y0_px)."""
        return replace(self.nuclei, origin_px=(int(x0_px), int(y0_px)))

    def section_factors(self, mpp: float, x0_px: int, y0_px: int, size: int):
        """(haematoxylin, second stain) multipliers (size, size): section thickness, uneven
        uptake, fine granularity (~1 um) and folds."""
        x0, y0 = x0_px * mpp, y0_px * mpp
        F = sc.coarse_fields(
            lambda gx, gy: {"t": sc.value_noise(self.seed + 11, gx, gy,
                                                self.thickness_scale_um)},
            x0, y0, mpp, size, coarse_step(mpp, size, 16.0))
        thick = 1 + np.float32(self.thickness_amp) * F["t"]
        if self.granularity > 0:
            thick = thick * (1 + np.float32(self.granularity) * sc.tile_noise(
                self.seed + 14, x0_px, y0_px, size, sc.pow2_cell(1.0, mpp, size)))
        cell = sc.pow2_cell(self.uptake_scale_um, mpp, size)
        fh = thick * (1 + np.float32(self.uptake_amp[0]) * sc.tile_noise(
            self.seed + 12, x0_px, y0_px, size, cell))
        f2 = thick * (1 + np.float32(self.uptake_amp[1]) * sc.tile_noise(
            self.seed + 13, x0_px, y0_px, size, cell))
        for fold in self.folds:
            if window(fold.bbox, x0, y0, mpp, size) is None:
                continue
            G = sc.coarse_fields(fold.fields, x0, y0, mpp, size, coarse_step(mpp, size, 8.0))
            t = fold.thickness_from(G["edge"])
            fh = fh * t
            f2 = f2 * t
        return fh.astype(np.float32), f2.astype(np.float32)

    def extra_od(self, mpp: float, x0_px: int, y0_px: int, size: int,
                 tissue_um: np.ndarray | None) -> list:
        """Bubbles, debris and marking dye on a tile as (alpha, OD (3,)) absorbers.

        tissue_um: the tile's signed distance to the tissue edge (um, > 0 inside), or None
        where the tile touches no tissue piece (no dye there).
        """
        x0, y0 = x0_px * mpp, y0_px * mpp
        x1, y1 = x0 + size * mpp, y0 + size * mpp
        X = ((x0_px + np.arange(size, dtype=np.float64) + 0.5) * mpp).astype(np.float32)
        Y = ((y0_px + np.arange(size, dtype=np.float64) + 0.5) * mpp).astype(np.float32)
        X, Y = X[None, :], Y[:, None]
        out = []
        bub = np.zeros((size, size), np.float32)
        for b in self.bubbles:
            win = window(b.bbox, x0, y0, mpp, size)
            if win is not None:
                rs, cs = win
                bub[rs, cs] += b.alpha(X[:, cs], Y[rs, :])
        if bub.any():
            out.append((bub, BUBBLE_OD))
        d = self.debris
        if d is not None and len(d.x_um):
            r = np.maximum(d.a_um, d.b_um)
            ids = np.nonzero((d.x_um + r > x0) & (d.x_um - r < x1)
                             & (d.y_um + r > y0) & (d.y_um - r < y1))[0]
            if len(ids):
                alpha = np.zeros((size, size), np.float32)
                sc.stamp_ellipses(alpha, (d.x_um[ids] - x0) / mpp, (d.y_um[ids] - y0) / mpp,
                                  d.a_um[ids] / mpp, d.b_um[ids] / mpp, d.angle[ids],
                                  d.od[ids])
                out.append((alpha, d.colour_od))
        if tissue_um is not None:
            for k, dye in enumerate(self.dyes):
                win = window(dye.bbox, x0, y0, mpp, size)
                if win is None:
                    continue
                rs, cs = win
                cov = np.zeros((size, size), np.float32)
                cov[rs, cs] = dye.coverage(self.seed + 20 + 2 * k, X[:, cs], Y[rs, :],
                                           tissue_um[rs, cs])
                if cov.any():
                    out.append((cov, DYES[dye.colour]))
        return out

    # ------------------------------------------------------------------ truth

    def record(self) -> dict:
        """What was randomised, with which parameters (JSON-able)."""
        r2 = [round(float(v), 4) for v in self.uptake_amp]
        nuc = self.nuclei
        arts = {
            "folds": [{"polyline_um": np.round(f.pts, 1).tolist(),
                       "width_um": round(f.width_um, 1)} for f in self.folds],
            "bubbles": [{"centre_um": [round(b.x_um, 1), round(b.y_um, 1)],
                         "radius_um": round(b.r_um, 1), "rim_um": round(b.rim_um, 2),
                         "rim_od": round(b.rim_od, 3), "inner_od": round(b.inner_od, 3)}
                        for b in self.bubbles],
            "debris": {"count": 0 if self.debris is None else int(len(self.debris.x_um)),
                       "colour_od": (None if self.debris is None else
                                     [round(float(v), 3) for v in self.debris.colour_od])},
            "marking_dye": [{"centre_um": [round(d.x_um, 1), round(d.y_um, 1)],
                             "radius_um": round(d.r_um, 1), "colour": d.colour,
                             "depth_um": round(d.depth_um, 1), "bleed_um": round(d.bleed_um, 1),
                             "strength": round(d.strength, 3)} for d in self.dyes],
        }
        return {
            "stains": self.stain_record,
            "section": {"thickness_amp": round(self.thickness_amp, 4),
                        "thickness_scale_um": round(self.thickness_scale_um, 1),
                        "uptake_amp": r2, "uptake_scale_um": round(self.uptake_scale_um, 1),
                        "granularity": round(self.granularity, 4)},
            "nuclei": {"size": round(nuc.size, 4), "size_sd": round(nuc.size_sd, 4),
                       "elongation": round(nuc.elongation, 4),
                       "chromatin": round(nuc.chromatin, 4),
                       "density_sd": round(nuc.density_sd, 4)},
            "artefacts": arts,
            "scanner": self.scanner.record() if self.scanner is not None else None,
            "note": "artefacts change pixels only; labels and counts are those without them",
        }


def stain_kind(scene) -> str:
    """'pas' for a PAS scene, else 'he'."""
    return "pas" if scene.stains.names[1].lower() == "pas" else "he"


def tissue_map(spec, scene, step_um: float | None = None):
    """Coarse tissue mask of a slide from its labels: (mask (ny, nx) bool, step_um)."""
    w_um, h_um = scene.width_px * scene.mpp, scene.height_px * scene.mpp
    step = float(step_um or max(8.0, np.sqrt(w_um * h_um / 250_000.0)))
    nx, ny = int(np.ceil(w_um / step)), int(np.ceil(h_um / step))
    lab = np.zeros((ny, nx), np.uint8)
    chunk = 256
    for y in range(0, ny, chunk):
        for x in range(0, nx, chunk):
            t = spec.label_tile(scene, x * step, y * step, step, chunk)
            lab[y:y + chunk, x:x + chunk] = t[:min(chunk, ny - y), :min(chunk, nx - x)]
    classes = spec.tissue_classes or tuple(k for k in spec.legend if k)
    return np.isin(lab, classes), step


def _points(mask: np.ndarray, step: float):
    """(interior, edge) cell centres (um) of a coarse tissue mask: (N, 2) arrays."""
    if not mask.any():
        z = np.zeros((0, 2))
        return z, z
    p = np.pad(mask, 1)
    nb = [p[1:-1, :-2], p[1:-1, 2:], p[:-2, 1:-1], p[2:, 1:-1]]
    inner = mask & np.logical_and.reduce(nb)
    edge = mask & ~inner

    def centres(m):
        j, i = np.nonzero(m)
        return np.stack([(i + 0.5) * step, (j + 0.5) * step], 1)

    return centres(inner), centres(edge)


def draw(spec, scene) -> Randomisation:
    """The randomisation of `scene` (a built task scene), from its seed alone."""
    rng = np.random.default_rng([int(scene.seed), RANDOM_STREAM])
    kind = stain_kind(scene)
    stains, stain_record = draw_stains(rng, kind, tuple(scene.stains.names))
    seed = int(sc.tile_seed(scene.seed, RANDOM_STREAM))
    W, H = scene.width_px * scene.mpp, scene.height_px * scene.mpp
    area_mm2 = W * H / 1e6
    # section thickness: microtomes cut within about 10% of the set thickness; uptake
    # varies a little more locally
    thickness_amp = float(rng.uniform(0.03, 0.12))
    thickness_scale = float(rng.uniform(250, 900))
    uptake = (float(rng.uniform(0.02, 0.12)), float(rng.uniform(0.02, 0.12)))
    uptake_scale = float(rng.uniform(30, 120))
    granularity = float(rng.uniform(0.0, 0.25))  # fine texture of fibres and granules
    nuclei = sc.NuclearVariation(
        seed=seed + 5, size=float(rng.uniform(0.9, 1.15)), size_sd=float(rng.uniform(0.03, 0.12)),
        elongation=float(rng.uniform(0.0, 0.35)), chromatin=float(rng.uniform(0.0, 0.3)),
        density_sd=float(rng.uniform(0.02, 0.1)))

    mask, step = tissue_map(spec, scene)
    inner, edge = _points(mask, step)
    if not len(inner):
        inner = edge
    folds = []
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        if not len(inner):
            break
        c = inner[rng.integers(len(inner))] + rng.uniform(-0.5, 0.5, 2) * step
        ang = rng.uniform(0, np.pi)
        half = rng.uniform(150, 700)
        d = np.array([np.cos(ang), np.sin(ang)]) * half
        folds.append(sc.Fold(sc.smooth_path(rng, c - d, c + d, 6, 0.06),
                             float(rng.uniform(25, 140))))
    bubbles = []
    for _ in range(int(rng.choice([0, 0, 0, 1, 1, 2]))):
        if len(inner) and rng.random() < 0.7:
            cx, cy = inner[rng.integers(len(inner))]
        else:
            cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        bubbles.append(Bubble(float(cx), float(cy), float(np.exp(rng.uniform(np.log(60),
                                                                               np.log(500)))),
                              float(rng.uniform(3, 10)), float(rng.uniform(0.3, 0.9)),
                              float(rng.uniform(0.01, 0.05))))
    n = int(rng.poisson(area_mm2 * rng.uniform(1, 15)))
    r = np.exp(rng.uniform(np.log(0.8), np.log(8), n))
    aspect = rng.uniform(1, 3, n)
    near = rng.random(n) < 0.5
    pts = np.stack([rng.uniform(0, W, n), rng.uniform(0, H, n)], 1)
    if len(edge):
        pts[near] = edge[rng.integers(len(edge), size=int(near.sum()))] \
            + rng.normal(0, 40, (int(near.sum()), 2))
    tone = rng.uniform(0, 1)  # grey to brown
    debris = Debris(pts[:, 0].astype(np.float32), pts[:, 1].astype(np.float32),
                    (r * np.sqrt(aspect)).astype(np.float32),
                    (r / np.sqrt(aspect)).astype(np.float32),
                    rng.uniform(0, np.pi, n).astype(np.float32),
                    rng.uniform(0.5, 1.8, n).astype(np.float32),
                    np.array([1.0, 1.0 + 0.2 * tone, 1.05 + 0.45 * tone], np.float32))
    dyes = []
    if len(edge) and rng.random() < 0.5:
        colour = str(rng.choice(list(DYES)))
        for _ in range(int(rng.integers(1, 3))):
            cx, cy = edge[rng.integers(len(edge))]
            dyes.append(DyePatch(float(cx), float(cy), float(rng.uniform(150, 700)),
                                 float(rng.uniform(15, 60)), float(rng.uniform(3, 20)), colour,
                                 float(rng.uniform(0.5, 1.2))))
    scanner = draw_scanner(rng, seed + 7, scene)
    return Randomisation(seed=seed, stains=stains, stain_record=stain_record,
                         thickness_amp=thickness_amp, thickness_scale_um=thickness_scale,
                         uptake_amp=uptake, uptake_scale_um=uptake_scale,
                         granularity=granularity, nuclei=nuclei,
                         folds=folds, bubbles=bubbles, debris=debris, dyes=dyes,
                         scanner=scanner)


def draw_scanner(rng: np.random.Generator, seed: int, scene) -> ScannerModel:
    """A slide's scanner.

    Blur: a 20x/0.75 NA objective's Airy core is ~0.16 um sigma at 550 nm; the rendered
    pixels are already soft-edged, so the in-focus sigma added is 0.1-0.35 um (MTF50 of
    0.5-0.27 cycles/px at 0.5 um/px); out-of-focus patches add 0.3-1.5 um. Fields: Aperio
    scans line-scan stripes (CMU-1-Small-Region records StripeWidth = 2040 px, ~1 mm at
    20x), tile scanners square fields of ~0.4-1 mm; a field's gain steps by ~0.3-1.5%.
    JPEG quality: Aperio writes 70 by default, and 30 is met (CMU-1); others write up to
    ~95.
    """
    stripes = rng.random() < 0.5
    fw = float(rng.uniform(700, 1100) if stripes else rng.uniform(400, 1000))
    fh = 0.0 if stripes else fw * float(rng.uniform(0.75, 1.0))
    ang = rng.uniform(0, 2 * np.pi)
    g = float(rng.uniform(0.0, 0.015))  # gain change per mm
    return ScannerModel(
        seed=seed, mpp=float(scene.mpp), width_px=int(scene.width_px),
        height_px=int(scene.height_px),
        blur_base_um=float(rng.uniform(0.1, 0.35)),
        blur_extra_um=float(rng.uniform(0.3, 1.5)),
        blur_scale_um=float(rng.uniform(250, 900)),
        blur_threshold=float(rng.uniform(0.2, 0.8)),
        gradient_per_mm=(g * float(np.cos(ang)), g * float(np.sin(ang))),
        shading_amp=float(rng.uniform(0.0, 0.02)),
        shading_scale_um=float(rng.uniform(800, 3000)),
        field_um=(fw, fh), field_offset_um=(float(rng.uniform(0, fw)),
                                            float(rng.uniform(0, fh or 1.0))),
        field_gain_sd=float(rng.uniform(0.003, 0.015)),
        field_vignette=float(rng.uniform(0.0, 0.03)),
        white_balance=tuple(float(v) for v in 1 + rng.normal(0, 0.006, 3)),
        read_noise_dn=float(rng.uniform(0.5, 2.5)),
        shot_noise=float(rng.uniform(0.0, 0.03)),
        jpeg_quality=int(rng.integers(30, 96)),
    )


def attach(spec, scene):
    """Randomise `scene` in place (its stains and `randomise`) and return it."""
    r = draw(spec, scene)
    scene.stains = r.stains
    scene.randomise = r
    return scene
