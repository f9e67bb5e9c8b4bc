"""Inference cost of each task's network: FLOPs at output stride 1 vs the task's stride, and
CPU throughput per runtime (issue 17, items 1 and 2).

    python benchmarks/bench_runtime.py [--tasks fls liver] [--batch 8] [--repeats 3] [--compile]

For every task network (bundled demo architecture, `TaskSpec` window size):
* parameters and GFLOP per window (torch's FLOP counter, 2 per multiply-add) of the
  architecture decoding to full resolution (output stride 1, the old demo models) and of
  the one that stops at the task's ``out_downsample``;
* windows/s of the bundled demo network on this CPU for: eager torch as the engine ran it
  before (no folding, channels-last), eager torch `prepare`-d (BatchNorm folded), and, when
  installed, OpenVINO, ONNX Runtime and (``--compile``) ``torch.compile``; each with its
  largest probability difference from eager torch on the same batch (limit 1e-3).
Timings are the fastest of ``--repeats`` batches after a warm-up, the runtimes interleaved
per repeat so background load hits all alike; ratios are against the first row of the
same run.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from wsi_pipeline.checkpoint import load_task_model
from wsi_pipeline.models import build_model, count_parameters
from wsi_pipeline.runtime import available_runtimes, compile_runtime, prepare
from wsi_pipeline.tasks import get_plugin

SEGMENTER_TASKS = ("fls", "liver", "kidney-layer", "glomeruli")


def gflop(model: torch.nn.Module, px: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(1, len(model.levels), 3, px, px))
    return counter.get_total_flops() / 1e9


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)


def cost_rows(task: str) -> None:
    plugin = get_plugin(task)
    network, meta = load_task_model(plugin, plugin.spec.model, None)
    kwargs = dict(meta["arch_kwargs"])
    px = plugin.spec.tile_px
    stride = plugin.spec.model.out_downsample
    for s in sorted({1, stride}):
        model = build_model(meta["architecture"], **{**kwargs, "output_stride": s}).eval()
        print(f"  {meta['architecture']} output stride {s}: {count_parameters(model):,} "
              f"parameters, {gflop(model, px):.2f} GFLOP per {px} px window")
    print(f"  bundled demo network: output stride {getattr(network, 'output_stride', 1)}")


def speed_rows(task: str, batch: int, repeats: int, with_compile: bool) -> None:
    plugin = get_plugin(task)
    network, _ = load_task_model(plugin, plugin.spec.model, None)
    px = plugin.spec.tile_px
    levels = len(network.levels)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, levels, 3, px, px, generator=g)
    example = x[:1]
    before = network.eval().to(memory_format=torch.channels_last)
    runners: dict[str, object] = {"eager (before)": before}
    prepared = prepare(network)
    runners["eager prepared"] = prepared
    for name in available_runtimes()[1:]:
        t0 = time.perf_counter()
        run, used = compile_runtime(prepared, name, example, log=print)
        if used == name:
            runners[name] = run
            print(f"  {name}: ready in {time.perf_counter() - t0:.1f} s (conversion cached "
                  "after the first run)")
    if with_compile:
        t0 = time.perf_counter()
        compiled = torch.compile(prepared)
        with torch.inference_mode():
            compiled(x)
        runners["torch.compile"] = compiled
        print(f"  torch.compile: first batch (compilation) {time.perf_counter() - t0:.1f} s")
    with torch.inference_mode():
        reference = probabilities(before(x))
        gaps = {k: float((probabilities(r(x)) - reference).abs().max())
                for k, r in runners.items()}
        best = dict.fromkeys(runners, float("inf"))
        for _ in range(repeats):
            for k, r in runners.items():
                t0 = time.perf_counter()
                r(x)
                best[k] = min(best[k], time.perf_counter() - t0)
    base = batch / best["eager (before)"]
    for k in runners:
        rate = batch / best[k]
        print(f"  {k:16s} {rate:6.2f} windows/s  x{rate / base:4.2f}  "
              f"max |dp| {gaps[k]:.1e}{'' if gaps[k] <= 1e-3 else '  (over 1e-3)'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(SEGMENTER_TASKS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, runtimes "
          f"{available_runtimes()}, load average {os.getloadavg()[0]:.1f}")
    for task in args.tasks:
        print(f"{task}:")
        cost_rows(task)
        speed_rows(task, args.batch, args.repeats, args.compile)


if __name__ == "__main__":
    main()
