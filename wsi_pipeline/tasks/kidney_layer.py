"""`kidney-layer` — cortex/medulla segmentation with cross-species training (models.md §1).

PAS. 1024 px patches [code]; MPP unpublished [choice: 2.0 um/px, a 2 mm field that shows
the cortico-medullary layering].
"""

from . import TaskSpec

TASK = TaskSpec(name="kidney-layer", title="Kidney cortex / medulla layers",
                mpp=2.0, tile_px=1024, stain="pas", context=(1, 2, 4))
