"""``wsi-run``: the pipeline from the command line.

    wsi-run PATH [PATH ...] --task TASK [--out DIR] [options]

Each PATH is a slide, a folder of slides (``--recursive`` descends) or a URL. Every slide
gets ``OUT/<slide-id>/`` (store.zarr, report.json, mask.ome.tif, objects.geojson,
overlay.png); the run gets ``OUT/summary.csv``. Exit code 0 when every input succeeded,
1 when some failed (the others still finished), 2 for a usage error. Expected failures
print one line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .batch import (
    Job,
    expand_inputs,
    format_pairs,
    run_job,
    summary_text,
    write_cases,
    write_summary,
)
from .errors import OutputNotWritable, UsageError, WsiError
from .pipeline import STAGES, RunOptions, resolve_device
from .runtime import RUNTIMES
from .slide import PLAUSIBLE_MPP
from .store import prepare_output
from .tasks import Task, get_plugin, task_names

PROG = "wsi-run"


DESCRIPTION = ("Analyse whole-slide images with a pathology task: tissue detection, stain "
               "normalisation, a multiscale pyramid, inference, stitching, measurements and "
               "a slide-level report.")
EXIT_CODES = """exit codes:
  0  every input succeeded
  1  some input could not be analysed (missing or unreadable file, not a slide, no MPP,
     no tissue, another task's results in its folder...): one line each, the others
     finished, OUT/summary.csv says which and why
  2  the command line is wrong: unknown option or task, bad value, no PATH, --out a file"""
EXAMPLES = """examples:
  wsi-run --demo --task fls                      the demo slide, bundled demo weights
  wsi-run slide.svs --task fls                   one slide -> wsi-out/slide/
  wsi-run slides/ --task mesangial --out results a folder -> results/summary.csv
  wsi-run list.csv --task liver                  a CSV list (path, patient_id, stain)
  wsi-run slide.svs --task fls --model classical weight-free focus count"""


def _epilog() -> str:
    tasks = [get_plugin(name) for name in task_names()]
    width = max(len(t.name) for t in tasks)
    lines = ["installed tasks:"] + [f"  {t.name:<{width}}  {t.spec.title}" for t in tasks]
    return "\n".join(lines) + "\n\n" + EXAMPLES + "\n\n" + EXIT_CODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="slide file, folder of slides, glob pattern, CSV list or URL (a case "
                        "folder for a case task)")
    p.add_argument("--demo", action="store_true",
                   help="run on the bundled demo slide of the task (synthesised on first "
                        "use into ~/.cache/wsi_pipeline)")
    p.add_argument("--task", metavar="TASK",
                   help="REQUIRED: the analysis to run (installed tasks below)")
    p.add_argument("--out", default="wsi-out", type=Path, help="output folder (default ./wsi-out)")
    p.add_argument("--until", default=STAGES[-1], choices=STAGES,
                   help=f"last stage to run (default {STAGES[-1]})")
    p.add_argument("--mpp", type=float, help="level-0 microns per pixel, overriding metadata")
    p.add_argument("--backend", default="auto", choices=("auto", "openslide", "tiffslide"))
    p.add_argument("--stain-backend", default="numpy", choices=("numpy", "torch", "staintools"),
                   help="stain normalisation: numpy (default), torch (GPU when present), "
                        "staintools (slow reference; pip install wsi_pipeline[staintools])")
    p.add_argument("--weights", type=Path,
                   help="checkpoint (.safetensors with its .json sidecar, or a folder); "
                        "default: the task's bundled demo weights")
    modes = {m: t for t in task_names() for m in get_plugin(t).modes}
    p.add_argument("--model", default="network", metavar="MODE",
                   help="network (default), or a task's weight-free mode: "
                        + "; ".join(f"{m} ({t}: {get_plugin(t).modes[m].description})"
                                    for m, t in modes.items()))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--runtime", default="auto", choices=RUNTIMES,
                   help="CPU inference runtime: auto (default: OpenVINO, else ONNX Runtime "
                        "when installed with the 'fast' extra, else torch), or one of them")
    p.add_argument("--batch-size", type=int, default=8, help="inference batch (default 8)")
    p.add_argument("--workers", type=int, default=2,
                   help="parallel tile workers and data-loader processes (default 2)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--patient-from", default="list", choices=("list", "folder"),
                   help="tasks with a patient rule (liver): how slides group into "
                        "patients for OUT/cases.csv: a CSV "
                        "list's patient_id column (default; other slides are a patient "
                        "each) or the folder holding each slide")
    p.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for a slide another wsi-run is writing (default 0: "
                        "skip it and say so)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the slides on a dask distributed cluster (tcp://host:8786); "
                        "default: here, one slide after another")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file of option defaults (keys named like the long options)")
    p.add_argument("--force", action="store_true", help="recompute finished stages")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        apply_config(parser, argv)
    except WsiError as exc:
        return _fail(exc)
    args = parser.parse_args(argv)  # exits 2 with argparse's own message
    try:
        if args.task is None:
            raise UsageError("--task is required (or task = \"...\" in --config)")
        if args.workers < 1:
            raise UsageError("--workers must be at least 1")
        if args.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if args.lock_wait < 0:
            raise UsageError("--lock-wait must be 0 or more seconds")
        if args.weights is not None and args.model != "network":
            raise UsageError(f"--weights and --model {args.model} exclude each other")
        if args.weights is not None and not args.weights.exists():
            raise UsageError(f"--weights {args.weights}: no such file or folder")
        if args.mpp is not None and not PLAUSIBLE_MPP[0] <= args.mpp <= PLAUSIBLE_MPP[1]:
            raise UsageError(f"--mpp {args.mpp} is outside {PLAUSIBLE_MPP[0]}-"
                             f"{PLAUSIBLE_MPP[1]} um/px")
        if args.device == "cuda" and args.scheduler is None:
            resolve_device("cuda")  # fails here, once, rather than on every slide
        task = get_plugin(args.task)
        if args.model != "network" and args.model not in task.modes:
            raise UsageError(f"--model {args.model}: task {task.name} runs "
                             f"{', '.join(('network', *task.modes))}")
        if not args.paths and not args.demo:
            raise UsageError("give at least one PATH (slide, folder, pattern, CSV list or "
                             "URL), or --demo")
        if args.demo:
            args.paths = [*args.paths, str(demo_input(task))]
        out = prepare_output(args.out)
    except WsiError as exc:
        return _fail(exc)

    interactive = sys.stderr.isatty() and not args.quiet and args.scheduler is None
    opts = RunOptions(out=out.resolve(), until=args.until, mpp=args.mpp, backend=args.backend,
                      stain_backend=args.stain_backend, device=args.device,
                      runtime=args.runtime,
                      workers=args.workers, batch_size=args.batch_size,
                      weights=args.weights.resolve() if args.weights else None,
                      model=args.model, force=args.force, show_progress=interactive,
                      argv=tuple(argv))
    log = None if args.quiet else _say_stage if interactive else _log_line
    jobs = expand_inputs(args.paths, task.spec.input_kind, args.recursive, args.patient_from)
    say = print
    rows: list[dict[str, Any]] = []
    current = None  # the slide in progress when Ctrl-C comes

    def finished(row: dict[str, Any]) -> None:
        rows.append(row)
        if row["status"] in ("failed", "locked", "skipped"):
            print(f"{PROG}: {'error' if row['status'] == 'failed' else 'skipped'}: "
                  f"{row['error']}", file=sys.stderr)
        elif not args.quiet and "_report" in row:
            say(_describe(row["slide_id"], row["_report"], out / row["slide_id"]))
        # kept current: a killed batch still says what finished (the page: every 10 slides)
        _save_summary(out, rows, page=len(rows) % 10 == 1)

    with _stop_on_sigterm() as stop_signal:
        try:
            if args.scheduler is not None:
                from .distributed import run_on_cluster

                run_on_cluster(jobs, task.name, opts, args.scheduler, on_row=finished,
                               lock_wait_s=args.lock_wait, log=log)
            else:
                todo = jobs
                if interactive and len(jobs) > 1:
                    from tqdm import tqdm

                    todo = tqdm(jobs, desc="slides", unit="slide", dynamic_ncols=True)
                    say = tqdm.write
                for job in todo:
                    current = job.slide_id
                    finished(run_job(job, task.name, opts, log=log, lock_wait_s=args.lock_wait,
                                     say=say))
        except KeyboardInterrupt:
            done = {r["slide_id"] for r in rows}
            _save_summary(out, [*rows, *(_not_run(j, task.name, "interrupted" if
                                                  j.slide_id == current else "not run")
                                         for j in jobs if j.slide_id not in done)])
            print(f"{PROG}: interrupted; finished stages are kept, rerun the same command to "
                  "resume", file=sys.stderr)
            return 128 + stop_signal.get("signum", signal.SIGINT)
        except WsiError as exc:  # the cluster itself: unreachable scheduler, lost workers
            return _fail(exc)
    _save_summary(out, rows)
    if not args.quiet and len(rows) > 1:
        print(summary_text(rows))
    _save_cases(out, task, quiet=args.quiet)
    bad = [r for r in rows if r["status"] in ("failed", "locked")]
    if bad and len(rows) > 1:
        print(f"{PROG}: {len(bad)} of {len(rows)} inputs did not finish; see "
              f"{out / 'summary.csv'}", file=sys.stderr)
    return 1 if bad else 0


def _save_summary(out: Path, rows: list[dict[str, Any]], page: bool = True) -> None:
    """write_summary and (``page``) the batch page, or one line when the output disk cannot
    take them (the slides' own folders are complete either way)."""
    from .batch_page import write_index

    try:
        write_summary(out, rows)
        if page:   # it reads every report.json: not after each slide of a large batch
            write_index(out)
    except OSError as exc:
        print(f"{PROG}: error: {out}: cannot write summary.csv / index.html "
              f"({exc.strerror or exc})", file=sys.stderr)


def _save_cases(out: Path, task: Task, quiet: bool) -> None:
    """``OUT/cases.csv`` for a task with a patient-level rule, a line per patient."""
    if task.patient_rule is None or not (out / "summary.csv").is_file():
        return
    try:
        cases = write_cases(out, task.patient_rule, task.name)
    except OSError as exc:
        print(f"{PROG}: error: {out / 'cases.csv'}: cannot write ({exc.strerror or exc})",
              file=sys.stderr)
        return
    if not quiet:
        print(f"{len(cases)} patient{'s' if len(cases) != 1 else ''} ({out / 'cases.csv'}): "
              + "; ".join(f"{c['patient_id']} {c['diagnosis'] or c['status']}" for c in cases))


@contextmanager
def _stop_on_sigterm() -> Iterator[dict[str, int]]:
    """While the block runs, SIGTERM (SLURM's time limit or pre-emption, ``kill``) stops
    like Ctrl-C: the slide in progress keeps its finished stages, a rerun resumes it."""
    received: dict[str, int] = {}

    def stop(signum: int, _frame: Any) -> None:
        received["signum"] = signum
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _not_run(job: Job, task: str, status: str) -> dict[str, Any]:
    return {"slide_id": job.slide_id, "path": job.path, "task": task, "status": status}


def apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``--config FILE`` (TOML): its keys, named like the long options (``batch_size`` or
    ``batch-size``), become defaults that the command line still overrides."""
    import tomllib

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return
    try:
        values = tomllib.loads(known.config.read_text())
    except OSError as exc:
        raise UsageError(f"--config {known.config}: cannot read ({exc.strerror or exc})"
                         ) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {known.config}: not valid TOML ({exc})") from exc
    dests = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in dests:
            raise UsageError(f"--config {known.config}: unknown option {key!r}")
        action = dests[dest]
        if action.choices is not None and value not in action.choices:
            raise UsageError(f"--config {known.config}: {key} = {value!r} is not one of "
                             f"{', '.join(map(str, action.choices))}")
        if action.type is not None and value is not None and not isinstance(value, list):
            value = action.type(value)
        defaults[dest] = value
    parser.set_defaults(**defaults)


def demo_input(task: Task) -> Path:
    """The task's demo input (a slide, or a case folder), written by the task's ``demo``
    hook on first use into the user's cache folder, aside and renamed (an interrupted
    synthesis leaves nothing half-written)."""
    import json
    import os
    import shutil
    import tempfile

    if task.demo is None:
        raise UsageError(f"task {task.name} has no demo input")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsi_pipeline"
    folder = cache / f"{task.name.replace('-', '_')}_demo"
    record = folder / "demo.json"   # the input's path inside the folder
    if record.is_file():
        path = folder / json.loads(record.read_text())["path"]
        if path.exists():
            return path
    import time

    print(f"{PROG}: writing the {task.name} demo input into {folder} (first use; a minute "
          "or two) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache))
        try:
            relative = task.demo(tmp).relative_to(tmp)
            (tmp / "demo.json").write_text(json.dumps({"path": str(relative)}))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise OutputNotWritable(f"{cache}: cannot write the demo input ({exc})") from exc
    print(f"{PROG}: demo input written in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    return folder / relative


def _describe(slide_id: str, report: dict[str, Any], folder: Path) -> str:
    """A few lines for the terminal: diagnosis, scores, counts and the files written."""
    diagnosis = report["diagnosis"]
    if not report["complete"]:
        return (f"{slide_id}: stopped after {report['stages_completed'][-1]}; tissue "
                f"{report['areas_mm2']['tissue']} mm2, {report['counts']['tissue_tiles']} "
                f"tiles -> {folder}")
    lines = [f"{slide_id}: {report['task']} diagnosis: {diagnosis['label']}"
             f" ({diagnosis.get('note', '')})"]
    if report["scores"]:
        lines.append(f"  scores: {format_pairs(report['scores'])}")
    lines.append(f"  counts: {format_pairs({k: v for k, v in report['counts'].items()})}")
    lines.append(f"  areas (mm2): {format_pairs(report['areas_mm2'])}")
    files = [folder / name for name in report.get("outputs") or ["report.json"]]
    lines.append("  files: " + ", ".join(str(f) for f in files if f.exists()))
    return "\n".join(lines)


def _fail(exc: WsiError) -> int:
    print(f"{PROG}: error: {exc}", file=sys.stderr)
    return exc.exit_code


def _say_stage(event: dict[str, Any]) -> None:
    """On a terminal: one line per finished stage (the bars show the long ones moving)."""
    from tqdm import tqdm

    if event["status"] == "done":
        tqdm.write(f"  {event['slide']}: {event['stage']:<8} {event['seconds']:7.1f} s",
                   file=sys.stderr)
    elif event["status"] == "reused":
        tqdm.write(f"  {event['slide']}: {event['stage']:<8}  reused (computed before in "
                   f"{event['first_run_seconds']:.1f} s)", file=sys.stderr)


def _log_line(event: dict[str, Any]) -> None:
    print(json.dumps(event), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
