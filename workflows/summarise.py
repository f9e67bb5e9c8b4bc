"""Merge per-slide ``report.json`` files into ``OUT/summary.csv``: the Snakemake workflow's
last rule, also usable by hand after a SLURM array run.

    python workflows/summarise.py --out OUT OUT/*/report.json
    python workflows/summarise.py --out OUT --failed TASK SLIDE_ID PATH REASON

The rows have wsi-run's own columns (``wsi_pipeline.batch.SUMMARY_FIELDS``) and are merged
by ``write_summary``, under the same lock, into whatever ``summary.csv`` the wsi-run jobs
kept there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wsi_pipeline.batch import report_row, write_summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="wsi-run output folder")
    p.add_argument("--failed", nargs=4, metavar=("TASK", "SLIDE_ID", "PATH", "REASON"),
                   help="record a slide that failed before wsi-run could start it")
    p.add_argument("reports", nargs="*", type=Path, metavar="REPORT", help="report.json files")
    args = p.parse_args(argv)
    if not args.reports and not args.failed:
        p.error("give REPORT files or --failed")
    rows = []
    if args.failed:
        task, slide_id, path, reason = args.failed
        rows.append({"slide_id": slide_id, "path": path, "task": task, "status": "failed",
                     "error": reason})
    for path in args.reports:
        try:
            rows.append(report_row(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"summarise: error: {path}: not a readable wsi-run report ({exc})",
                  file=sys.stderr)
            return 1
    args.out.mkdir(parents=True, exist_ok=True)
    write_summary(args.out, rows)
    if args.reports:
        print(f"summarise: {len(rows)} slides -> {args.out / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
