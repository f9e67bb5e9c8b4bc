"""Analyse one slide from Python and look at the result.

    python examples/analyse_one_slide.py [SLIDE] [--task fls] [--out wsi-out]

Without SLIDE, a small synthetic salivary-gland slide with known truth is written first.
"""

import argparse
from pathlib import Path

import wsi_pipeline as w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", nargs="?", type=Path)
    ap.add_argument("--task", default="fls")
    ap.add_argument("--out", type=Path, default=Path("wsi-out"))
    ap.add_argument("--tiny", action="store_true", help="a very small slide (for tests)")
    args = ap.parse_args()

    slide = args.slide
    if slide is None:
        from wsi_pipeline.synth import write_slide

        slide = args.out / "example_slide.svs"
        args.out.mkdir(parents=True, exist_ok=True)
        size = (3000, 2400) if args.tiny else (8000, 6000)
        truth = write_slide("fls", slide, width=size[0], height=size[1], seed=21,
                            label="positive")
        print(f"synthetic slide {slide}: true focus score {truth['scores']['focus_score']}")

    report = w.analyse(slide, task=args.task, out=args.out)
    print(f"{report.slide_id}: {report.diagnosis['label']} ({report.diagnosis['note']})")
    print("scores:", report.scores)
    print("areas (mm2):", report.areas_mm2)
    print(f"{len(report.objects)} objects; files:", ", ".join(map(str, report.files.values())))

    # the normalised image the network read, as lazy dask arrays in microns per pixel
    for level in w.read_pyramid(report.folder):
        print(f"pyramid level {level.mpp} um/px: {level.image.shape}")


if __name__ == "__main__":
    main()
