"""The measures of `wsi-eval`, numpy in and out, with no file formats in sight.

Every pooled metric is a function of per-slide *additive* statistics (`STATISTICS`): the
statistics of several slides are summed and the function applied, so pooling over slides
and resampling them for a bootstrap are the same operation (`pooled`, `bootstrap_ci`).

Matching is optimal (`match_pairs`: the most pairs, then the largest total closeness,
solved with the Hungarian algorithm of `scipy.optimize.linear_sum_assignment`), never
greedy: a greedy nearest-first matching can leave a true point unmatched that an optimal
one pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

# An object on a label grid, as `labelmaps.connected_components` gives it: its bounding
# box (y0, x0, y1, x1) in grid pixels and its boolean mask cropped to that box.
GridObject = tuple[tuple[int, int, int, int], np.ndarray]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


# per kind: the statistics a slide contributes (summed over slides) and the metric of a sum;
# the functions take (..., K) arrays so that a (B, K) stack of bootstrap sums is one call
STATISTICS: dict[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]] = {
    "dice": (("tp", "fp", "fn"), lambda s: _ratio(2 * s[..., 0], 2 * s[..., 0] + s[..., 1]
                                                   + s[..., 2])),
    "iou": (("tp", "fp", "fn"), lambda s: _ratio(s[..., 0], s[..., 0] + s[..., 1] + s[..., 2])),
    "precision": (("tp", "fp", "fn"), lambda s: _ratio(s[..., 0], s[..., 0] + s[..., 1])),
    "recall": (("tp", "fp", "fn"), lambda s: _ratio(s[..., 0], s[..., 0] + s[..., 2])),
    "f1": (("tp", "fp", "fn"), lambda s: _ratio(2 * s[..., 0], 2 * s[..., 0] + s[..., 1]
                                                 + s[..., 2])),
    # mean difference prediction - truth over slides
    "bland_altman": (("pred", "truth", "n"), lambda s: _ratio(s[..., 0] - s[..., 1], s[..., 2])),
    "accuracy": (("correct", "n"), lambda s: _ratio(s[..., 0], s[..., 1])),
}


def metric_value(kind: str, stats: np.ndarray) -> float:
    """The metric ``kind`` of one (K,) vector of summed statistics (NaN when undefined,
    e.g. the precision of no detections)."""
    return float(STATISTICS[kind][1](np.asarray(stats, np.float64)))


def pooled(kind: str, per_slide: np.ndarray) -> float:
    """The metric of the sum of (N, K) per-slide statistics: e.g. Dice from the summed
    true/false positive and false negative pixels of all slides."""
    return metric_value(kind, np.asarray(per_slide, np.float64).sum(0))


def bootstrap_ci(kind: str, per_slide: np.ndarray, n_boot: int, rng: np.random.Generator,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `pooled` over slides: ``n_boot`` resamples of the N
    slides with replacement. None when there are no slides, no resamples, or the metric
    is undefined in every resample."""
    stats = np.asarray(per_slide, np.float64)
    if n_boot < 1 or len(stats) == 0:
        return None
    idx = rng.integers(0, len(stats), size=(n_boot, len(stats)))
    values = STATISTICS[kind][1](stats[idx].sum(1))
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def bland_altman(pred: Sequence[float], truth: Sequence[float]) -> dict[str, float | int | None]:
    """Agreement of paired measurements: mean difference (prediction - truth), its
    standard deviation and the 95% limits of agreement mean +- 1.96 SD (Bland & Altman
    1986); SD and limits need two pairs."""
    diff = np.asarray(pred, np.float64) - np.asarray(truth, np.float64)
    if not len(diff):
        return {"mean": None, "sd": None, "limits95": None, "n": 0}
    mean = float(diff.mean())
    if len(diff) < 2:
        return {"mean": mean, "sd": None, "limits95": None, "n": 1}
    sd = float(diff.std(ddof=1))
    return {"mean": mean, "sd": sd, "limits95": [mean - 1.96 * sd, mean + 1.96 * sd],
            "n": int(len(diff))}


