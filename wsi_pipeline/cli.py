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
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

from .errors import NoSlidesFound, OutputNotWritable, SlideNotFound, UsageError, WsiError
from .run import STAGES, RunOptions, resolve_device, run_slide
from .slide import PLAUSIBLE_MPP, find_slides, is_url
from .store import atomic_write_bytes, prepare_output
from .tasks import TASK_NAMES, get_task

PROG = "wsi-run"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="PATH", help="slide file, folder of slides, or URL")
    p.add_argument("--demo", action="store_true",
                   help="run on the bundled demo slide of the task (synthesised on first "
                        "use into ~/.cache/wsi_pipeline)")
    p.add_argument("--task", required=True, choices=TASK_NAMES, help="analysis to run")
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
    p.add_argument("--model", default="network", choices=("network", "classical"),
                   help="network (default) or classical: fls foci as dense aggregates of "
                        "detected lymphocytes, no weights needed")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=8, help="inference batch (default 8)")
    p.add_argument("--workers", type=int, default=2,
                   help="parallel tile workers and data-loader processes (default 2)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--force", action="store_true", help="recompute finished stages")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # exits 2 with argparse's own message
    try:
        if args.workers < 1:
            raise UsageError("--workers must be at least 1")
        if args.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if args.weights is not None and args.model == "classical":
            raise UsageError("--weights and --model classical exclude each other")
        if args.weights is not None and not args.weights.exists():
            raise UsageError(f"--weights {args.weights}: no such file or folder")
        if args.mpp is not None and not PLAUSIBLE_MPP[0] <= args.mpp <= PLAUSIBLE_MPP[1]:
            raise UsageError(f"--mpp {args.mpp} is outside {PLAUSIBLE_MPP[0]}-"
                             f"{PLAUSIBLE_MPP[1]} um/px")
        if args.device == "cuda":
            resolve_device("cuda")  # fails here, once, rather than on every slide
        task = get_task(args.task)
        if not args.paths and not args.demo:
            raise UsageError("give at least one PATH (slide, folder or URL), or --demo")
        if args.demo:
            args.paths = [*args.paths, str(demo_slide(task.name))]
        out = prepare_output(args.out)
    except WsiError as exc:
        return _fail(exc)

    interactive = sys.stderr.isatty() and not args.quiet
    opts = RunOptions(out=out, until=args.until, mpp=args.mpp, backend=args.backend,
                      stain_backend=args.stain_backend, device=args.device,
                      workers=args.workers, batch_size=args.batch_size, weights=args.weights,
                      model=args.model, force=args.force, show_progress=interactive,
                      argv=tuple(argv))
    log = None if (args.quiet or interactive) else _log_line

    inputs = expand_inputs(args.paths, task.input_kind, args.recursive)
    rows: list[dict[str, Any]] = []
    say = print
    if interactive and len(inputs) > 1:
        from tqdm import tqdm

        inputs = tqdm(inputs, desc="slides", unit="slide", dynamic_ncols=True)
        say = tqdm.write
    for slide_id, path, error in inputs:
        row = {"slide_id": slide_id, "path": str(path), "task": task.name, "status": "ok",
               "diagnosis": "", "adequate": "", "scores": "", "counts": "", "tissue_mm2": "",
               "tiles": "", "error": ""}
        try:
            if error is not None:
                raise error
            report = run_slide(path, task, slide_id, opts, log=log)
            row.update(status="ok" if report["complete"] else f"ok (until {opts.until})",
                       diagnosis=report["diagnosis"]["label"] or "",
                       adequate=_blank(report["diagnosis"].get("adequate")),
                       scores=_pairs(report["scores"]),
                       counts=_pairs({k: v for k, v in report["counts"].items()
                                      if k != "tissue_tiles"}),
                       tissue_mm2=report["areas_mm2"]["tissue"],
                       tiles=report["counts"]["tissue_tiles"])
            if not args.quiet:
                say(_describe(slide_id, report, out / slide_id))
        except WsiError as exc:
            row.update(status="failed", error=str(exc))
            _fail(exc)
        except OSError as exc:  # disk full, permissions, a file vanishing mid-run
            error = OutputNotWritable(f"{path}: I/O error: {exc}")
            row.update(status="failed", error=str(error))
            _fail(error)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; finished stages are kept, rerun to resume",
                  file=sys.stderr)
            rows.append(row | {"status": "interrupted"})
            write_summary(out, rows)
            return 130
        rows.append(row)
    write_summary(out, rows)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed and len(rows) > 1:
        print(f"{PROG}: {len(failed)} of {len(rows)} inputs failed; see {out / 'summary.csv'}",
              file=sys.stderr)
    return 1 if failed else 0


