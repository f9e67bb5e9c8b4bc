"""Batches: from command-line PATHs to slide jobs, one job to one summary row, rows to
``summary.csv``.

A PATH is a slide, a folder (``recursive`` descends), a glob pattern (``slides/*.svs``,
``**`` descends), a CSV list (a ``path`` (or ``slide``) column, optional ``mpp``,
``slide_id``, ``patient_id`` and ``stain`` columns; relative paths are relative to the list)
or a URL. A slide listed with another stain than the task's is skipped, not analysed. A
bad PATH becomes a failed job, so the batch goes on with the others.
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    InputListError,
    NoSlidesFound,
    OutputNotWritable,
    SlideNotFound,
    WsiError,
)
from .lock import describe_holder, slide_lock
from .slide import PLAUSIBLE_MPP, find_slides, is_url
from .stain import STAIN_ALIASES, STAIN_NAMES, stain_key
from .store import atomic_write_bytes
from .tasks import PatientRule, get_plugin

if TYPE_CHECKING:  # the runner pulls in torch: not needed to list slides or write summaries
    from .pipeline import RunOptions

SUMMARY_FIELDS = ["slide_id", "path", "task", "status", "diagnosis", "adequate", "scores",
                  "counts", "tissue_mm2", "tiles", "seconds", "error", "patient_id"]


def case_fields(rule: PatientRule) -> list[str]:
    """The columns of ``cases.csv`` for a task's patient rule."""
    return ["patient_id", "task", "slides", "status", "diagnosis", *rule.columns, "slide_ids",
            "note", "error"]


@dataclass(frozen=True)
class Job:
    """One input of a batch: its output id, where to read it, an optional per-slide MPP
    override, or the error that stops it before it starts; the patient it belongs to
    (empty: a patient of its own); its stain as the list declares it (empty: unknown)."""

    slide_id: str
    path: str
    mpp: float | None = None
    error: WsiError | None = None
    patient_id: str = ""
    stain: str = ""


# -- PATHs -> jobs ---------------------------------------------------------------------------
def expand_inputs(paths: list[str], input_kind: str = "slide", recursive: bool = False,
                  patient_from: str = "list") -> list[Job]:
    """Jobs for every input, in the order given, with unique file-system-safe ids.

    patient_from  "list": a CSV list's ``patient_id`` column (other slides: a patient
                  each); "folder": the name of the folder holding the slide."""
    found: list[tuple[str, str, float | None, WsiError | None]] = []  # name, path, mpp, error
    patients: dict[int, tuple[str, str]] = {}  # index in found -> (patient, stain)
    for raw in paths:
        if is_url(raw):
            found.append((_stem(raw), raw, None, None))
            continue
        p = Path(raw)
        if not p.exists() and any(ch in raw for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(raw, recursive=True))]
            slides = [m for m in matches if m.is_file() and ".truth." not in m.name]
            if not slides:
                found.append((_stem(raw), raw, None,
                              NoSlidesFound(f"{raw}: the pattern matches no slide files")))
            found.extend((_stem(s), str(s), None, None) for s in slides)
        elif not p.exists():
            found.append((_stem(p), raw, None, SlideNotFound(f"{p}: no such file or folder")))
        elif p.is_file() and p.suffix.lower() == ".csv":
            for name, path, mpp, error, patient, stain in _read_list(p):
                patients[len(found)] = (patient, stain)
                found.append((name, path, mpp, error))
        elif p.is_dir() and input_kind == "case" and (p / "om").is_dir():
            found.append(_case_job(p))
        elif p.is_dir() and input_kind == "case" and _case_folders(p):
            found.extend(_case_job(c) for c in _case_folders(p))  # a folder of cases
        elif p.is_dir():
            slides = find_slides(p, recursive)
            if not slides:
                found.append((p.name, raw, None, NoSlidesFound(
                    f"{p}: folder holds no slide files"
                    + ("" if recursive else " (use --recursive for sub-folders)"))))
            found.extend((_stem(s), str(s), None, None) for s in slides)
        else:
            found.append((_stem(p), raw, None, None))
    ids = unique_ids([name for name, *_ in found])
    jobs = []
    for k, (slide_id, (_, path, mpp, error)) in enumerate(zip(ids, found, strict=True)):
        patient, stain = patients.get(k, ("", ""))
        if patient_from == "folder" and not is_url(path):
            patient = Path(path).parent.name
        jobs.append(Job(slide_id, path, mpp, error, patient, stain))
    return jobs


