"""``wsi-eval``: validate a task on a lab's own annotated slides before trusting it.

    wsi-eval OUT --truth DIR [--radius-um 4] [--iou 0.5] [--task TASK] [--diagnoses CSV]
             [--bootstrap 1000] [--seed 0]

Each ``OUT/<slide-id>/`` (a wsi-run output folder) is matched by slide id (or its slide
file's stem) to truth files in DIR (`sources`): QuPath GeoJSON, label masks with a legend,
point CSVs or wsi-synth truth. Writes ``OUT/eval.json``, ``OUT/eval.csv`` and plots
(``bland_altman.png``, ``confusion.png``).

Metrics (``eval.json`` ``metrics``: {name: {"value", "ci95", "slides", ...}}):

* ``dice/<class>``, ``iou/<class>``: pixels of the prediction map (``pred/classes``, at
  its own MPP) against the truth rasterised onto that grid; pooled from the tp/fp/fn
  pixels summed over slides (a "global" Dice, which weights slides by their area);
* ``objects/<class>/precision|recall|f1`` and ``objects/precision|recall|f1`` (all object
  classes): predicted objects (objects.geojson polygons, else connected components of
  the map) matched one-to-one to true objects (GeoJSON polygons, else 8-connected
  components of the truth on the grid) at IoU >= ``--iou``; pooled from summed counts;
* ``points/<class>/precision|recall|f1``: predicted points (cells.geojson, else the
  store's ``pred/cells`` or ``pred/lymphocytes``) matched one-to-one to true points
  within ``--radius-um``; pooled from summed counts;
* ``counts/objects/<class>/bland_altman``, ``counts/points/<class>/bland_altman``,
  ``areas/<class>/bland_altman`` (mm2), and ``report/<counts|areas_mm2|scores>/<name>/
  bland_altman`` (report.json against wsi-synth's truth.json): value = mean difference
  prediction - truth over slides, with ``sd`` and ``limits95`` = mean +- 1.96 SD;
* ``diagnosis/accuracy``: the report's diagnosis label against ``--diagnoses`` or
  truth.json, with the confusion matrix in ``diagnosis_confusion``.

Matching is optimal, not greedy (`metrics.match_pairs`). Every ``ci95`` is a percentile
bootstrap over slides (the pooled metric recomputed on slides resampled with
replacement).
"""

from .cli import evaluate, main

__all__ = ["evaluate", "main"]
