"""Model size and CPU speed: M2CF-Net vs its U-Net and HookNet baselines.

    python benchmarks/bench_models.py [--paper-batch 2]

For the default (demo) configuration and a "paper-size" one (ResNet-34 encoders, depth 5,
smp's default U-Net decoder widths): parameters, float16 checkpoint size, GFLOP per
512 x 512 patch (torch's FLOP counter, 2 per multiply-add, so machine-independent) and CPU
forward throughput (patches/s, eval, channels_last, inference_mode; fastest of the timed
batches after one warm-up, so short bursts of other load do not count). Paper-size models
are timed on one smaller batch so the whole script stays under 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from wsi_pipeline.models import build_model, count_parameters

PX = 512
PAPER = {"encoder_name": "resnet34", "encoder_depth": 5,
         "decoder_channels": (256, 128, 64, 32, 16)}
PAPER_EXTRA = {"m2cf_net": {"fusion_channels": 256}}


def gflop_per_patch(model: torch.nn.Module) -> float:
    x = torch.rand(1, len(model.levels), 3, PX, PX)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def patches_per_s(model: torch.nn.Module, batch: int, repeats: int) -> float:
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(batch, len(model.levels), 3, PX, PX)
    with torch.inference_mode():
        model(x[:1])  # warm-up: allocator, oneDNN primitives
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return batch / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--paper-batch", type=int, default=2)
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {PX} x {PX} px, "
          f"load average {os.getloadavg()[0]:.1f} (timings are only as quiet as the machine)")
    print(f"{'config':7s} {'arch':9s} {'levels':9s} {'params':>11s} {'fp16 MB':>8s} "
          f"{'GFLOP/patch':>12s} {'patches/s':>10s}")
    for config, base, batch, repeats in (("demo", {}, args.batch, args.repeats),
                                         ("paper", PAPER, args.paper_batch, 1)):
        params = {}
        for arch in ("m2cf_net", "unet", "hooknet"):
            torch.manual_seed(0)
            model = build_model(arch, **base, **(PAPER_EXTRA.get(arch, {}) if base else {}))
            model.eval()
            params[arch] = count_parameters(model)
            size_mb = 2 * sum(t.numel() for t in model.state_dict().values()) / 1e6
            speed = patches_per_s(model, batch, repeats)
            print(f"{config:7s} {arch:9s} {str(model.levels):9s} {params[arch]:11,d} "
                  f"{size_mb:8.2f} {gflop_per_patch(model):12.2f} {speed:10.2f}", flush=True)
        ratio = {arch: params[arch] / params["unet"] for arch in params}
        print(f"{config:7s} parameters relative to U-Net: M2CF-Net {ratio['m2cf_net']:.2f}, "
              f"HookNet {ratio['hooknet']:.2f}")


if __name__ == "__main__":
    main()