def _case_folders(folder: Path) -> list[Path]:
    """The case folders (sub-folders with om/) directly inside ``folder``, sorted."""
    return sorted(c for c in folder.iterdir() if (c / "om").is_dir())


def _case_job(case: Path) -> tuple[str, str, float | None, WsiError | None]:
    """A case folder's job: named after the folder, reading its om/ slide."""
    slides = find_slides(case / "om")
    return ((case.name, str(slides[0]), None, None) if slides else
            (case.name, str(case), None, NoSlidesFound(f"{case}: case folder has no slide "
                                                       "in om/")))


def _read_list(csv_path: Path
               ) -> list[tuple[str, str, float | None, WsiError | None, str, str]]:
    """Rows of a CSV slide list: (name, path, mpp, error, patient_id, stain) from the
    columns ``path`` (required), ``mpp``, ``slide_id``, ``patient_id`` and ``stain``."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        return [(csv_path.stem, str(csv_path), None,
                 InputListError(f"{csv_path}: cannot read the slide list ({exc})"), "", "")]
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    key = "path" if "path" in columns else "slide"  # "slide": a wsi-synth cohort list
    if key not in columns:
        return [(csv_path.stem, str(csv_path), None, InputListError(
            f"{csv_path}: a slide list needs a 'path' column (found: "
            f"{', '.join(columns) or 'nothing'})"), "", "")]
    rows = []
    for line, record in enumerate(reader, start=2):
        record = {(k or "").strip().lower(): (v or "").strip() for k, v in record.items()}
        raw = record.get(key, "")
        if not raw:
            continue
        path = raw if is_url(raw) or Path(raw).is_absolute() else str(csv_path.parent / raw)
        name = record.get("slide_id") or _stem(raw)
        mpp, error = None, None
        if record.get("mpp"):
            try:
                mpp = float(record["mpp"])
                if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
                    raise ValueError
            except ValueError:
                mpp, error = None, InputListError(
                    f"{csv_path} line {line}: mpp {record['mpp']!r} is not a number in "
                    f"{PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} um/px")
        if error is None and not is_url(path) and not Path(path).exists():
            error = SlideNotFound(f"{path}: no such file (listed in {csv_path} line {line})")
        stain = record.get("stain", "")
        if error is None and stain and stain_key(stain) is None:
            error = InputListError(f"{csv_path} line {line}: stain {stain!r} is not one of "
                                   f"{', '.join(STAIN_ALIASES)}")
        rows.append((name, path, mpp, error, record.get("patient_id", ""),
                     stain_key(stain) or ""))
    if not rows:
        return [(csv_path.stem, str(csv_path), None,
                 NoSlidesFound(f"{csv_path}: the slide list has no rows"), "", "")]
    return rows


def _stem(path: str | Path) -> str:
    name = str(path).rstrip("/").split("/")[-1].split("?")[0]
    return name.rsplit(".", 1)[0] if "." in name else name


def safe_id(name: str) -> str:
    """A file-system-safe slide id: letters, digits, '.', '_' and '-' only, no leading dot
    (so never '..' or a path separator: nothing is written outside ``--out``)."""
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


_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the output's fault, not the slide's


# -- one job -> one summary row --------------------------------------------------------------
def run_job(job: Job, task_name: str, opts: RunOptions,
            log: Callable[[dict[str, Any]], None] | None = None, lock_wait_s: float = 0.0,
            say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one slide under its output lock and return its ``summary.csv`` row.

    Expected failures become ``status="failed"`` rows with a one-line reason; a slide
    another process holds becomes ``status="locked"``. ``KeyboardInterrupt`` propagates.
    """
    import time

    from .pipeline import run_slide

    task = get_plugin(task_name)
    row: dict[str, Any] = {f: "" for f in SUMMARY_FIELDS}
    row.update(slide_id=job.slide_id, path=job.path, task=task.name, status="ok",
               patient_id=job.patient_id)
    started = time.perf_counter()
    try:
        if job.error is not None:
            raise job.error
        if job.stain and job.stain != task.spec.stain:
            row.update(status="skipped", error=f"listed as {STAIN_NAMES[job.stain]}; task "
                       f"{task.name} analyses {STAIN_NAMES[task.spec.stain]} slides")
            return row
        job_opts = opts if job.mpp is None else replace(opts, mpp=job.mpp)
        with slide_lock(opts.out / job.slide_id, wait_s=lock_wait_s) as taken:
            if taken.get("stale") and say:
                say(f"{job.slide_id}: cleared a stale lock left by "
                    f"{describe_holder(taken['stale'])} (that process is gone)")
            report = run_slide(job.path, task, job.slide_id, job_opts, log=log)
        row.update(report_row(report), path=job.path, patient_id=job.patient_id,
                   _report=report)
    except WsiError as exc:
        from .errors import SlideLocked

        row.update(status="locked" if isinstance(exc, SlideLocked) else "failed",
                   error=str(exc), _exception=exc)
    except OSError as exc:  # disk full, permissions, a file vanishing mid-run
        where = opts.out / job.slide_id if exc.errno in _OUTPUT_ERRNOS else job.path
        error = OutputNotWritable(f"{where}: I/O error: {exc.strerror or exc}")
        row.update(status="failed", error=str(error), _exception=error)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def report_row(report: dict[str, Any]) -> dict[str, Any]:
    """The ``summary.csv`` row of one ``report.json``.

    ``seconds`` is the compute time of the slide's stages as the report records them
    (stages reused from an earlier run count with the time they took then).
    """
    counts = report.get("counts") or {}
    diagnosis = report.get("diagnosis") or {}
    stages = report.get("stages_completed") or []
    timings = (report.get("provenance") or {}).get("stage_timings") or {}
    row: dict[str, Any] = {f: "" for f in SUMMARY_FIELDS}
    row.update(
        slide_id=report["slide"]["id"], path=report["slide"]["path"], task=report["task"],
        status="ok" if report.get("complete") else
        f"ok (until {stages[-1] if stages else '?'})",
        diagnosis=diagnosis.get("label") or "", adequate=_blank(diagnosis.get("adequate")),
        scores=format_pairs(report.get("scores") or {}),
        counts=format_pairs({k: v for k, v in counts.items() if k != "tissue_tiles"}),
        tissue_mm2=_blank((report.get("areas_mm2") or {}).get("tissue")),
        tiles=_blank(counts.get("tissue_tiles")),
        seconds=round(sum(t.get("seconds", 0.0) for t in timings.values()), 1))
    return row


