"""SimCLR-pretrained vs from-scratch glomerulus classifier with few labels (docs/models.md §5).

    python benchmarks/bench_simclr.py --train-slides 10 --val-slides 4 --labels 10 \\
        --work /tmp/bench_simclr

Synthetic mesangial slides (seeds 7000+ for training, 7500+ held out) give normalised
512 px glomerulus crops (`wsi_pipeline.train.crops.collect_crops`). SimCLR pretrains an
encoder on every training crop without labels; then two classifiers are fine-tuned the
same way on ``--labels`` labelled crops per class, one from the SimCLR encoder, one from
random weights; both are scored by glomerulus-level AUC on the held-out slides' crops.
Prints SimCLR throughput (images/s, views included), fine-tune seconds and both AUCs (and
their ratio), over ``--repeats`` draws of the labelled subset.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline.batch import unique_ids
from wsi_pipeline.models import build_model
from wsi_pipeline.models.simclr import GlomerulusClassifier
from wsi_pipeline.synth import write_slide
from wsi_pipeline.train.crops import (
    CropOptions,
    auc,
    collect_crops,
    few_labels,
    finetune,
    predict,
    pretrain,
)


def cohort(folder: Path, seeds: range, size: tuple[int, int]) -> list[Path]:
    paths = []
    for i, seed in enumerate(seeds):
        path = folder / f"mes_{seed}.svs"
        if not path.exists():
            write_slide("mesangial", path, width=size[0], height=size[1], mpp=0.5, seed=seed,
                        label=("M1", "M0")[i % 2])
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-slides", type=int, default=10)
    p.add_argument("--val-slides", type=int, default=4)
    p.add_argument("--size", default="10000x8000")
    p.add_argument("--labels", type=int, default=10, help="labelled crops per class")
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=15)
    p.add_argument("--encoder", default="tu-mobilenetv3_small_100")
    p.add_argument("--batch-size", type=int, default=32, help="SimCLR crops per batch")
    p.add_argument("--tau", type=float, default=0.5, help="NT-Xent temperature")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_simclr"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    device = torch.device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    train_paths = cohort(args.work / "slides", range(7000, 7000 + args.train_slides), size)
    val_paths = cohort(args.work / "slides", range(7500, 7500 + args.val_slides), size)
    paths = train_paths + val_paths
    crops = collect_crops(paths, unique_ids([q.stem for q in paths]), args.work / "stores",
                          log=lambda m: None)
    is_val = crops.slide >= len(train_paths)
    train, val = crops.subset(~is_val), crops.subset(is_val)
    print(f"crops: {len(train.labels)} train ({int(train.labels.sum())} hypercellular), "
          f"{len(val.labels)} held out ({int(val.labels.sum())}); "
          f"prepared in {time.perf_counter() - t0:.0f} s on {device}")

    torch.manual_seed(0)
    simclr = build_model("simclr", encoder_name=args.encoder).to(device)
    stats = pretrain(simclr, train.crops, CropOptions(epochs=args.pretrain_epochs,
                                                      batch_size=args.batch_size, tau=args.tau),
                     device, log=lambda m: None)
    print(f"SimCLR pretraining: {stats['images']} views in {stats['seconds']} s = "
          f"{stats['images_per_s']} images/s (model only {stats['model_images_per_s']}); "
          f"NT-Xent by epoch {stats['nt_xent']} (chance ln(2B-1) = "
          f"{np.log(2 * min(args.batch_size, len(train.crops)) - 1):.2f})")
    simclr.cpu()

    rows = []
    for r in range(args.repeats):
        labelled = few_labels(train, args.labels, seed=r)
        result = {}
        for name in ("simclr", "scratch"):
            torch.manual_seed(r)
            model = (GlomerulusClassifier.from_simclr(copy.deepcopy(simclr)) if name == "simclr"
                     else build_model("glomerulus_classifier", encoder_name=args.encoder))
            model.to(device)
            # no validation during fine-tuning: the last epoch is scored, as a lab with
            # few labels would have to do
            stats = finetune(model, labelled, None, CropOptions(
                epochs=args.finetune_epochs, batch_size=16, seed=r), device,
                log=lambda m: None)
            result[name] = (auc(predict(model, val.crops, device), val.labels),
                            stats["seconds"])
        rows.append(result)
        print(f"draw {r}: {len(labelled.labels)} labels; AUC SimCLR {result['simclr'][0]:.3f} "
              f"({result['simclr'][1]:.0f} s), scratch {result['scratch'][0]:.3f} "
              f"({result['scratch'][1]:.0f} s)")
    a = np.array([[row["simclr"][0], row["scratch"][0]] for row in rows])
    print(f"mean AUC over {args.repeats} draws: SimCLR {a[:, 0].mean():.3f} +/- "
          f"{a[:, 0].std():.3f}, scratch {a[:, 1].mean():.3f} +/- {a[:, 1].std():.3f}; "
          f"ratio {a[:, 0].mean() / a[:, 1].mean():.2f}")


if __name__ == "__main__":
    main()