DEMO_SLIDES = {"fls": {"label": "positive", "seed": 1, "width": 12000, "height": 9000}}


def demo_slide(task: str) -> Path:
    """The task's demo slide, synthesised on first use into the user's cache folder (a
    fixed seed that no demo weights were trained on)."""
    import os

    if task not in DEMO_SLIDES:
        raise UsageError(f"no demo slide for task {task} in this version")
    import shutil
    import tempfile

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsi_pipeline"
    stem = f"{task.replace('-', '_')}_demo"
    path = cache / stem / f"{stem}.svs"
    if path.exists():
        return path
    from .synth import write_slide

    print(f"{PROG}: synthesising the demo slide {path} (first use) ...", file=sys.stderr)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=cache))
        try:  # written aside and renamed: an interrupted synthesis leaves no half slide
            write_slide(task, tmp / path.name, mpp=0.5, **DEMO_SLIDES[task])
            shutil.rmtree(path.parent, ignore_errors=True)
            tmp.rename(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise OutputNotWritable(f"{cache}: cannot write the demo slide ({exc})") from exc
    return path


def expand_inputs(paths: list[str], input_kind: str, recursive: bool
                  ) -> list[tuple[str, str | Path, WsiError | None]]:
    """(slide_id, path, error) for every input; a bad PATH becomes an error entry so the
    batch goes on with the others."""
    found: list[tuple[str, str | Path, WsiError | None]] = []  # (name, path, error)
    for raw in paths:
        if is_url(raw):
            found.append((_stem(raw), raw, None))
            continue
        p = Path(raw)
        if not p.exists():
            found.append((p.name, p, SlideNotFound(f"{p}: no such file or folder")))
        elif p.is_dir() and input_kind == "case" and (p / "om").is_dir():
            slides = find_slides(p / "om")  # a case is named after its folder
            found.append((p.name, slides[0], None) if slides else
                         (p.name, p, NoSlidesFound(f"{p}: case folder has no slide in om/")))
        elif p.is_dir():
            slides = find_slides(p, recursive)
            if not slides:
                found.append((p.name, p, NoSlidesFound(
                    f"{p}: folder holds no slide files"
                    + ("" if recursive else " (use --recursive for sub-folders)"))))
            found.extend((_stem(s), s, None) for s in slides)
        else:
            found.append((_stem(p), p, None))
    ids = unique_ids([name for name, _, _ in found])
    return [(i, p, e) for i, (_, p, e) in zip(ids, found, strict=True)]


def _stem(path: str | Path) -> str:
    name = str(path).rstrip("/").split("/")[-1].split("?")[0]
    return name.rsplit(".", 1)[0] if "." in name else name


def safe_id(name: str) -> str:
    """A file-system-safe slide id: letters, digits, '.', '_' and '-' only, no leading dot."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "slide"
    return cleaned[:120]


def unique_ids(names: list[str]) -> list[str]:
    """Safe ids, with ``-2``, ``-3``... appended to repeats; unique even on a
    case-insensitive file system."""
    taken: set[str] = set()
    out = []
    for name in names:
        base = candidate = safe_id(name)
        n = 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{base}-{n}"
        taken.add(candidate.casefold())
        out.append(candidate)
    return out


def write_summary(out: Path, rows: list[dict[str, Any]]) -> None:
    """summary.csv: one row per input with its status and, for failures, the reason."""
    buf = io.StringIO()
    fields = ["slide_id", "path", "task", "status", "diagnosis", "adequate", "scores", "counts",
              "tissue_mm2", "tiles", "error"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "summary.csv", buf.getvalue().encode())


def _pairs(values: dict[str, Any]) -> str:
    return "; ".join(f"{k}={v}" for k, v in values.items() if v is not None)


def _blank(value: Any) -> Any:
    return "" if value is None else value


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
        lines.append(f"  scores: {_pairs(report['scores'])}")
    lines.append(f"  counts: {_pairs({k: v for k, v in report['counts'].items()})}")
    lines.append(f"  areas (mm2): {_pairs(report['areas_mm2'])}")
    files = [folder / name for name in report.get("outputs") or ["report.json"]]
    lines.append("  files: " + ", ".join(str(f) for f in files if f.exists()))
    return "\n".join(lines)


def _fail(exc: WsiError) -> int:
    print(f"{PROG}: error: {exc}", file=sys.stderr)
    return exc.exit_code


def _log_line(event: dict[str, Any]) -> None:
    print(json.dumps(event), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
