"""Pooling the slides' statistics into metrics with bootstrap intervals, and writing
``eval.json``, ``eval.csv`` and the plots."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputNotWritable
from ..store import atomic_write_bytes, atomic_write_json
from .compare import Stats
from .metrics import STATISTICS, bland_altman, bootstrap_ci, confusion_matrix, metric_value

POOLED_ROW = "(pooled)"   # the slide column of the pooled rows of eval.csv


def _clean(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def _count(value: float) -> int | float | None:
    """A statistic as JSON: whole numbers (pixel and object counts) as integers."""
    value = float(value)
    return int(value) if value.is_integer() else _clean(value)


def pool(slides: Sequence[str], per_slide: Sequence[Stats], n_boot: int, seed: int
         ) -> tuple[dict[str, dict[str, Any]], list[dict[str, dict[str, Any]]]]:
    """(metrics, per-slide metrics): every metric pooled over the slides that have its
    statistics (summed, then the metric taken), with a percentile bootstrap 95% interval
    over those slides (``n_boot`` resamples; each statistics group resamples with a
    generator seeded ``seed``, so P/R/F1 of one group share their resamples)."""
    groups = sorted({g for stats in per_slide for g in stats})
    metrics: dict[str, dict[str, Any]] = {}
    slide_metrics: list[dict[str, dict[str, Any]]] = [{} for _ in slides]
    for group in groups:
        have = [i for i, stats in enumerate(per_slide) if group in stats]
        table = np.stack([per_slide[i][group][0] for i in have]).astype(np.float64)
        for name, kind in per_slide[have[0]][group][1]:
            ci = bootstrap_ci(kind, table, n_boot, np.random.default_rng(seed))
            entry: dict[str, Any] = {"value": _clean(metric_value(kind, table.sum(0))),
                                     "ci95": None if ci is None else [_clean(v) for v in ci],
                                     "slides": len(have)}
            if kind == "bland_altman":
                agreement = bland_altman(table[:, 0], table[:, 1])
                entry.update(sd=_clean(agreement["sd"]),
                             limits95=None if agreement["limits95"] is None
                             else [_clean(v) for v in agreement["limits95"]])
            else:
                stat_names = STATISTICS[kind][0]
                entry.update({s: _count(v) for s, v in zip(stat_names, table.sum(0),
                                                           strict=True)})
            metrics[name] = entry
            for i, row in zip(have, table, strict=True):
                one = {"value": _clean(metric_value(kind, row))}
                if kind == "bland_altman":
                    one.update(pred=_clean(row[0]), truth=_clean(row[1]))
                else:
                    one.update({s: _count(v) for s, v in zip(STATISTICS[kind][0], row,
                                                              strict=True)})
                slide_metrics[i][name] = one
    return dict(sorted(metrics.items())), slide_metrics


def diagnosis_confusion(truth: Sequence[str], pred: Sequence[str]) -> dict[str, Any] | None:
    """{"labels", "matrix" (rows truth, columns prediction)} or None without diagnoses."""
    if not truth:
        return None
    labels, matrix = confusion_matrix(truth, pred)
    return {"labels": labels, "matrix": matrix.tolist(), "rows": "truth",
            "columns": "prediction"}


def write_outputs(out: Path, result: dict[str, Any]) -> list[Path]:
    """``eval.json``, ``eval.csv`` and the plots into ``out``; returns the paths."""
    written = [out / "eval.json", out / "eval.csv"]
    try:
        written += write_plots(out, result)
        result["plots"] = [p.name for p in written[2:]]
        atomic_write_json(out / "eval.json", result)
        atomic_write_bytes(out / "eval.csv", eval_csv(result).encode())
    except OSError as exc:
        raise OutputNotWritable(f"{out}: cannot write the evaluation ({exc.strerror or exc})"
                                ) from None
    return written


def eval_csv(result: dict[str, Any]) -> str:
    """One row per slide and metric (first the pooled rows, slide ``(pooled)``, with the
    interval): slide, metric, value, ci95_low, ci95_high, then the statistics behind it."""
    buffer = io.StringIO()
    columns = ["slide", "metric", "value", "ci95_low", "ci95_high", "tp", "fp", "fn", "pred",
               "truth", "correct", "n"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for name, entry in result["metrics"].items():
        ci = entry["ci95"] or (None, None)
        writer.writerow({**entry, "slide": POOLED_ROW, "metric": name, "ci95_low": ci[0],
                         "ci95_high": ci[1], "n": entry["slides"]})
    for slide in result["per_slide"]:
        for name, entry in slide["metrics"].items():
            writer.writerow({**entry, "slide": slide["slide"], "metric": name})
    return buffer.getvalue()


def write_plots(out: Path, result: dict[str, Any]) -> list[Path]:
    """``bland_altman.png`` (difference against mean of prediction and truth, per slide,
    with the mean difference and the 95% limits; one panel per count or area) and
    ``confusion.png`` (diagnoses), when there is something to draw."""
    from matplotlib.figure import Figure

    written = []
    agreement = [n for n, e in result["metrics"].items() if n.endswith("/bland_altman")
                 and e["slides"]]
    if agreement:
        cols = min(3, len(agreement))
        rows = math.ceil(len(agreement) / cols)
        fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
        for k, name in enumerate(agreement):
            ax = fig.add_subplot(rows, cols, k + 1)
            points = [s["metrics"][name] for s in result["per_slide"] if name in s["metrics"]]
            pred = np.array([p["pred"] for p in points], float)
            true = np.array([p["truth"] for p in points], float)
            ax.scatter((pred + true) / 2, pred - true, s=16, color="#0072B2")
            entry = result["metrics"][name]
            ax.axhline(entry["value"], color="#D55E00", lw=1)
            for limit in entry["limits95"] or ():
                ax.axhline(limit, color="#D55E00", lw=1, ls="--")
            ax.axhline(0, color="0.6", lw=0.6)
            unit = " (mm2)" if name.startswith(("areas/", "report/areas_mm2/")) else ""
            ax.set_title(name.removesuffix("/bland_altman") + unit, fontsize=9)
            ax.set_xlabel("mean of prediction and truth", fontsize=8)
            ax.set_ylabel("prediction - truth", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.savefig(out / "bland_altman.png", dpi=110)
        written.append(out / "bland_altman.png")
    confusion = result.get("diagnosis_confusion")
    if confusion:
        labels, matrix = confusion["labels"], np.asarray(confusion["matrix"])
        size = 1.6 + 0.7 * len(labels)
        fig = Figure(figsize=(size + 1, size), layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(matrix, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, shrink=0.8)
        for (i, j), n in np.ndenumerate(matrix):
            ax.text(j, i, str(n), ha="center", va="center",
                    color="white" if n > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("prediction")
        ax.set_ylabel("truth")
        accuracy = result["metrics"].get("diagnosis/accuracy", {}).get("value")
        ax.set_title("diagnosis" + (f" (accuracy {accuracy:.2f})" if accuracy is not None
                                    else ""))
        fig.savefig(out / "confusion.png", dpi=110)
        written.append(out / "confusion.png")
    return written
