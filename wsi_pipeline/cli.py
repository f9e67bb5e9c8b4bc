"""``wsi-run``: the pipeline from the command line.

    wsi-run PATH [PATH ...] --task TASK [--out DIR] [options]

Each PATH is a slide, a folder of slides (``--recursive`` descends) or a URL. Every slide
gets ``OUT/<slide-id>/`` (store.zarr, report.json, overlay.png); the run gets
``OUT/summary.csv``. Exit code 0 when every input succeeded, 1 when some failed (the others
still finished), 2 for a usage error. Expected failures print one line, no traceback.
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
    p.add_argument("paths", nargs="+", metavar="PATH", help="slide file, folder of slides, or URL")
    p.add_argument("--task", required=True, choices=TASK_NAMES, help="analysis to run")
    p.add_argument("--out", default="wsi-out", type=Path, help="output folder (default ./wsi-out)")
    p.add_argument("--until", default=STAGES[-1], choices=STAGES,
                   help=f"last stage to run (default {STAGES[-1]})")
    p.add_argument("--mpp", type=float, help="level-0 microns per pixel, overriding metadata")
    p.add_argument("--backend", default="auto", choices=("auto", "openslide", "tiffslide"))
    p.add_argument("--stain-backend", default="numpy", choices=("numpy", "torch", "staintools"),
                   help="stain normalisation: numpy (default), torch (GPU when present), "
                        "staintools (slow reference; pip install wsi_pipeline[staintools])")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=2, help="parallel tile workers (default 2)")
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
        if args.mpp is not None and not PLAUSIBLE_MPP[0] <= args.mpp <= PLAUSIBLE_MPP[1]:
            raise UsageError(f"--mpp {args.mpp} is outside {PLAUSIBLE_MPP[0]}-"
                             f"{PLAUSIBLE_MPP[1]} um/px")
        if args.device == "cuda":
            resolve_device("cuda")  # fails here, once, rather than on every slide
        task = get_task(args.task)
        out = prepare_output(args.out)
    except WsiError as exc:
        return _fail(exc)

    interactive = sys.stderr.isatty() and not args.quiet
    opts = RunOptions(out=out, until=args.until, mpp=args.mpp, backend=args.backend,
                      stain_backend=args.stain_backend, device=args.device,
                      workers=args.workers, force=args.force, show_progress=interactive,
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
               "diagnosis": "", "tissue_mm2": "", "tiles": "", "error": ""}
        try:
            if error is not None:
                raise error
            report = run_slide(path, task, slide_id, opts, log=log)
            row.update(status="ok" if report["complete"] else f"ok (until {opts.until})",
                       diagnosis=report["diagnosis"]["label"] or "",
                       tissue_mm2=report["areas_mm2"]["tissue"],
                       tiles=report["counts"]["tissue_tiles"])
            if not args.quiet:
                say(f"{slide_id}: {row['status']}; tissue {row['tissue_mm2']} mm2, "
                    f"{row['tiles']} tiles -> {out / slide_id}")
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
    fields = ["slide_id", "path", "task", "status", "diagnosis", "tissue_mm2", "tiles", "error"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "summary.csv", buf.getvalue().encode())


def _fail(exc: WsiError) -> int:
    print(f"{PROG}: error: {exc}", file=sys.stderr)
    return exc.exit_code


def _log_line(event: dict[str, Any]) -> None:
    print(json.dumps(event), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
