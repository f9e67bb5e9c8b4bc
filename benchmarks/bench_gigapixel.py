"""Gigapixel benchmark (issue 6, section 7): the full ``wsi-run --task TASK`` (default fls)
on synthetic SIZE x SIZE slides, per stage, against the physical floor of merely reading
the same tiles.

    python benchmarks/bench_gigapixel.py --sizes 10000 100000 [--mpp 0.25] [--out DIR]
        [--task fls|kidney-layer|mesangial] [--model network|classical] [--device auto]
        [--workers 2] [--seed 5]

For each size:

* synthesise ``DIR/fls_SIZE.svs`` with ``wsi-synth`` (once; reused when its truth.json,
  written last, is present) and time it apart; it is not part of any other figure;
* run ``wsi-run SLIDE --task fls --force --quiet`` as a fresh process into
  ``DIR/run_MODEL_SIZE`` and measure its wall seconds, each stage's seconds (report.json
  ``provenance.stage_timings``), and memory: every 0.2 s the RSS of the wsi-run process and
  all its descendants is read from /proc and summed (shared pages of forked workers count
  once per process, so this errs high); the maximum is the peak, also kept per stage (the
  stage running is the first one the store's manifest.json does not list yet). The peak
  RSS of the largest single process (``wait4``) is printed beside it; "start" is the
  process start-up (imports, opening the slide) before the first stage. Where ``nvidia-smi``
  exists, GPU utilisation and memory are sampled every 0.2 s and summarised per stage;
* the output sizes in bytes (store.zarr, mask.ome.tif, objects.geojson, overlay.png);
* the physical floor: open the slide with ``wsi_pipeline.slide.open_slide`` (the backend
  the run used) and read every tissue tile of the run's store (``tiles``, row/col at the
  task's tile_um) at the task's MPP with ``Slide.read``, on ``--workers`` threads, dropping
  the pixels. Both the run and this read find the slide in the page cache when it fits.

Prints a table (one column per size) and ratios: total/floor, per-stage RSS largest/smallest
size (memory goal: peak <= 4 GB and <= 1.3x the smallest size's figure). No asserts. The
figures also go to ``DIR/gigapixel.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from wsi_pipeline.pipeline import STAGES

BIN = Path(sys.executable).parent
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
SAMPLE_S = 0.2
OUTPUT_FILES = ("store.zarr", "mask.ome.tif", "objects.geojson", "overlay.png", "report.json")
MEMORY_GOAL_BYTES = 4e9
MEMORY_FLAT_GOAL = 1.3
MIB = 2**20


# -- synthesis -------------------------------------------------------------------------------
SYNTH_LABEL = {"fls": "positive", "kidney-layer": "adequate", "mesangial": "M1"}


def synth(out: Path, size: int, mpp: float, seed: int, task: str = "fls"
          ) -> tuple[Path, float | None]:
    """The slide ``out/TASK_SIZE.svs`` and the seconds it took to write (None: reused)."""
    path = out / f"{task.replace('-', '_')}_{size}.svs"
    if path.exists() and path.with_suffix(".truth.json").exists():
        return path, None
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "wsi-synth"), "--task", task, "--out", str(path), "--seed",
                    str(seed), "--width", str(size), "--height", str(size), "--mpp", str(mpp),
                    "--label", SYNTH_LABEL[task], "--quiet"], check=True)
    return path, time.perf_counter() - t0


# -- memory and GPU sampling -----------------------------------------------------------------
def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and all its live descendants, from /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited while we looked
            continue
        # the command name is in parentheses and may hold spaces: ppid follows the last ')'
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_bytes(pid: int) -> int:
    """Resident bytes of one process (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError):
        return 0