def pixel_counts(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None
                 ) -> np.ndarray:
    """(tp, fp, fn) int64 of two boolean masks of one class, over the ``valid`` pixels."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if valid is not None:
        pred, truth = pred & valid, truth & valid
    tp = int(np.count_nonzero(pred & truth))
    return np.array([tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp],
                    np.int64)


def match_pairs(valid: np.ndarray, closeness: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An optimal one-to-one matching of rows to columns: among the (N, M) ``valid`` pairs,
    the largest number of pairs, and among those the largest sum of ``closeness`` (in
    [0, 1]). Returns (rows, cols) of the matched pairs."""
    valid = np.asarray(valid, bool)
    if not valid.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # each pair is worth more than any closeness total, so a larger matching always wins
    big = min(valid.shape) + 1.0
    weight = np.where(valid, big + np.clip(closeness, 0, 1), 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    keep = valid[rows, cols]
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


def match_points(pred_um: np.ndarray, truth_um: np.ndarray, radius_um: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Optimal matching of predicted to true points (x, y um) closer than ``radius_um``
    (inclusive): the most pairs, then the smallest total distance (`match_pairs`, solved
    separately on each connected group of candidate pairs, so slide-sized point sets
    cost little). Returns (pred indices, truth indices) of the pairs."""
    pred_um = np.asarray(pred_um, np.float64).reshape(-1, 2)
    truth_um = np.asarray(truth_um, np.float64).reshape(-1, 2)
    n, m = len(pred_um), len(truth_um)
    if n == 0 or m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = cKDTree(pred_um).sparse_distance_matrix(cKDTree(truth_um), radius_um,
                                                    output_type="ndarray")
    if not len(pairs):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pi, ti, dist = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
    # groups of points linked by candidate pairs: nodes 0..n-1 predictions, n.. truths
    graph = coo_matrix((np.ones(len(pi)), (pi, ti + n)), shape=(n + m, n + m))
    _, group = connected_components(graph, directed=False)
    edge_group = group[pi]
    order = np.argsort(edge_group, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_group[order])) + 1
    out_p, out_t = [], []
    for edges in np.split(order, bounds):
        if len(edges) == 1:   # the usual case: one prediction near one truth
            out_p.append(pi[edges])
            out_t.append(ti[edges])
            continue
        rows, rinv = np.unique(pi[edges], return_inverse=True)
        cols, cinv = np.unique(ti[edges], return_inverse=True)
        valid = np.zeros((len(rows), len(cols)), bool)
        close = np.zeros(valid.shape)
        valid[rinv, cinv] = True
        close[rinv, cinv] = 1 - dist[edges] / radius_um
        r, c = match_pairs(valid, close)
        out_p.append(rows[r])
        out_t.append(cols[c])
    return np.concatenate(out_p), np.concatenate(out_t)


def object_ious(pred: Sequence[GridObject], truth: Sequence[GridObject]) -> np.ndarray:
    """(N, M) intersection over union of every predicted and true object (zero unless
    their bounding boxes overlap)."""
    out = np.zeros((len(pred), len(truth)))
    if not len(pred) or not len(truth):
        return out
    pb = np.array([b for b, _ in pred], np.int64).reshape(-1, 4)
    tb = np.array([b for b, _ in truth], np.int64).reshape(-1, 4)
    p_area = np.array([np.count_nonzero(m) for _, m in pred])
    t_area = np.array([np.count_nonzero(m) for _, m in truth])
    near = ((pb[:, None, 0] < tb[None, :, 2]) & (tb[None, :, 0] < pb[:, None, 2])
            & (pb[:, None, 1] < tb[None, :, 3]) & (tb[None, :, 1] < pb[:, None, 3]))
    for i, j in zip(*np.nonzero(near), strict=True):
        (py0, px0, _, _), pm = pred[i]
        (ty0, tx0, _, _), tm = truth[j]
        y0, x0 = max(pb[i, 0], tb[j, 0]), max(pb[i, 1], tb[j, 1])
        y1, x1 = min(pb[i, 2], tb[j, 2]), min(pb[i, 3], tb[j, 3])
        inter = np.count_nonzero(pm[y0 - py0:y1 - py0, x0 - px0:x1 - px0]
                                 & tm[y0 - ty0:y1 - ty0, x0 - tx0:x1 - tx0])
        union = p_area[i] + t_area[j] - inter
        out[i, j] = inter / union if union else 0.0
    return out


def match_objects(pred: Sequence[GridObject], truth: Sequence[GridObject], iou_min: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal matching of predicted to true objects with IoU >= ``iou_min``: the most
    pairs, then the largest total IoU (`match_pairs`; at ``iou_min`` >= 0.5 the pairs of
    non-overlapping objects are unique anyway). Returns (pred indices, truth indices,
    their IoU)."""
    iou = object_ious(pred, truth)
    rows, cols = match_pairs(iou >= iou_min, iou)
    return rows, cols, iou[rows, cols]


def detection_counts(n_pred: int, n_truth: int, n_matched: int) -> np.ndarray:
    """(tp, fp, fn) of a matching."""
    return np.array([n_matched, n_pred - n_matched, n_truth - n_matched], np.int64)


def confusion_matrix(truth: Sequence[str], pred: Sequence[str]
                     ) -> tuple[list[str], np.ndarray]:
    """(labels, (L, L) int64 counts with rows = truth, columns = prediction) over the
    sorted union of both label sets."""
    labels = sorted(set(truth) | set(pred))
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), np.int64)
    for t, p in zip(truth, pred, strict=True):
        matrix[index[t], index[p]] += 1
    return labels, matrix