# -- rows -> summary.csv and a few lines for the terminal -------------------------------------
GAP_ONLY = ("locked", "not run")  # statuses that never replace a row another run wrote


def write_summary(out: Path, rows: list[dict[str, Any]]) -> None:
    """Merge ``rows`` into ``OUT/summary.csv``: one row per slide id and task that any run
    into this folder has seen, updated by this run's rows. A slide folder holds one task's
    results, so a finished row of one task drops the other tasks' rows of that slide
    (``--force`` replaced their results).

    Several ``wsi-run`` processes may share an output folder (two terminals, a SLURM
    array): a lock serialises their read-merge-write, and a row that only says a slide was
    locked or not run never replaces what another run recorded for it.
    """
    import fcntl

    path = out / "summary.csv"
    with open(out / ".summary.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                merged = {(r["slide_id"], r.get("task") or ""): r for r in csv.DictReader(f)
                          if r.get("slide_id")}
        for row in rows:
            key = (row["slide_id"], row.get("task") or "")
            if row["status"] in GAP_ONLY and any(
                    k[0] == key[0] and (k[1] == key[1] or not key[1]) for k in merged):
                continue   # (a row without a task stands for any task of that slide)
            if row["status"].startswith("ok"):
                for other in [k for k in merged if k[0] == key[0] and k != key]:
                    del merged[other]
            merged[key] = row
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore",
                                restval="")
        writer.writeheader()
        writer.writerows(merged.values())
        atomic_write_bytes(path, buf.getvalue().encode())