class RunSampler:
    """Samples, every ``SAMPLE_S`` seconds while a run lasts, the summed RSS of its process
    tree and (when ``nvidia-smi`` exists) GPU utilisation/memory, each attributed to the
    stage running at that moment."""

    def __init__(self, root_pid: int, manifest: Path) -> None:
        self.root_pid, self.manifest = root_pid, manifest
        self.stage = "start"
        self.rss_peak: dict[str, int] = {}
        self.max_processes = 0
        self.gpu: dict[str, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._manifest_mtime = 0.0
        self._threads = [threading.Thread(target=self._sample_memory, daemon=True)]
        self._smi = None
        if shutil.which("nvidia-smi"):
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", str(int(SAMPLE_S * 1000))],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._threads.append(threading.Thread(target=self._sample_gpu, daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait()
        for t in self._threads:
            t.join()

    @property
    def peak(self) -> int:
        return max(self.rss_peak.values(), default=0)

    def _update_stage(self) -> None:
        try:
            mtime = self.manifest.stat().st_mtime
        except OSError:  # no stage finished yet; the store exists once the first one starts
            if self.stage == "start" and self.manifest.parent.is_dir():
                self.stage = STAGES[0]
            return
        if mtime == self._manifest_mtime:
            return
        try:  # written atomically (rename), so a read sees a whole file
            done = json.loads(self.manifest.read_text()).get("stages", {})
        except (OSError, ValueError):
            return
        self._manifest_mtime = mtime
        self.stage = next((s for s in STAGES if s not in done), "report")

    def _sample_memory(self) -> None:
        while not self._stop.is_set():
            self._update_stage()
            pids = process_tree(self.root_pid)
            rss = sum(rss_bytes(p) for p in pids)
            self.max_processes = max(self.max_processes, len(pids))
            self.rss_peak[self.stage] = max(self.rss_peak.get(self.stage, 0), rss)
            self._stop.wait(SAMPLE_S)

    def _sample_gpu(self) -> None:
        for line in self._smi.stdout:
            try:  # first GPU only: the run uses one
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.gpu.setdefault(self.stage, []).append((util, mem))


# -- one size --------------------------------------------------------------------------------
def run_pipeline(slide: Path, run_out: Path, args: argparse.Namespace) -> dict:
    """Run ``wsi-run`` on ``slide`` once, fresh; its figures and report."""
    folder = run_out / slide.stem  # the slide id of a plain file name is its stem
    shutil.rmtree(folder, ignore_errors=True)  # no stale manifest for the sampler to read
    cmd = [str(BIN / "wsi-run"), str(slide), "--task", args.task, "--out", str(run_out),
           *(["--model", args.model] if args.task == "fls" else []),
           "--device", args.device, "--workers", str(args.workers),
           "--force", "--quiet"]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    sampler = RunSampler(child.pid, folder / "store.zarr" / "manifest.json")
    try:
        _, status, usage = os.wait4(child.pid, 0)
    finally:
        wall = time.perf_counter() - t0
        sampler.stop()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"wsi-run failed on {slide}: {' '.join(cmd)}")
    report = json.loads((folder / "report.json").read_text())
    gpu = {stage: {"util_mean_pct": round(sum(u for u, _ in v) / len(v), 1),
                   "util_max_pct": max(u for u, _ in v),
                   "mem_max_mib": max(m for _, m in v), "samples": len(v)}
           for stage, v in sampler.gpu.items()}
    return {"wall_s": wall, "report": report, "folder": folder,
            "rss_tree_peak": sampler.peak, "rss_tree_by_stage": sampler.rss_peak,
            "rss_max_process": usage.ru_maxrss * 1024, "max_processes": sampler.max_processes,
            "gpu": gpu}


def floor_read_seconds(slide: Path, folder: Path, backend: str, workers: int,
                       task_name: str = "fls") -> float:
    """Seconds to read every tissue tile of the run's store at the task MPP, nothing else."""
    import zarr

    from wsi_pipeline.slide import open_slide
    from wsi_pipeline.tasks import get_task

    task = get_task(task_name)
    tiles = zarr.open_group(str(folder / "store.zarr"), mode="r")["tiles"][...]
    s = open_slide(slide, backend=backend)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(lambda rc: s.read(float(rc[1]) * task.tile_um,
                                                float(rc[0]) * task.tile_um,
                                                task.tile_px, task.tile_px, task.mpp), tiles):
                pass  # read and drop
        return time.perf_counter() - t0
    finally:
        s.close()


def path_bytes(path: Path) -> tuple[int, int]:
    """Apparent bytes and number of files of a file or folder (0, 0 if missing)."""
    if path.is_file():
        return path.stat().st_size, 1
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            total += os.stat(os.path.join(root, name)).st_size
            files += 1
    return total, files


