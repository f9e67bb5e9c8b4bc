#!/usr/bin/env bash
# One wsi-run per SLURM array task, over the entries of a slide list.
#
#   mkdir -p logs
#   n=$(SLIDE_LIST=slides.csv TASK=fls bash workflows/slurm_array.sh --count)
#   SLIDE_LIST=slides.csv TASK=fls OUTDIR=wsi-out EXTRA_ARGS="--model classical" \
#       sbatch --array=1-"$n"%20 workflows/slurm_array.sh
#
# Environment (sbatch passes the submitting shell's environment on):
#   SLIDE_LIST  required: a text file with one slide path or URL per line (blank lines and
#               '#' lines skipped), or a CSV list (a path column, optional mpp, slide_id)
#   TASK        required: fls, liver, kidney-layer, mesangial, glomerular-dx
#   OUTDIR      wsi-run --out (default wsi-out)
#   EXTRA_ARGS  further wsi-run options, e.g. "--model classical" or "--until pyramid"
#   DEVICE      wsi-run --device (default auto)
#   WORKERS     wsi-run --workers (default: SLURM_CPUS_PER_TASK, else 2)
#   LOCK_WAIT   seconds to wait for a slide folder another process holds (default 120)
#   WSI_RUN     the wsi-run command (default: wsi-run on PATH, e.g. an activated venv)
#
# Task N runs entry N (1-based, data rows of a CSV). Relative paths in either list are
# relative to the list's folder. Slide ids are wsi-run's own for the whole list, so the
# outputs are those of `wsi-run SLIDE_LIST --out OUTDIR` and of the Snakemake workflow.
# Requeue-safe: a requeued or resubmitted task resumes, reusing every finished stage.
# Logs: SLURM's logs/wsi-run_<job>_<task>.out (this script's lines) and
# OUTDIR/.workflow/logs/<slide-id>.log (wsi-run's, appended across attempts).
# Exit code: wsi-run's (0 done, 1 the slide failed, 2 usage error).
#
#SBATCH --job-name=wsi-run
#SBATCH --array=1-1
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=logs/wsi-run_%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
## one GPU per task: uncomment (and set DEVICE=cuda)
##SBATCH --gpus=1

set -euo pipefail

usage() {
    echo "slurm_array.sh: error: $1" >&2
    echo "usage: SLIDE_LIST=list.csv TASK=fls [OUTDIR=wsi-out] [EXTRA_ARGS=...]" \
         "sbatch --array=1-N workflows/slurm_array.sh" >&2
    echo "       (by hand: SLURM_ARRAY_TASK_ID=N bash workflows/slurm_array.sh;" \
         "N for a list: ... bash workflows/slurm_array.sh --count)" >&2
    exit 2
}

[[ -n "${SLIDE_LIST:-}" ]] || usage "SLIDE_LIST is not set (a text or CSV list of slides)"
[[ -f "$SLIDE_LIST" ]] || usage "SLIDE_LIST=$SLIDE_LIST: no such file"
[[ -n "${TASK:-}" ]] || usage "TASK is not set (fls, liver, kidney-layer, mesangial, glomerular-dx)"
OUTDIR=${OUTDIR:-wsi-out}
EXTRA_ARGS=${EXTRA_ARGS:-}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-2}}
LOCK_WAIT=${LOCK_WAIT:-120}
WSI_RUN=${WSI_RUN:-wsi-run}
command -v "$WSI_RUN" >/dev/null ||
    usage "$WSI_RUN not found: activate the environment that has wsi_pipeline before sbatch, or set WSI_RUN"
# the interpreter of wsi-run's environment, to read the list with wsi_pipeline's own code
PYTHON=$(head -n1 "$(command -v "$WSI_RUN")" | sed -n 's/^#!//p')
[[ -x "$PYTHON" ]] || PYTHON=python3

