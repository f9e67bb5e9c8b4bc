"""``wsi-train``: train a task's model from annotated slides (or cases) or a synthetic
cohort, and write a checkpoint (safetensors + JSON sidecar) that ``wsi-run`` loads.

    wsi-train --task fls --data slides/ --out weights/fls_lab [--val held_out/]
    wsi-train --task fls --synth 8 --out weights/fls_synth

The task says how it is trained (`wsi_pipeline.tasks.Task.trainer`): ``slides`` (a
segmentation model on annotated slides, `slides`), ``crops`` (the mesangial glomerulus
classifier, `crops`) or ``cases`` (glomerular-dx, `cases`); `cli` parses the options and
hands them to that trainer. Shared parts: `common` (log, folders, option parsing, sidecar
metadata), `data` (slides, cohorts, sampling, augmentation) and `loop` (losses, scores,
`fit`).

The bundled demo weights (``wsi_pipeline/weights/fls_demo.*``) come from this one command,
on a synthetic cohort of 8 slides (seeds 1000-1007, even seeds positive, odd negative):

    wsi-train --task fls --synth 8 --out wsi_pipeline/weights/fls_demo --demo \\
        --work /tmp/fls_demo.work --epochs 6 --steps-per-epoch 50 --batch-size 8 --seed 0

The kidney demo weights come from the commands below (seeds 1000+ human, 5000+ mouse).
The bundled mesangial classifier is fine-tuned from scratch on every label of its cohort:
SimCLR pretraining (``--stage pretrain``, then ``--init`` for the fine-tuning) did not
leave chance-level NT-Xent within the steps a 2-core CPU affords; see
benchmarks/bench_simclr.py for the pretrained-vs-scratch comparison.

    wsi-train --task glomeruli --synth 8 --synth-size 8000x6000 \\
        --out wsi_pipeline/weights/glomeruli_demo --demo --work /tmp/glom_demo.work \\
        --epochs 6 --steps-per-epoch 50 --batch-size 8 --patch-px 256 --seed 0
    wsi-train --task kidney-layer --synth 8 --synth-size 8000x4000 --synth-mouse 3 \\
        --out wsi_pipeline/weights/kidney_layer_demo --demo --work /tmp/kl_demo.work \\
        --epochs 6 --steps-per-epoch 50 --batch-size 8 --patch-px 256 --seed 0
    wsi-train --task mesangial --stage finetune --synth 12 --synth-size 10000x8000 \\
        --encoder tu-mobilenetv3_small_100 --epochs 12 --batch-size 16 --lr 1e-3 \\
        --seed 0 --out wsi_pipeline/weights/mesangial_demo --demo --work /tmp/mes_demo.work

The liver demo weights: a synthetic cohort of 12 patients (17 slides), 6 patients
pixel-annotated, the other 6 with the diagnosis only (complementary labels, half of every
batch):

    wsi-train --task liver --synth 12 --synth-annotated 6 --synth-size 4096x3072 \\
        --out wsi_pipeline/weights/liver_demo --demo --work /tmp/liver_demo.work \\
        --epochs 6 --steps-per-epoch 50 --batch-size 8 --patch-px 256 --seed 0

The glomerular-dx demo weights: see `wsi_pipeline.train.cases`.

Expected failures print one line ``wsi-train: error: ...`` and exit 1 (2 for usage).
"""

from .cli import main
from .data import (
    ALIGN_PX,
    PatchDataset,
    augment,
    prepare_slides,
    sample_patches,
    split_slides,
    stain_concentrations,
    stain_jitter,
)
from .loop import lr_factor, to_input

__all__ = ["ALIGN_PX", "PatchDataset", "augment", "lr_factor", "main", "prepare_slides",
           "sample_patches", "split_slides", "stain_concentrations", "stain_jitter",
           "to_input"]