def measure_size(size: int, args: argparse.Namespace) -> dict:
    slide, synth_s = synth(args.out, size, args.mpp, args.seed, args.task)
    print(f"{size} x {size}: " + (f"synthesised {slide.name} in {synth_s:.1f} s"
                                  if synth_s is not None else f"reusing {slide.name}"),
          flush=True)
    run = run_pipeline(slide, args.out / f"run_{args.task}_{args.model}_{size}", args)
    report, folder = run.pop("report"), run.pop("folder")
    floor_s = floor_read_seconds(slide, folder, report["provenance"]["backend"], args.workers,
                                 args.task)
    slide_bytes = sum(path_bytes(p)[0] for p in
                      (slide, slide.with_suffix(".truth.json"), slide.with_suffix(".truth.zarr")))
    outputs = {name: path_bytes(folder / name) for name in OUTPUT_FILES}
    stages = {k: v["seconds"] for k, v in report["provenance"]["stage_timings"].items()}
    inference = report.get("inference") or {}
    row = {"size": size, "synth_s": synth_s, **run, "stages_s": stages, "floor_s": floor_s,
           "tiles": report["counts"]["tissue_tiles"], "backend": report["provenance"]["backend"],
           "slide_bytes": slide.stat().st_size, "slide_and_truth_bytes": slide_bytes,
           "output_bytes": {k: v[0] for k, v in outputs.items()},
           "store_files": outputs["store.zarr"][1],
           "infer_device": inference.get("device"), "windows": inference.get("windows"),
           "windows_per_s": inference.get("windows_per_s"),
           "diagnosis": report["diagnosis"]["label"],
           "score": next(iter(report["scores"].items()), (None, None))}
    print(f"  wall {row['wall_s']:.1f} s, floor {floor_s:.1f} s, peak RSS "
          f"{row['rss_tree_peak'] / MIB:.0f} MiB (tree) / {row['rss_max_process'] / MIB:.0f} MiB"
          f" (largest process), {row['tiles']} tissue tiles", flush=True)
    return row


# -- printing --------------------------------------------------------------------------------
def print_table(rows: list[dict], mpp: float, model: str, task: str = "fls") -> None:
    stages = [s for s in STAGES if any(s in r["stages_s"] for r in rows)]
    mem_stages = ["start", *STAGES, "report"]
    mem_stages = [s for s in mem_stages if any(s in r["rss_tree_by_stage"] for r in rows)]
    lines: list[tuple[str, list[str]]] = []

    def add(label: str, fmt, key=None) -> None:
        lines.append((label, [fmt(r) if key is None else fmt(r[key]) for r in rows]))

    def mb(v: float) -> str:
        return f"{v / 1e6:.1f}"

    add("synth s (not counted)", lambda r: "reused" if r["synth_s"] is None
        else f"{r['synth_s']:.1f}")
    add("tissue tiles", str, "tiles")
    for s in stages:
        add(f"  {s} s", lambda r, s=s: f"{r['stages_s'][s]:.1f}" if s in r["stages_s"] else "-")
    add("stages total s", lambda r: f"{sum(r['stages_s'].values()):.1f}")
    add("wall s (process)", lambda r: f"{r['wall_s']:.1f}")
    add("floor s (read tiles)", lambda r: f"{r['floor_s']:.1f}")
    add("wall / floor", lambda r: f"{r['wall_s'] / r['floor_s']:.1f}")
    add("wall ms / tissue tile", lambda r: f"{1000 * r['wall_s'] / max(r['tiles'], 1):.1f}")
    add("peak RSS MiB (tree)", lambda r: f"{r['rss_tree_peak'] / MIB:.0f}")
    for s in mem_stages:
        add(f"  during {s}", lambda r, s=s: f"{r['rss_tree_by_stage'][s] / MIB:.0f}"
            if s in r["rss_tree_by_stage"] else "-")
    add("peak RSS MiB (1 process)", lambda r: f"{r['rss_max_process'] / MIB:.0f}")
    add("processes (max)", str, "max_processes")
    add("slide .svs MB", mb, "slide_bytes")
    add("slide+truth MB", mb, "slide_and_truth_bytes")
    for name in OUTPUT_FILES:
        add(f"{name} MB", lambda r, n=name: mb(r["output_bytes"][n]))
    add("store.zarr files", str, "store_files")
    add("diagnosis / score", lambda r: f"{r['diagnosis']} / {r['score'][0]} {r['score'][1]}")
    if any(r["windows_per_s"] for r in rows):
        add("infer windows/s", lambda r: f"{r['windows_per_s']} ({r['infer_device']})")
    if any(r["gpu"] for r in rows):
        add("GPU util % in infer (mean/max)", lambda r: "-" if "infer" not in r["gpu"] else
            f"{r['gpu']['infer']['util_mean_pct']}/{r['gpu']['infer']['util_max_pct']:.0f}")
        add("GPU MiB max", lambda r: f"{max(g['mem_max_mib'] for g in r['gpu'].values()):.0f}"
            if r["gpu"] else "-")

    print(f"\nwsi-run --task {task} --model {model}, slides at {mpp} um/px")
    head = ["size px", *[f"{r['size']}^2" for r in rows]]
    width = max(len(label) for label, _ in lines + [(head[0], [])])
    cols = [max(len(c) for c in [h, *(v[i] for _, v in lines)]) for i, h in enumerate(head[1:])]
    for label, values in [(head[0], head[1:]), *lines]:
        cells = (f"{v:>{w}}" for v, w in zip(values, cols, strict=True))
        print(f"{label:<{width}}  " + "  ".join(cells))


