"""Synthetic whole-slide images with ground truth (`wsi-synth`).

Python API::

    from wsi_pipeline.synth import write_slide
    truth = write_slide("fls", "out/fls_001.svs", width=4000, height=3000, seed=1,
                        label="positive")

writes an Aperio-compatible pyramidal JPEG SVS, `<stem>.truth.json` (task, diagnosis,
scores, counts, areas_mm2, objects, generator) and `<stem>.truth.zarr` (label mask with
its MPP and legend, plus object arrays). Tasks: fls, liver, kidney-layer, mesangial,
glomerular-dx (the biopsy slide of a case; `synth.cases.write_case` writes whole cases).
``randomise=True`` (``wsi-synth --randomise``) domain-randomises stains, section, nuclei,
artefacts and scanner effects per slide (`synth.randomise`); without it a slide is exactly
as before.
"""

from .generate import get_spec, task_specs, write_slide
from .writer import label_downsample, truth_labels_on_grid, truth_paths

LEGENDS = {name: spec.legend for name, spec in task_specs().items()}

__all__ = ["LEGENDS", "get_spec", "label_downsample", "task_specs", "truth_labels_on_grid",
           "truth_paths", "write_slide"]
