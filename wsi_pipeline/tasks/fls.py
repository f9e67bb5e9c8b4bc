"""`fls` — focal lymphocytic sialadenitis in minor salivary gland (M2CF-Net, models.md §4).

H&E. M2CF-Net reads concentric 512 px patches at downsample 1, 2 and 4 around one centre
(HookNet's target resolution is 0.5 um/px), so the pyramid keeps 0.5, 1 and 2 um/px.
Focus score FS = 4 * foci / glandular area (mm2); FS >= 1 is histology-positive.
"""

from . import TaskSpec

TASK = TaskSpec(name="fls", title="Focal lymphocytic sialadenitis (focus score)",
                mpp=0.5, tile_px=512, stain="he", context=(1, 2, 4))
