"""open -> tissue -> stain -> pyramid throughput and memory, against plain reading.

Two figures, each a ratio measured in the same run:

1. Throughput: megapixels of tissue written per second by ``wsi-run --until pyramid``,
   divided by megapixels per second of merely reading the same regions at the same MPP
   with the same backend and the same number of threads (the floor set by decoding).
   Goal >= 0.6. Printed end to end (a fresh process: start-up, tissue detection and the
   once-per-slide stain fit included) and for the pyramid stage alone.
2. Memory: peak RSS of ``wsi-run`` on a big synthetic slide over that on a small one.
   Goal <= 1.3 (memory flat in slide size).

    python benchmarks/bench_pipeline.py --small 10000 --big 100000 --out bench-out

Slides are synthesised once into --out by ``wsi-synth`` (slow for 100k x 100k: minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BIN = Path(sys.executable).parent


def synth(out: Path, size: int, mpp: float) -> Path:
    path = out / f"fls_{size}.svs"
    if not path.exists():
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "wsi-synth"), "--task", "fls", "--out", str(path), "--seed",
                        "7", "--width", str(size), "--height", str(size), "--mpp", str(mpp),
                        "--positive", "--quiet"], check=True)
        print(f"  synthesised {path.name} in {time.perf_counter() - t0:.1f} s")
    return path


def run_pipeline(slide: Path, out: Path, workers: int) -> tuple[float, int, dict]:
    """Wall seconds and peak RSS (bytes) of one fresh ``wsi-run`` child, and its report."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(BIN / "wsi-run"), str(slide), "--task", "fls", "--out", str(out), "--until",
           "pyramid", "--quiet", "--workers", str(workers)]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"wsi-run failed on {slide}")
    report = json.loads((out / slide.stem / "report.json").read_text())
    return seconds, usage.ru_maxrss * 1024, report


def plain_read_seconds(slide: Path, report: dict, workers: int) -> float:
    """Seconds to read every tissue tile of the report's grid, nothing else."""
    import numpy as np
    import zarr

    from wsi_pipeline.slide import open_slide
    from wsi_pipeline.tasks import get_task

    task = get_task("fls")
    store = zarr.open_group(str(Path(report["_out"]) / "store.zarr"), mode="r")
    tiles = np.asarray(store["tiles"][...])
    s = open_slide(slide)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(lambda rc: s.read(rc[1] * task.tile_um, rc[0] * task.tile_um,
                                            task.tile_px, task.tile_px, task.mpp), tiles):
            pass  # read and drop, as the pipeline does
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=10000)
    ap.add_argument("--big", type=int, default=0, help="0 = skip the memory comparison")
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for size in [args.small] + ([args.big] if args.big else []):
        slide = synth(args.out, size, args.mpp)
        out = args.out / f"run_{size}"
        seconds, rss, report = run_pipeline(slide, out, args.workers)
        report["_out"] = str(out / slide.stem)
        mpx = report["pyramid"]["mpx_written"]
        read_s = plain_read_seconds(slide, report, args.workers)
        timings = {k: v["seconds"] for k, v in report["provenance"]["stage_timings"].items()}
        rows.append((size, seconds, rss, mpx, read_s))
        print(f"{size} x {size} px at {args.mpp} um/px: tissue {report['areas_mm2']['tissue']}"
              f" mm2, {mpx} Mpx written at 0.5 um/px")
        print(f"  wsi-run --until pyramid: {seconds:.1f} s wall ({mpx / seconds:.2f} Mpx/s), "
              f"peak RSS {rss / 2**20:.0f} MiB; stages {timings}")
        print(f"  plain read of the same tiles: {read_s:.1f} s ({mpx / read_s:.2f} Mpx/s)")
        print(f"  ratio pipeline / plain read throughput: {read_s / seconds:.2f} end to end "
              f"(process start, tissue and stain fit included; goal >= 0.6), "
              f"{read_s / timings['pyramid']:.2f} for the pyramid stage alone")
    if len(rows) == 2:
        ratio = rows[1][2] / rows[0][2]
        print(f"peak RSS {args.big}^2 / {args.small}^2: {ratio:.2f} (goal <= 1.3)")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(benchmark process itself: {own:.0f} MiB)")


if __name__ == "__main__":
    main()
