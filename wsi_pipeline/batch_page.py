"""``OUT/index.html``: the page a person opens after a batch.

One row per slide (or case) of ``OUT/summary.csv``: the overlay thumbnail (a click opens
it full size), task, status, diagnosis, adequacy, key scores and counts, and warnings (the
stain check, an out-of-distribution flag, demo weights, the error of a failed slide); for
each task with a main score, a bar chart of that score across its slides. Self-contained:
inline CSS and SVG, no script or font from the network; images are the slides' own
``overlay.png`` files, linked relatively, so the folder can be moved or zipped as is.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

from .store import atomic_write_bytes
from .tasks import get_plugin, task_names

CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0}
td.thumb img{width:160px;max-height:160px;object-fit:contain;border:1px solid #ccc}
td.thumb.missing::after{content:"no overlay";color:#999}
.ok{color:#0a6e31}.failed{color:#b00020;font-weight:600}.other{color:#8a6d00}
.warn{color:#b00020}.note{color:#666;font-size:.9em}
.plots{display:flex;flex-wrap:wrap;gap:2em;margin:1em 0}
figure{margin:0}figcaption{font-weight:600;margin-bottom:.3em}
"""


def write_index(out: Path) -> Path:
    """Write ``out/index.html`` from ``out/summary.csv`` and each slide's report.json;
    return its path."""
    rows = _summary_rows(out)
    reports = {(r["slide_id"], r["task"]): _report(out, r) for r in rows}
    counts: dict[str, int] = {}
    for r in rows:
        key = r["status"].split(" ")[0]
        counts[key] = counts.get(key, 0) + 1
    head = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no slides yet"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>wsi_pipeline results: {html.escape(out.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>wsi_pipeline results</h1><p class='note'>{html.escape(str(out.resolve()))}: "
        f"{len(rows)} input{'s' if len(rows) != 1 else ''} ({html.escape(head)}). Click a "
        "thumbnail for the full overlay; report.json, objects.geojson and mask.ome.tif are "
        "in each slide's folder.</p>",
        _plots(rows, reports),
        "<table><thead><tr><th>overlay</th><th>slide</th><th>task</th><th>status</th>"
        "<th>diagnosis</th><th>adequate</th><th>scores</th><th>counts</th>"
        "<th>warnings</th></tr></thead><tbody>",
        *(_row(r, reports[(r["slide_id"], r["task"])], out) for r in rows),
        "</tbody></table></body></html>\n",
    ]
    path = out / "index.html"
    atomic_write_bytes(path, "\n".join(p for p in parts if p).encode())
    return path


def _summary_rows(out: Path) -> list[dict[str, str]]:
    try:
        with open(out / "summary.csv", newline="", encoding="utf-8") as f:
            return [r for r in csv.DictReader(f) if r.get("slide_id")]
    except OSError:
        return []