# Entry N of the list -> "<slide-id><TAB><one-row CSV list for wsi-run>": the one-row list
# carries the id (unique over the whole list), absolute path and mpp, so wsi-run writes
# OUTDIR/<slide-id>/ exactly as for the whole list. A bad entry exits 1 with the reason.
pick() {
    "$PYTHON" - "$SLIDE_LIST" "$TASK" "$OUTDIR" "$1" <<'EOF'
import csv, io, os, sys
from pathlib import Path

from wsi_pipeline.batch import expand_inputs
from wsi_pipeline.errors import WsiError
from wsi_pipeline.slide import is_url
from wsi_pipeline.store import atomic_write_bytes
from wsi_pipeline.tasks import get_task

listing, task, out, which = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
try:
    kind = get_task(task).input_kind
except WsiError as exc:
    sys.exit(f"slurm_array.sh: error: {exc}")
if listing.suffix.lower() == ".csv":
    jobs = expand_inputs([str(listing)], kind)
    if len(jobs) == 1 and jobs[0].error is not None and jobs[0].path == str(listing):
        sys.exit(f"slurm_array.sh: error: {jobs[0].error}")  # the list itself is unusable
else:
    lines = [s.strip() for s in listing.read_text().splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    lines = [s if is_url(s) or os.path.isabs(s) else str(listing.parent / s) for s in lines]
    jobs = expand_inputs(lines, kind)
    if len(jobs) != len(lines):
        sys.exit(f"slurm_array.sh: error: {listing}: each line must name one slide file or "
                 "URL (a folder or pattern expands to several; list its slides instead)")
if which == "count":
    print(len(jobs))
    sys.exit(0)
n = int(which)
if not 1 <= n <= len(jobs):
    sys.exit(f"slurm_array.sh: error: array task {n}, but {listing} has {len(jobs)} slides "
             f"(submit with --array=1-{len(jobs)})")
job = jobs[n - 1]
if job.error is not None:
    from wsi_pipeline.batch import write_summary

    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, [{"slide_id": job.slide_id, "path": job.path, "task": task,
                         "status": "failed", "error": str(job.error)}])
    sys.exit(f"wsi-run: error: {job.error}")
path = job.path if is_url(job.path) else os.path.abspath(job.path)
rows = out / ".workflow" / "rows" / f"{job.slide_id}.csv"
rows.parent.mkdir(parents=True, exist_ok=True)
buf = io.StringIO()
csv.writer(buf, lineterminator="\n").writerows(
    [("path", "slide_id", "mpp"), (path, job.slide_id, "" if job.mpp is None else job.mpp)])
atomic_write_bytes(rows, buf.getvalue().encode())
print(f"{job.slide_id}\t{rows}")
EOF
}

if [[ "${1:-}" == "--count" ]]; then
    pick count
    exit 0
fi
[[ "${SLURM_ARRAY_TASK_ID:-}" =~ ^[0-9]+$ ]] ||
    usage "SLURM_ARRAY_TASK_ID is not set: submit with sbatch --array=1-N, or set it by hand"

picked=$(pick "$SLURM_ARRAY_TASK_ID") || exit 1
slide_id=${picked%%$'\t'*}
rows=${picked#*$'\t'}
log_dir="$OUTDIR/.workflow/logs"
mkdir -p "$log_dir"
log="$log_dir/$slide_id.log"
attempt="job ${SLURM_ARRAY_JOB_ID:-?} task $SLURM_ARRAY_TASK_ID (restart ${SLURM_RESTART_COUNT:-0})"
echo "$(date '+%F %T') $attempt on $(hostname): $slide_id -> $OUTDIR/$slide_id (log $log)"
echo "== $(date '+%F %T') $attempt on $(hostname)" >> "$log"

read -r -a extra <<< "$EXTRA_ARGS"  # several options, split on blanks (no globbing)
rc=0
"$WSI_RUN" "$rows" --task "$TASK" --out "$OUTDIR" --device "$DEVICE" --workers "$WORKERS" \
    --lock-wait "$LOCK_WAIT" "${extra[@]}" >> "$log" 2>&1 || rc=$?
if [[ $rc -eq 0 ]]; then
    echo "$(date '+%F %T') $slide_id: done"
else
    echo "$(date '+%F %T') $slide_id: wsi-run exited $rc; last lines of $log:" >&2
    tail -n 5 "$log" >&2
fi
exit "$rc"