def write_cases(out: Path, rule: PatientRule, task_name: str) -> list[dict[str, Any]]:
    """``OUT/cases.csv`` for a task with a patient-level rule (``rule``, e.g.
    the liver's r over all of a patient's slides): one row per patient of the merged
    ``summary.csv`` (a slide without ``patient_id`` is a patient of its own), from the
    ``report.json`` of its slides. Only rows (and reports) of ``task_name`` count: other
    tasks' slides in the same ``--out`` never enter the rule.

    A patient with a slide that has not finished gets status "incomplete" and no
    diagnosis: a partial patient never looks complete. A slide listed with another stain
    (skipped: a patient with slides of different stains) is left out of the patient's rule
    and the note says so; with no slide left the patient gets status "stain mismatch" and
    no diagnosis. A slide whose stain fit only looks like another stain
    (``quality.stain_warning``, a weak cue) counts, with the warning in the note."""
    import json

    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        slides = [r for r in csv.DictReader(f) if r.get("task") == task_name]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in slides:
        groups.setdefault(r.get("patient_id") or r["slide_id"], []).append(r)
    fields = case_fields(rule)
    cases = []
    for patient, members in groups.items():
        case = {f: "" for f in fields}
        case.update(patient_id=patient, task=task_name, slides=len(members),
                    slide_ids=" ".join(m["slide_id"] for m in members))
        reports, missing, off_stain, warned = [], [], [], []
        for m in members:
            if m["status"] == "skipped":
                off_stain.append(f"{m['slide_id']} ({m['error']})")
                continue
            path = out / m["slide_id"] / "report.json"
            done = m["status"] == "ok" and path.is_file()
            report = json.loads(path.read_text()) if done else None
            if not report or not report.get("complete") or report.get("task") != task_name:
                missing.append(m["slide_id"])
            else:
                reports.append(report)
                if (report.get("quality") or {}).get("stain_warning"):
                    warned.append(f"{m['slide_id']}: {report['quality']['stain_warning']}")
        notes = (["left out, listed with another stain: " + "; ".join(off_stain)]
                 if off_stain else []) + warned
        case["note"] = " | ".join(notes)
        if missing:
            case.update(status="incomplete",
                        error=f"slide(s) not finished: {', '.join(missing)}")
        elif not reports:
            case.update(status="stain mismatch", error="no slide of the expected stain")
        else:
            result = rule.rule(reports)
            case.update(status="ok", diagnosis=result["diagnosis"],
                        **{k: _blank(result.get(k)) for k in rule.columns})
        cases.append(case)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(cases)
    atomic_write_bytes(out / "cases.csv", buf.getvalue().encode())
    return cases


def summary_text(rows: list[dict[str, Any]]) -> str:
    """A short table: one line per slide with status, diagnosis and key counts."""
    statuses: dict[str, int] = {}
    for r in rows:
        key = r["status"].split(" ")[0]
        statuses[key] = statuses.get(key, 0) + 1
    head = (f"{len(rows)} input{'s' if len(rows) != 1 else ''}: "
            + ", ".join(f"{n} {s}" for s, n in statuses.items()))
    width = max([len(r["slide_id"]) for r in rows] + [8])
    lines = [head]
    for r in rows:
        inadequate = "INADEQUATE" if r.get("adequate") in (False, "False") else ""
        detail = r["error"] if r["error"] else "; ".join(
            str(v) for v in (r["diagnosis"], inadequate, r["scores"], r["counts"]) if v)
        lines.append(f"  {r['slide_id']:<{width}}  {r['status']:<8}  {detail}")
    return "\n".join(lines)


def format_pairs(values: dict[str, Any]) -> str:
    return "; ".join(f"{k}={v}" for k, v in values.items() if v is not None)


def _blank(value: Any) -> Any:
    return "" if value is None else value
