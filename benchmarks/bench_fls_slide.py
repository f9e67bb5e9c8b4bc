"""Slide-level seconds for ``wsi-run --task fls`` split by stage, on a synthetic slide.

    python benchmarks/bench_fls_slide.py [--size 50000] [--mpp 0.25] [--out bench-out]
                                         [--model network|classical] [--device auto]

Synthesises a SIZE x SIZE fls slide at MPP (once; reused when present), runs the whole
pipeline, and prints each stage's seconds and share, windows/s of the infer stage, and the
ratio of the whole run to the infer stage alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=50000)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--model", default="network")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slide = args.out / f"fls_{args.size}.svs"
    if not slide.exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "wsi_pipeline.synth.cli", "--task", "fls",
                        "--out", str(slide), "--width", str(args.size), "--height",
                        str(args.size), "--mpp", str(args.mpp), "--seed", "5", "--positive",
                        "--quiet"], check=True)
        print(f"synthesised {slide} in {time.perf_counter() - t0:.0f} s")
    run_out = args.out / f"run_{args.model}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wsi_pipeline.cli", str(slide), "--task", "fls",
                    "--out", str(run_out), "--model", args.model, "--device", args.device,
                    "--workers", str(args.workers), "--force", "--quiet"], check=True)
    wall = time.perf_counter() - t0
    report = json.loads((run_out / slide.stem / "report.json").read_text())
    timings = report["provenance"]["stage_timings"]
    total = sum(t["seconds"] for t in timings.values())
    print(f"{args.size} x {args.size} px at {args.mpp} um/px, model {args.model}: "
          f"wall {wall:.1f} s (stages {total:.1f} s)")
    for stage, t in timings.items():
        print(f"  {stage:8s} {t['seconds']:9.1f} s  {t['seconds'] / total:6.1%}")
    inference = report.get("inference") or {}
    if inference.get("windows_per_s"):
        print(f"  infer: {inference['windows']} windows, {inference['windows_per_s']} windows/s "
              f"on {inference['device']}")
    print(f"diagnosis {report['diagnosis']['label']}, FS {report['scores'].get('focus_score')}"
          f", foci {report['counts'].get('foci')}, tissue {report['areas_mm2']['tissue']} mm2")


if __name__ == "__main__":
    main()
