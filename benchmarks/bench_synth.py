"""Benchmark `wsi-synth`: wall time, throughput and peak memory for two slide sizes.

    python benchmarks/bench_synth.py [--big 100000] [--small 10000] [--out DIR]
                                     [--task fls] [--workers 2] [--keep]

Each slide is written in its own subprocess; the child reports the peak resident memory
(`resource.getrusage(...).ru_maxrss`) of itself (the writer) and of its rendering
workers. Memory must not grow with slide size: the goal is RSS(big) / RSS(small) <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time
from wsi_pipeline.synth import write_slide
task, path, size, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
truth = write_slide(task, path, width=size, height=size, seed=1, workers=workers)
wall = time.perf_counter() - t0
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "rss_main_mb": own, "rss_worker_mb": kids,
                  "levels": truth["generator"]["levels"],
                  "tissue_mm2": truth["areas_mm2"].get("tissue")}))
"""


def run_one(task: str, size: int, out_dir: str, workers: int) -> dict:
    path = os.path.join(out_dir, f"bench_{task}_{size}.svs")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, task, path, str(size), str(workers)],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_synth: {size} px run failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(size=size, process_s=elapsed, file_mb=os.path.getsize(path) / 2**20,
               mpx_per_s=size * size / 1e6 / res["wall_s"],
               rss_peak_mb=max(res["rss_main_mb"], res["rss_worker_mb"]))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", type=int, default=100_000, help="big slide side (px)")
    ap.add_argument("--small", type=int, default=10_000, help="small slide side (px)")
    ap.add_argument("--task", default="fls")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", help="folder for the slides (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the written slides")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="bench_synth_")
    os.makedirs(out, exist_ok=True)
    results = []
    try:
        for size in (args.small, args.big):
            r = run_one(args.task, size, out, args.workers)
            results.append(r)
            print(f"{args.task} {size}x{size}: {r['wall_s']:.1f} s, {r['mpx_per_s']:.1f} Mpx/s, "
                  f"peak RSS main {r['rss_main_mb']:.0f} MB / worker {r['rss_worker_mb']:.0f} MB, "
                  f"file {r['file_mb']:.0f} MB, tissue {r['tissue_mm2']:.1f} mm2, "
                  f"levels {len(r['levels'])}", flush=True)
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(out, ignore_errors=True)
    small, big = results
    ratio = big["rss_peak_mb"] / small["rss_peak_mb"]
    print(f"RSS ratio {args.big}/{args.small}: {ratio:.2f} (goal <= 1.3); "
          f"main {big['rss_main_mb'] / small['rss_main_mb']:.2f}, "
          f"worker {big['rss_worker_mb'] / small['rss_worker_mb']:.2f}")
    print(json.dumps({"small": small, "big": big, "rss_ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
