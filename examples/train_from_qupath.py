"""Train a task's model from QuPath GeoJSON annotations, then analyse with the new weights.

    python examples/train_from_qupath.py [--out wsi-train-example]

QuPath: annotate foci on each slide, then File > Export objects as GeoJSON, saved beside
the slide as ``<slide stem>.geojson`` (level-0 pixel coordinates; the classification name
says the class, e.g. "Focus"). Here synthetic slides stand in for the lab's: their true
foci are written as such a GeoJSON file and their other truth files are moved aside.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

import wsi_pipeline as w
from wsi_pipeline.synth import truth_paths, write_slide
from wsi_pipeline.train import main as wsi_train

# a small M2CF-Net that trains in a minute on a CPU
SMALL = {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 3,
         "decoder_channels": [16, 8, 8], "fusion_channels": 16}


def write_qupath_geojson(slide, truth: dict, mpp: float) -> Path:
    """The slide's true foci as a QuPath annotation export (ellipses as polygons, px)."""
    features = []
    for obj in truth["objects"]:
        a, b = obj["semi_axes_um"]
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        cos, sin = np.cos(obj["angle_rad"]), np.sin(obj["angle_rad"])
        x = obj["x_um"] + a * np.cos(t) * cos - b * np.sin(t) * sin
        y = obj["y_um"] + a * np.cos(t) * sin + b * np.sin(t) * cos
        ring = np.stack([x, y], 1) / mpp
        features.append({"type": "Feature",
                         "geometry": {"type": "Polygon",
                                      "coordinates": [[*ring.round(1).tolist(),
                                                       ring[0].round(1).tolist()]]},
                         "properties": {"objectType": "annotation",
                                        "classification": {"name": obj["type"].title(),
                                                           "color": [220, 20, 60]}}})
    path = Path(slide).with_suffix(".geojson")
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("wsi-train-example"))
    ap.add_argument("--tiny", action="store_true", help="tiny slides and steps (for tests)")
    args = ap.parse_args()
    data, truth_dir = args.out / "annotated", args.out / "truth"
    data.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    size = (2048, 1536) if args.tiny else (6000, 4500)
    for i, label in enumerate(("positive", "negative")):
        slide = data / f"biopsy_{i + 1}.svs"
        truth = write_slide("fls", slide, width=size[0], height=size[1], seed=600 + i,
                            label=label)
        print(f"{write_qupath_geojson(slide, truth, 0.5)}: {len(truth['objects'])} foci")
        for path in truth_paths(slide):   # keep the synthetic truth out of training
            shutil.move(str(path), truth_dir / path.name)

    steps = ["--epochs", "2", "--steps-per-epoch", "2", "--patch-px", "64",
             "--val-patches", "8"] if args.tiny else ["--epochs", "4", "--steps-per-epoch",
                                                      "40"]
    model = args.out / "my_fls_model"
    code = wsi_train(["--task", "fls", "--data", str(data), "--out", str(model),
                      "--arch-kwargs", json.dumps(SMALL), "--batch-size", "4",
                      "--workers", "1", *steps])
    if code != 0:
        raise SystemExit(code)
    report = w.analyse(data / "biopsy_1.svs", task="fls", out=args.out / "results",
                       weights=model.with_suffix(".safetensors"))
    print(f"{report.slide_id}: {report.diagnosis['label']}, model "
          f"{report.to_dict()['provenance']['model']['path']}")


if __name__ == "__main__":
    main()
