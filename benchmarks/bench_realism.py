"""Realism of synthetic slides: a Fréchet distance between synthetic and real tile features.

    python benchmarks/bench_realism.py                    # H&E and PAS, seeds 1-3
    python benchmarks/bench_realism.py --seeds 1 2 --size 2048 --json out.json

Real tiles (../shared/data, see its SOURCES.md), all at about 0.5 um/px:
- H&E: CMU-1-Small-Region.svs (20x, 0.499 um/px) and the MoNuSAC regions (40x,
  0.25 um/px, halved; their JPEGs are stored BGR). The stain/ images are left out: their
  pixel size is not recorded, and texture depends on it;
- PAS: kidney-pas and glomeruli-pas tiles (20x, ~0.5 um/px).

Synthetic tiles: H&E from fls and liver slides, PAS from kidney-layer and mesangial slides
(--size px square at 0.5 um/px, written to SVS and read back, JPEG included), each seed
rendered by default and with ``randomise=True``.

Every image is cut into 128 x 128 px tiles (64 um), those with at least half tissue kept,
and described by `wsi_pipeline.synth.realism.tile_features` (OD colour mean/sd, stain
angle, glass fraction, gradient, Laplacian energy at 1 and 2.5 um, local variance). The
features are standardised by the real set and the Fréchet distance between the two
Gaussians is reported per stain, mode and seed (lower = closer to real; 0 = same mean and
covariance), with the features that contribute most; and, pooled over seeds, improved
precision/recall (Kynkäänniemi et al. 2019, k = 3): the fraction of synthetic tiles that
fall inside the real tiles' manifold, and of real tiles inside the synthetic one (what a
wider, randomised synthetic set should raise). About 3-4 min on 2 busy cores with the
defaults.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
TILE_PX = 128
STAIN_TASKS = {"he": ("fls", "liver"), "pas": ("kidney-layer", "mesangial")}


def _rgb(path: str, bgr: bool = False) -> np.ndarray:
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB"))
    return np.ascontiguousarray(a[..., ::-1]) if bgr else a


def _halve(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    s = rgb[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16).sum((1, 3))
    return ((s + 2) // 4).astype(np.uint8)


def real_images(stain: str) -> list[tuple[str, np.ndarray]]:
    """(name, RGB at ~0.5 um/px) of the real images of a stain ('he' or 'pas')."""
    if stain == "he":
        import openslide

        s = openslide.OpenSlide(os.path.join(DATA, "slides", "CMU-1-Small-Region.svs"))
        out = [("CMU-1", np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB")))]
        for p in sorted(glob.glob(os.path.join(DATA, "lymphocytes-monusac", "images", "*.jpg"))):
            out.append((os.path.basename(p), _halve(_rgb(p, bgr=True))))
        return out
    paths = sorted(glob.glob(os.path.join(DATA, "kidney-pas", "images", "*.png"))
                   + glob.glob(os.path.join(DATA, "glomeruli-pas", "images", "*.png")))
    return [(os.path.basename(p), _rgb(p)) for p in paths]


def features_of(images) -> np.ndarray:
    from wsi_pipeline.synth.realism import tile_features, tiles_of

    rows = [tile_features(t, 0.5) for _, im in images for t in tiles_of(im, TILE_PX)]
    return np.array(rows)


def synthetic_image(task: str, seed: int, size: int, randomise: bool, folder: str):
    """Level 0 of a freshly written synthetic slide (RGB, decoded from its JPEG tiles)."""
    import tifffile

    from wsi_pipeline.synth import write_slide

    path = os.path.join(folder, f"{task}_{seed}_{int(randomise)}.svs")
    truth = write_slide(task, path, width=size, height=size, mpp=0.5, seed=seed,
                        randomise=randomise, workers=0)
    rgb = tifffile.imread(path, key=0)
    os.remove(path)
    return rgb, truth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--size", type=int, default=2048, help="synthetic slide side (px)")
    ap.add_argument("--stains", nargs="+", default=["he", "pas"], choices=["he", "pas"])
    ap.add_argument("--modes", nargs="+", default=["default", "randomised"],
                    choices=["default", "randomised"])
    ap.add_argument("--top", type=int, default=5, help="largest per-feature gaps to list")
    ap.add_argument("--json", help="write all figures to this JSON file")
    args = ap.parse_args(argv)
    if not os.path.isdir(DATA):
        print(f"real data not found at {DATA}; nothing to compare against", file=sys.stderr)
        return 1
    from wsi_pipeline.synth.realism import frechet_distance, precision_recall

    report: dict = {"tile_px": TILE_PX, "mpp": 0.5, "size_px": args.size, "seeds": args.seeds,
                    "stains": {}}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        for stain in args.stains:
            real = features_of(real_images(stain))
            rep = report["stains"][stain] = {"real_tiles": len(real), "modes": {}}
            print(f"\n== {stain.upper()}: {len(real)} real tiles; synthetic from "
                  f"{', '.join(STAIN_TASKS[stain])}, {args.size} px at 0.5 um/px")
            for mode in args.modes:
                per_seed, pooled = [], []
                for seed in args.seeds:
                    feats = []
                    for task in STAIN_TASKS[stain]:
                        rgb, _ = synthetic_image(task, seed, args.size, mode == "randomised",
                                                 folder)
                        feats.append(features_of([(task, rgb)]))
                    f = np.concatenate(feats)
                    pooled.append(f)
                    d = frechet_distance(real, f)
                    per_seed.append({"seed": seed, "tiles": len(f), "frechet": d["frechet"]})
                allf = np.concatenate(pooled)
                d = frechet_distance(real, allf)
                pr = precision_recall(real, allf)
                top = sorted(d["per_feature"].items(), key=lambda kv: -kv[1])[:args.top]
                fds = [r["frechet"] for r in per_seed]
                rep["modes"][mode] = {"per_seed": per_seed, "pooled_frechet": d["frechet"],
                                      **pr,
                                      "per_feature": d["per_feature"],
                                      "mean_gap_sd": d["mean_gap_sd"]}
                print(f"{mode:>10}: Fréchet per seed "
                      + ", ".join(f"{r['seed']}: {r['frechet']:.1f} ({r['tiles']} tiles)"
                                  for r in per_seed)
                      + f"; mean {np.mean(fds):.1f}; pooled over seeds {d['frechet']:.1f}; "
                      f"precision {pr['precision']:.2f}, recall {pr['recall']:.2f}")
                print("            largest gaps (dmean^2 + dsd^2; mean gap in real sd): "
                      + "; ".join(f"{k} {v:.1f} ({d['mean_gap_sd'][k]:+.1f})" for k, v in top))
    report["seconds"] = round(time.time() - t_start, 1)
    print(f"\n{report['seconds']} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
