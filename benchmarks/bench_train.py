"""Training throughput: patch sampling/reading vs the optimiser step, same run.

    python benchmarks/bench_train.py [--patch-px 256] [--batch-size 8] [--steps 10]

On two synthetic FLS slides (4096 x 3072 px, prepared to the pyramid in a temporary
folder): patches/s of `PatchDataset` (zarr read of 3 context levels + annotation crop,
with and without augmentation) in this process; seconds per training step of the default
M2CF-Net on batches already in memory; and steps/s through the DataLoader (workers) as
`wsi-train` runs it. The ratio loader/in-memory says how much of the step data loading
costs once overlapped by the workers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline import train
from wsi_pipeline.models import build_model, count_parameters
from wsi_pipeline.models.losses import bce_dice_loss
from wsi_pipeline.synth import write_slide
from wsi_pipeline.tasks import get_task


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--patch-px", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    task = get_task("fls")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = [root / f"b{i}.svs" for i in range(2)]
        for i, path in enumerate(paths):
            write_slide("fls", path, width=4096, height=3072, seed=900 + i,
                        label=("positive", "negative")[i])
        slides = train.prepare_slides(paths, task, root / "stores", log=lambda _: None)
        model = build_model(task.model.arch)
        n = args.steps * args.batch_size
        plan = train.sample_patches(slides, n + args.batch_size, args.patch_px,
                                    np.random.default_rng(0))
        for augment in (False, True):
            data = train.PatchDataset(slides, plan, args.patch_px, task, model.levels,
                                      augment=augment)
            t0 = time.perf_counter()
            for i in range(n):
                data[i]
            rate = n / (time.perf_counter() - t0)
            print(f"PatchDataset {'with' if augment else 'without'} augmentation: "
                  f"{rate:.1f} patches/s (1 process)")
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        data = train.PatchDataset(slides, plan, args.patch_px, task, model.levels, augment=True)
        x, target, valid = (torch.stack(t) for t in zip(*(data[i] for i in
                                                          range(args.batch_size)), strict=True))
        model.train()

        def step(x, target, valid) -> None:
            loss = bce_dice_loss(model(train.to_input(x, torch.device("cpu"))), target,
                                 valid=valid[:, None])
            opt.zero_grad()
            loss.backward()
            opt.step()

        step(x, target, valid)   # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(x, target, valid)
        memory_s = (time.perf_counter() - t0) / args.steps
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size,
                                             num_workers=args.workers)
        batches = iter(loader)
        step(*next(batches))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(*next(batches))
        loader_s = (time.perf_counter() - t0) / args.steps
        print(f"m2cf_net ({count_parameters(model):,} parameters), patch {args.patch_px} px, "
              f"batch {args.batch_size}: {memory_s:.3f} s/step in memory, {loader_s:.3f} s/step "
              f"through the DataLoader ({args.workers} workers): "
              f"{args.batch_size / loader_s:.1f} patches/s, ratio {memory_s / loader_s:.2f}")


if __name__ == "__main__":
    main()