def _report(out: Path, row: dict[str, str]) -> dict[str, Any]:
    """The slide's report.json when it belongs to this row's task, else {}."""
    try:
        report = json.loads((out / row["slide_id"] / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if report.get("task") == row["task"] else {}


def warnings_of(row: dict[str, str], report: dict[str, Any]) -> list[str]:
    """The warnings a person must see beside a result."""
    found = []
    if row["status"] == "failed" or row.get("error"):
        found.append(row.get("error") or "failed")
    quality = report.get("quality") or {}
    if quality.get("stain_warning"):
        found.append(f"stain: {quality['stain_warning']}")
    ood = quality.get("out_of_distribution") or {}
    if ood.get("flag"):
        found.append(f"out of distribution: {ood.get('why') or 'unlike the training data'}")
    provenance = report.get("provenance") or {}
    if any((provenance.get(m) or {}).get("demo") for m in ("model", "classifier")):
        found.append("made with demo weights (synthetic training data): not for diagnosis")
    return found


def _row(row: dict[str, str], report: dict[str, Any], out: Path) -> str:
    slide_id = html.escape(row["slide_id"])
    overlay = out / row["slide_id"] / "overlay.png"
    thumb = (f"<td class='thumb'><a href='{slide_id}/overlay.png'><img loading='lazy' "
             f"src='{slide_id}/overlay.png' alt='overlay of {slide_id}' "
             "onerror=\"this.parentNode.parentNode.classList.add('missing');"
             "this.parentNode.remove()\"></a></td>"
             if overlay.is_file() else "<td class='thumb missing'></td>")
    status = row["status"]
    kind = "ok" if status.startswith("ok") else "failed" if status == "failed" else "other"
    diagnosis = report.get("diagnosis") or {}
    adequate = diagnosis.get("adequate", row.get("adequate"))
    warnings = warnings_of(row, report)
    cells = [
        thumb,
        f"<td><a href='{slide_id}/report.json'>{slide_id}</a></td>"
        if report else f"<td>{slide_id}</td>",
        f"<td>{html.escape(row['task'])}</td>",
        f"<td class='{kind}'>{html.escape(status)}</td>",
        f"<td><b>{html.escape(str(diagnosis.get('label') or row.get('diagnosis') or ''))}</b>"
        f"<div class='note'>{html.escape(str(diagnosis.get('note') or ''))}</div></td>",
        f"<td class='{'warn' if adequate in (False, 'False') else ''}'>"
        f"{'no' if adequate in (False, 'False') else 'yes' if adequate in (True, 'True') else ''}"
        "</td>",
        f"<td>{_pairs(report.get('scores'), row.get('scores'))}</td>",
        f"<td>{_pairs(report.get('counts'), row.get('counts'))}</td>",
        "<td class='warn'>" + "<br>".join(html.escape(w) for w in warnings) + "</td>",
    ]
    return f"<tr data-slide='{slide_id}' data-status='{html.escape(kind)}'>" + "".join(cells) \
        + "</tr>"


def _pairs(values: dict[str, Any] | None, fallback: str | None) -> str:
    if values:
        return "<br>".join(f"{html.escape(k)} = {html.escape(str(v))}"
                           for k, v in values.items() if v is not None)
    return html.escape(fallback or "").replace("; ", "<br>")


def _plots(rows: list[dict[str, str]], reports: dict[tuple[str, str], dict]) -> str:
    """A bar chart of each task's main score across its finished slides (inline SVG)."""
    installed = set(task_names(trainable=True))
    figures = []
    for task in dict.fromkeys(r["task"] for r in rows):
        key = get_plugin(task, trainable=True).main_score if task in installed else None
        points = [(r["slide_id"], reports[(r["slide_id"], task)].get("scores", {}).get(key))
                  for r in rows if r["task"] == task and key]
        points = [(s, float(v)) for s, v in points if isinstance(v, int | float)]
        if points:
            figures.append(bar_chart_svg(points, f"{task}: {key}"))
    return f"<div class='plots'>{''.join(figures)}</div>" if figures else ""


def bar_chart_svg(points: list[tuple[str, float]], title: str, bar_px: int = 28,
                  height_px: int = 180) -> str:
    """A small inline-SVG bar chart of (label, value) pairs, labelled, zero-based."""
    top = max([v for _, v in points] + [0.0]) or 1.0
    width = 50 + bar_px * len(points) * 3 // 2
    bars = []
    for i, (label, value) in enumerate(points):
        h = max(value, 0.0) / top * (height_px - 50)   # room for the value above
        x = 40 + i * bar_px * 3 // 2
        y = height_px - 30 - h
        bars.append(f"<rect x='{x}' y='{y:.1f}' width='{bar_px}' height='{h:.1f}' "
                    f"fill='#0072b2'><title>{html.escape(label)}: {value:g}</title></rect>"
                    f"<text x='{x + bar_px / 2}' y='{y - 3:.1f}' font-size='10' "
                    f"text-anchor='middle'>{value:.3g}</text>"
                    f"<text x='{x + bar_px / 2}' y='{height_px - 16}' font-size='10' "
                    f"text-anchor='middle'>{html.escape(label[:8])}</text>")
    axis = (f"<line x1='36' y1='{height_px - 30}' x2='{width}' y2='{height_px - 30}' "
            "stroke='#444'/>")
    return (f"<figure><figcaption>{html.escape(title)}</figcaption><svg "
            f"xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height_px}' "
            f"role='img' aria-label='{html.escape(title)}'>{axis}{''.join(bars)}</svg>"
            "</figure>")
