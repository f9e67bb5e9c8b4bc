"""Analyse a folder of slides and plot the task's main score across them.

    python examples/folder_summary_plot.py FOLDER [--task fls] [--out wsi-out]

Without FOLDER, a few small synthetic slides (positive and negative) are written first.
The plot goes to OUT/scores.png (needs matplotlib: pip install matplotlib).
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import wsi_pipeline as w  # noqa: E402

MAIN_SCORE = {"fls": "focus_score", "liver": "hcc_fraction", "kidney-layer": "cortex_fraction",
              "mesangial": "hypercellular_fraction"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path)
    ap.add_argument("--task", default="fls")
    ap.add_argument("--out", type=Path, default=Path("wsi-out"))
    ap.add_argument("--tiny", action="store_true", help="very small slides (for tests)")
    args = ap.parse_args()

    folder = args.folder
    if folder is None:
        from wsi_pipeline.synth import write_slide

        folder = args.out / "example_slides"
        folder.mkdir(parents=True, exist_ok=True)
        size = (2400, 2000) if args.tiny else (6000, 4500)
        for i, label in enumerate(("positive", "negative", "positive")):
            write_slide("fls", folder / f"case_{i + 1}.svs", width=size[0], height=size[1],
                        seed=40 + i, label=label)

    # the weight-free fls mode needs no checkpoint; other tasks use their demo weights
    mode = "classical" if args.task == "fls" else "network"
    reports = w.analyse(folder, task=args.task, out=args.out, model=mode)
    key = MAIN_SCORE.get(args.task)
    done = [r for r in reports if r.complete]
    for r in reports:
        print(f"{r.slide_id:<12} {r.status:<8} {r.diagnosis.get('label')} {r.scores}")
    if key is None or not done:
        return
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(done), 3))
    values = [r.scores.get(key) or 0.0 for r in done]
    colours = ["#d55e00" if r.diagnosis.get("label") == "positive" else "#0072b2" for r in done]
    ax.bar([r.slide_id for r in done], values, color=colours)
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{args.task}: {key} per slide")
    fig.tight_layout()
    fig.savefig(args.out / "scores.png", dpi=100)
    print(f"plot: {args.out / 'scores.png'}")


if __name__ == "__main__":
    main()
