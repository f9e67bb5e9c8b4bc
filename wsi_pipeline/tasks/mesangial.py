"""`mesangial` — IgA nephropathy mesangial hypercellularity M0/M1 (SimCLR, models.md §5).

PAS. Glomerulus crops of 512 px at ~0.5 um/px come from the finest pyramid level; the
glomerulus detector (models.md §0) runs at ~1 um/px, the x2 level.
"""

from . import TaskSpec

TASK = TaskSpec(name="mesangial", title="IgAN mesangial hypercellularity (Oxford M)",
                mpp=0.5, tile_px=512, stain="pas", context=(1, 2, 4))