def print_ratios(rows: list[dict]) -> None:
    small, big = min(rows, key=lambda r: r["size"]), max(rows, key=lambda r: r["size"])
    print()
    for r in rows:
        pyramid = r["stages_s"].get("pyramid")
        extra = f"; pyramid stage / floor {pyramid / r['floor_s']:.2f}" if pyramid else ""
        print(f"{r['size']}^2: total / floor {r['wall_s'] / r['floor_s']:.2f} "
              f"(stages only {sum(r['stages_s'].values()) / r['floor_s']:.2f}){extra}")
    if big is small:
        return
    area = (big["size"] / small["size"]) ** 2
    rss = big["rss_tree_peak"] / small["rss_tree_peak"]
    tiles = big["tiles"] / max(small["tiles"], 1)
    print(f"{big['size']}^2 over {small['size']}^2: area x{area:.1f}, tissue tiles "
          f"x{tiles:.1f}, wall x{big['wall_s'] / small['wall_s']:.1f}")
    print(f"peak RSS (tree) {big['rss_tree_peak'] / MIB:.0f} / {small['rss_tree_peak'] / MIB:.0f}"
          f" MiB = {rss:.2f} (goal <= {MEMORY_FLAT_GOAL}; "
          f"{'met' if rss <= MEMORY_FLAT_GOAL else 'NOT met'}); largest "
          f"{big['rss_tree_peak'] / 1e9:.2f} GB (goal <= {MEMORY_GOAL_BYTES / 1e9:.0f} GB; "
          f"{'met' if big['rss_tree_peak'] <= MEMORY_GOAL_BYTES else 'NOT met'})")
    print(f"peak RSS (largest process) ratio "
          f"{big['rss_max_process'] / small['rss_max_process']:.2f}")
    growth = []
    for stage, b in big["rss_tree_by_stage"].items():
        s = small["rss_tree_by_stage"].get(stage)
        if s:
            growth.append(f"{stage} {b / s:.2f}")
    print("RSS ratio per stage: " + ", ".join(growth))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000],
                    help="slide edges in pixels (default 10000 100000)")
    ap.add_argument("--mpp", type=float, default=0.25, help="slide um/px (default 0.25, 40x)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/gigapixel"))
    ap.add_argument("--task", default="fls", choices=tuple(SYNTH_LABEL))
    ap.add_argument("--model", default="network", choices=("network", "classical"))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=5, help="synthesis seed (default 5)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = [measure_size(size, args) for size in args.sizes]
    print_table(rows, args.mpp, args.model, args.task)
    print_ratios(rows)
    results = args.out / "gigapixel.json"
    results.write_text(json.dumps({"mpp": args.mpp, "model": args.model, "device": args.device,
                                   "workers": args.workers, "rows": rows}, indent=1))
    print(f"figures written to {results}")


if __name__ == "__main__":
    main()
