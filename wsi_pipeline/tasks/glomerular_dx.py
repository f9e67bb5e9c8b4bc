"""`glomerular-dx` — CMUS-Net tri-modal IgAN / MN / LN (models.md §2).

The input is a case folder (om/, im/, tem/); the light-microscopy WSI in ``om/`` goes
through the same slide stages as `mesangial` (PAS, 0.5 um/px for glomerulus crops).
"""

from . import TaskSpec

TASK = TaskSpec(name="glomerular-dx", title="Glomerular disease: IgAN / MN / LN",
                mpp=0.5, tile_px=512, stain="pas", context=(1, 2, 4), input_kind="case")
