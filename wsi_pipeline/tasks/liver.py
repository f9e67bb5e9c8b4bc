"""`liver` — HCC vs intrahepatic cholangiocarcinoma with weak complementary labels
(models.md §3).

H&E. smp U-Net on 512 px patches at ~0.5-1 um/px [choice: 1.0 um/px, enough to see
trabeculae and glands]. Case rule r = A_HCC / (A_HCC + A_CCA), HCC if r > 0.5.
"""

from . import TaskSpec

TASK = TaskSpec(name="liver", title="Liver tumour: HCC vs cholangiocarcinoma",
                mpp=1.0, tile_px=512, stain="he", context=(1, 2, 4))
