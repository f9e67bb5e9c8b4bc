"""Engine efficiency: windows/s through the whole engine (read from the zarr store in
DataLoader workers, model, pool, stitch into zarr) vs the bare model forward on the same
batches already in memory, in the same run.

    python benchmarks/bench_infer.py [--slide PATH] [--weights CKPT] [--device cpu|cuda]
                                     [--windows 64] [--batch-size 8] [--workers 2]

Without --slide it synthesises a 6000 x 4500 px fls slide; without --weights it uses the
bundled demo weights. Prints windows/s of both and their ratio (goal >= 0.85 on CPU,
>= 0.9 on a GPU with AMP).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline.checkpoint import demo_weights, load_checkpoint
from wsi_pipeline.infer import EngineOptions, infer_to_store, read_context, window_grid
from wsi_pipeline.pipeline import RunOptions, resolve_device, run_slide
from wsi_pipeline.store import SlideStore
from wsi_pipeline.synth import write_slide
from wsi_pipeline.tasks import get_plugin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slide", type=Path)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    plugin = get_plugin("fls")
    task = plugin.spec
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_infer."))
    slide = args.slide
    if slide is None:
        slide = work / "bench.svs"
        write_slide("fls", slide, width=6000, height=4500, mpp=0.5, seed=7, label="positive")
    run_slide(slide, plugin, "s", RunOptions(out=work, until="pyramid", workers=args.workers))
    store = SlideStore(work / "s" / "store.zarr")
    model, _ = load_checkpoint(args.weights or demo_weights(plugin), task="fls", device=device)
    hw = tuple(store.root["image/0"].shape[1:])
    windows = window_grid(store.read_array("tiles"), task.tile_px, hw, task.model.overlap_px)
    windows = windows[: args.windows]
    opts = EngineOptions(device=device, batch_size=args.batch_size, workers=args.workers)

    # bare forward: the same windows, already decoded and in memory as float tensors
    levels = [store.root[f"image/{k}"] for k in model.levels]
    factors = tuple(task.context[k] for k in model.levels)
    batches = [torch.from_numpy(np.stack([read_context(levels, factors, y, x, task.tile_px)
                                          for y, x in windows[i:i + args.batch_size]]))
               for i in range(0, len(windows), args.batch_size)]
    batches = [b.to(device).permute(0, 1, 4, 2, 3).float().div(255) for b in batches]
    model = model.eval().to(device, memory_format=torch.channels_last)
    amp = torch.bfloat16 if device == "cuda" else None
    with torch.inference_mode(), torch.autocast(device, dtype=amp, enabled=amp is not None):
        model(batches[0])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            model(b)
        if device == "cuda":
            torch.cuda.synchronize()
        bare_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats = infer_to_store(model, store, "bench", windows, size_px=task.tile_px,
                           overlap_px=task.model.overlap_px, context=task.context,
                           level0_hw=hw, out_downsample=task.model.out_downsample,
                           options=opts, inputs=str(time.time()))
    engine_s = time.perf_counter() - t0
    n = len(windows)
    print(f"device {device}, batch {args.batch_size}, workers {args.workers}, {n} windows "
          f"of {task.tile_px} px x {len(model.levels)} levels")
    print(f"bare model forward : {n / bare_s:7.2f} windows/s")
    print(f"whole engine       : {n / engine_s:7.2f} windows/s "
          f"(read + model + stitch; {stats['windows']} windows)")
    print(f"engine / bare      : {bare_s / engine_s:7.3f}   (goal >= 0.85 CPU, >= 0.9 GPU)")


if __name__ == "__main__":
    main()
