"""The glomerulus detector on real PAS tiles: synthetic-only vs fine-tuned (leave one out).

    python benchmarks/bench_glomeruli_real.py --data ../shared/data/kidney-pas --work /tmp/kpas

The AIDPATH tiles (1024 x 1024 at ~0.5 um/px, glomeruli masked in red) become small slides
(`wsi_pipeline.tiles.tiles_to_slides`). Each tile is scored with the bundled detector
(trained on synthetic slides only) and with a detector fine-tuned from it on the OTHER
tile(s) (``wsi-train --task glomeruli --init``): pixel Dice of glomerulus vs the mask and
detection F1 (IoU >= 0.5), from ``wsi-run --task mesangial`` (the glomeruli it reports).
With two tiles of one glomerulus each this is an anecdote, not an estimate: say so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import zarr
from PIL import Image
from scipy import ndimage

from wsi_pipeline.checkpoint import demo_weights
from wsi_pipeline.cli import main as wsi_run
from wsi_pipeline.tasks import get_plugin
from wsi_pipeline.tasks.mesangial import HYPER, NORMAL
from wsi_pipeline.tiles import tiles_to_slides
from wsi_pipeline.train import main as wsi_train


def scores(out: Path, slide: Path) -> tuple[float, int, int, int]:
    """(Dice, matched, found, true) of the reported glomeruli against the tile's mask."""
    classes = zarr.open_group(str(out / slide.stem / "store.zarr"), mode="r")["pred/classes"]
    pred = np.isin(np.asarray(classes), (NORMAL, HYPER))
    labels = np.asarray(Image.open(slide.with_suffix(".labels.png"))) == 1
    step = labels.shape[0] / pred.shape[0]
    idx = ((np.arange(pred.shape[0]) + 0.5) * step).astype(int)
    true = labels[np.ix_(np.minimum(idx, labels.shape[0] - 1),
                         np.minimum(((np.arange(pred.shape[1]) + 0.5) * step).astype(int),
                                    labels.shape[1] - 1))]
    dice = 2 * float((pred & true).sum()) / max(float(pred.sum() + true.sum()), 1.0)
    lp, n_p = ndimage.label(pred)
    lt, n_t = ndimage.label(true)
    matched = 0
    for j in range(1, n_t + 1):
        t = lt == j
        for i in np.unique(lp[t]):
            if i and (lp == i)[t].sum() / ((lp == i) | t).sum() >= 0.5:
                matched += 1
                break
    return dice, matched, n_p, n_t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/kidney-pas"))
    p.add_argument("--work", type=Path, default=Path("/tmp/kpas"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args()
    slides = tiles_to_slides(args.data, args.work / "slides", mpp=0.5,
                             colours={(255, 0, 0): "glomerulus"})
    detector = demo_weights(get_plugin("mesangial"))
    for slide in slides:
        out = args.work / "synthetic_only"
        assert wsi_run([str(slide), "--task", "mesangial", "--out", str(out), "--quiet"]) == 0
        d, m, n_p, n_t = scores(out, slide)
        print(f"{slide.stem}: synthetic-only detector  Dice {d:.3f}  matched {m} of {n_t} "
              f"true, {n_p} found")
        others = [str(s) for s in slides if s != slide]
        ckpt = args.work / f"tuned_without_{slide.stem}"
        assert wsi_train(["--task", "glomeruli", "--data", *others, "--init", str(detector),
                          "--out", str(ckpt), "--work", str(args.work / "train"),
                          "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps),
                          "--batch-size", "8", "--patch-px", "256", "--val-fraction", "0",
                          "--lr", "5e-4"]) == 0
        out = args.work / f"tuned_{slide.stem}"
        assert wsi_run([str(slide), "--task", "mesangial", "--out", str(out), "--quiet",
                        "--weights", str(ckpt.with_suffix(".safetensors"))]) == 0
        d, m, n_p, n_t = scores(out, slide)
        print(f"{slide.stem}: fine-tuned on {len(others)} other tile(s)  Dice {d:.3f}  "
              f"matched {m} of {n_t} true, {n_p} found")


if __name__ == "__main__":
    main()
