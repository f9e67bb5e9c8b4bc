"""Pyramid stage against its reading floor (issue 17, item 4; goal: stage <= 1.2x floor).

    python benchmarks/bench_pyramid.py [--size 20000] [--mpp 0.25] [--workers 2]
        [--repeats 3] [--out bench-out/pyramid] [--baseline OLD_PYRAMID_PY]

* synthesises ``DIR/fls_SIZE.svs`` with ``wsi-synth`` once (reused when its truth.json,
  written last, is there; ~70 s for 20000 px on 2 cores) and runs ``wsi-run --until
  stain`` on it once, for the tissue tiles and the stain fit (reused too);
* then, ``--repeats`` times, in a shuffled order each time:
  - floor: read every tissue tile at the task's MPP with ``Slide.read`` on ``--workers``
    threads and drop the pixels (as bench_gigapixel.py's ``floor_read_seconds``);
  - pyramid: what the pipeline's pyramid stage does, ``stain.make_normaliser`` then
    ``pyramid.write_pyramid``, into a fresh store;
  - baseline (with ``--baseline``): the same with another ``pyramid.py`` loaded from that
    file, e.g. the code before a change:
    ``git show HEAD~1:wsi_pipeline/pyramid.py > /tmp/pyramid_old.py``;
  each on a freshly opened slide, the file in the page cache (one untimed read first).
* prints wall and CPU seconds (all threads of this process) of each, the ratios to the
  floor per repeat and their medians, and the CPU ratio without the normaliser build (the
  stain LUT, 0.3-0.6 s of CPU per slide whatever its size: a few % of this small slide's
  stage, nothing at gigapixel size); with ``--baseline`` also whether every level of the
  two pyramids holds the same pixels. Figures also go to ``DIR/pyramid.json``.

On a shared machine the wall ratio moves with the background load; the CPU ratio (work
done, whatever the scheduling) is the steadier figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import zarr

from wsi_pipeline import pyramid, stain
from wsi_pipeline.slide import open_slide
from wsi_pipeline.store import SlideStore
from wsi_pipeline.tasks import get_task

BIN = Path(sys.executable).parent
TASK = "fls"
GOAL = 1.2


def prepare(out: Path, size: int, mpp: float, workers: int) -> tuple[Path, Path]:
    """The synthetic slide and the store of its ``wsi-run --until stain`` run."""
    slide = out / f"fls_{size}.svs"
    if not slide.with_suffix(".truth.json").exists():
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "wsi-synth"), "--task", TASK, "--out", str(slide), "--seed",
                        "5", "--width", str(size), "--height", str(size), "--mpp", str(mpp),
                        "--label", "positive", "--quiet"], check=True)
        print(f"synthesised {slide.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    store = out / "run" / slide.stem / "store.zarr"
    if not (store.exists() and "stain" in SlideStore(store).manifest().get("stages", {})):
        subprocess.run([str(BIN / "wsi-run"), str(slide), "--task", TASK, "--out",
                        str(out / "run"), "--until", "stain", "--workers", str(workers),
                        "--quiet"], check=True)
    return slide, store


def load_module(path: Path) -> ModuleType:
    """``path`` (a pyramid.py) as a module of the wsi_pipeline package, so that its
    relative imports resolve."""
    spec = importlib.util.spec_from_file_location("wsi_pipeline._pyramid_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and CPU (process, all threads) seconds of fn(), and what it returned."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="slide edge, px (default 20000)")
    ap.add_argument("--mpp", type=float, default=0.25, help="slide um/px (default 0.25, 40x)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-out/pyramid"))
    ap.add_argument("--baseline", type=Path, help="another pyramid.py to time alongside")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    slide_path, store_path = prepare(args.out, args.size, args.mpp, args.workers)
    spec = get_task(TASK)
    source = SlideStore(store_path)
    tiles = source.read_array("tiles")
    fit = stain.StainFit.from_dict(source.manifest()["stages"]["stain"]["result"]["fit"])
    tile_um = spec.tile_px * spec.mpp
    modules = {"pyramid": pyramid} | ({"baseline": load_module(args.baseline)}
                                      if args.baseline else {})

    def floor() -> None:
        with open_slide(slide_path) as slide, ThreadPoolExecutor(args.workers) as pool:
            for _ in pool.map(lambda rc: slide.read(float(rc[1]) * tile_um,
                                                    float(rc[0]) * tile_um, spec.tile_px,
                                                    spec.tile_px, spec.mpp), tiles):
                pass  # read and drop

    def stage(name: str) -> tuple[float, float]:
        """Run the stage; return the wall and CPU seconds of its normaliser build."""
        module = modules[name]
        folder = args.out / f"{name}.zarr"
        shutil.rmtree(folder, ignore_errors=True)
        with open_slide(slide_path) as slide:
            lut_wall, lut_cpu, normalise = timed(lambda: stain.make_normaliser(fit, spec.stain))
            levels = module.PyramidSpec(mpp=spec.mpp, tile_px=spec.tile_px,
                                        context=spec.context)
            module.write_pyramid(slide, SlideStore(folder), tiles, levels, normalise, "bench",
                                 workers=args.workers)
        return lut_wall, lut_cpu

    floor()  # the slide file into the page cache
    print(f"{slide_path.name}: {len(tiles)} tissue tiles of {spec.tile_px} px at {spec.mpp} "
          f"um/px, {args.workers} workers", flush=True)
    runs: list[dict[str, tuple[float, float]]] = []
    order = ["floor", *modules]
    for i in range(args.repeats):
        random.Random(i).shuffle(order)
        run: dict[str, tuple[float, float]] = {}
        for name in order:
            wall, cpu, lut = timed(floor if name == "floor" else lambda n=name: stage(n))
            run[name] = wall, cpu
            if lut is not None:
                run[f"{name} normaliser"] = lut
        runs.append(run)
        floor_s = run["floor"]
        print(f"repeat {i + 1}: floor {floor_s[0]:.2f} s ({floor_s[1]:.2f} cpu)" + "".join(
            f", {name} {run[name][0]:.2f} s ({run[name][1]:.2f} cpu, normaliser build "
            f"{run[name + ' normaliser'][1]:.2f}) = {run[name][0] / run['floor'][0]:.2f}x "
            f"({run[name][1] / run['floor'][1]:.2f}x cpu)" for name in modules), flush=True)

    summary: dict[str, object] = {}
    for name in modules:
        ratios = {"wall_ratio": [r[name][0] / r["floor"][0] for r in runs],
                  "cpu_ratio": [r[name][1] / r["floor"][1] for r in runs],
                  "cpu_ratio_without_normaliser_build": [
                      (r[name][1] - r[f"{name} normaliser"][1]) / r["floor"][1] for r in runs]}
        summary[name] = {k: statistics.median(v) for k, v in ratios.items()}
        m = summary[name]
        print(f"median {name} / floor: {m['wall_ratio']:.2f} wall, {m['cpu_ratio']:.2f} cpu, "
              f"{m['cpu_ratio_without_normaliser_build']:.2f} cpu without the normaliser build "
              f"(goal <= {GOAL}: {'met' if m['wall_ratio'] <= GOAL else 'NOT met'} on wall)")
    if args.baseline:
        new, old = (zarr.open_group(str(args.out / f"{n}.zarr"), mode="r")["image"]
                    for n in ("pyramid", "baseline"))
        same = [np.array_equal(new[str(k)][...], old[str(k)][...])
                for k in range(len(spec.context))]
        summary["levels_identical"] = all(same)
        print(f"levels identical to the baseline's: {same}")
    (args.out / "pyramid.json").write_text(json.dumps(
        {"size": args.size, "mpp": args.mpp, "workers": args.workers, "tiles": len(tiles),
         "runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
