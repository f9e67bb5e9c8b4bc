"""A sixth task as a plugin: train and run `tumour-area` (examples/plugin_tumour_area).

    pip install -e examples/plugin_tumour_area
    python examples/plugin_task.py [--out wsi-plugin-example]

The task lives in its own installed package; its entry point in the group
``wsi_pipeline.tasks`` is all wsi_pipeline needs: ``wsi-run --help`` lists it, and
``wsi-train`` and ``wsi-run`` take ``--task tumour-area``.
"""

import argparse
import json
from pathlib import Path

import wsi_pipeline as w
from wsi_pipeline.synth import write_slide
from wsi_pipeline.train import main as wsi_train

SMALL = {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 3,
         "decoder_channels": [16, 8, 8]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("wsi-plugin-example"))
    ap.add_argument("--tiny", action="store_true", help="tiny slides and steps (for tests)")
    args = ap.parse_args()
    if "tumour-area" not in w.task_names():
        raise SystemExit("tumour-area is not installed: pip install -e "
                         "examples/plugin_tumour_area")
    size = "2048x1536" if args.tiny else "6000x4500"
    steps = ["--epochs", "2", "--steps-per-epoch", "4", "--patch-px", "128"] if args.tiny \
        else ["--epochs", "4", "--steps-per-epoch", "40", "--patch-px", "256"]
    model = args.out / "tumour_model"
    code = wsi_train(["--task", "tumour-area", "--synth", "2", "--synth-size", size,
                      "--out", str(model), "--arch-kwargs", json.dumps(SMALL),
                      "--batch-size", "4", "--workers", "1", *steps])
    if code != 0:
        raise SystemExit(code)
    slide = args.out / "held_out.svs"
    width, height = map(int, size.split("x"))
    write_slide("liver", slide, width=width, height=height, seed=77, label="HCC")
    report = w.analyse(slide, task="tumour-area", out=args.out / "results",
                       weights=model.with_suffix(".safetensors"))
    print(f"{report.slide_id}: {report.diagnosis['label']} ({report.diagnosis['note']}); "
          f"tumour {report.areas_mm2['tumour']} of {report.areas_mm2['tissue']} mm2")


if __name__ == "__main__":
    main()
