"""liver: do complementary labels help? (docs/models.md §3, seed 002)

    python benchmarks/bench_liver_compl.py --patients 16 --annotated 2 --heldout 8 \\
        --epochs 6 --steps 40 --work /tmp/bench_liver

A synthetic training cohort of ``--patients`` patients (``wsi-synth --task liver
--cohort``), ``--annotated`` of them with pixel labels and the rest with the diagnosis only,
trains the same U-Net twice with the same optimisation budget: on the annotated slides
alone (``--compl-lambda 0``) and on those plus the weak slides (supervised focal CE +
lambda * L_compl; half of every batch weak). ``--same-annotated-patches`` gives the weak
arm twice the steps, so both see as many annotated patches, and adds an "annotated only,
2x" arm with those steps too (the same compute without weak slides). Each checkpoint then runs
through the whole pipeline (``wsi-run``, patients from the cohort list) on ``--heldout``
patients of another seed (no validation split: with so few annotated patients every one
trains, and the last epoch is kept): case-level balanced accuracy (HCC vs CCA by r over the
patient's slides) and pixel Dice against the truth at the prediction grid (tumour = HCC
or CCA, and HCC and CCA each). Repeats over ``--seeds`` training seeds.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import zarr

from wsi_pipeline.cli import main as wsi_run
from wsi_pipeline.synth import truth_labels_on_grid
from wsi_pipeline.synth.liver import write_liver_cohort
from wsi_pipeline.train import main as wsi_train


def pixel_counts(out: Path, slide_id: str, slide: Path) -> np.ndarray:
    """(4, 4) confusion (truth background/liver/HCC/CCA x predicted) on the pred grid."""
    classes = zarr.open_group(str(out / slide_id / "store.zarr"), mode="r")["pred/classes"]
    pred = np.asarray(classes)
    true = truth_labels_on_grid(slide, pred.shape, float(classes.attrs["mpp"]))
    t = np.where(np.isin(true, (1, 2, 3)), true, 0)
    return np.bincount((t * 4 + pred).ravel(), minlength=16).reshape(4, 4)


def dice(cm: np.ndarray, classes: tuple[int, ...]) -> float:
    k = list(classes)
    tp = cm[np.ix_(k, k)].sum()
    return float(2 * tp / (cm[k, :].sum() + cm[:, k].sum()))


def evaluate(weights: Path, heldout_csv: Path, out: Path) -> dict[str, float]:
    rows = list(csv.DictReader(heldout_csv.open()))
    out.parent.mkdir(parents=True, exist_ok=True)
    listing = out.parent / f"{out.name}.list.csv"
    listing.write_text("path,patient_id,slide_id\n" + "".join(
        f"{heldout_csv.parent / r['slide']},{r['patient_id']},{Path(r['slide']).stem}\n"
        for r in rows))
    t0 = time.perf_counter()
    assert wsi_run([str(listing), "--task", "liver", "--out", str(out), "--weights",
                    str(weights), "--quiet"]) == 0
    seconds = (time.perf_counter() - t0) / len(rows)
    cases = {c["patient_id"]: c for c in csv.DictReader((out / "cases.csv").open())}
    truth = {r["patient_id"]: r["diagnosis"] for r in rows}
    recalls = [np.mean([cases[p]["diagnosis"] == d for p, d in truth.items() if d == cls])
               for cls in ("HCC", "CCA")]
    cm = sum(pixel_counts(out, Path(r["slide"]).stem, heldout_csv.parent / r["slide"])
             for r in rows)
    return {"balanced_accuracy": float(np.mean(recalls)), "dice_tumour": dice(cm, (2, 3)),
            "dice_hcc": dice(cm, (2,)), "dice_cca": dice(cm, (3,)),
            "seconds_per_slide": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=16)
    p.add_argument("--annotated", type=int, default=2)
    p.add_argument("--heldout", type=int, default=8)
    p.add_argument("--size", default="4096x3072", help="slide size WxH at 0.5 um/px")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch-px", type=int, default=256)
    p.add_argument("--compl-lambda", type=float, default=1.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--same-annotated-patches", action="store_true")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_liver"))
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    heldout = args.work / "heldout"
    if not (heldout / "cohort.csv").is_file():
        write_liver_cohort(heldout, args.heldout, args.heldout, 9100, w, h)
    rows = []
    for seed in args.seeds:
        arms = [("annotated only", 0.0, args.steps)]
        if args.same_annotated_patches:  # and the same number of steps without weak slides
            arms.append(("annotated only, 2x", 0.0, 2 * args.steps))
        arms.append(("+ weak (L_compl)", args.compl_lambda,
                     args.steps * (2 if args.same_annotated_patches else 1)))
        for arm, lam, steps in arms:
            name = f"s{seed}_l{lam:g}_{steps}"
            ckpt = args.work / "weights" / name
            t0 = time.perf_counter()
            if not ckpt.with_suffix(".safetensors").is_file():
                assert wsi_train([
                    "--task", "liver", "--synth", str(args.patients), "--synth-annotated",
                    str(args.annotated), "--synth-size", args.size, "--out", str(ckpt),
                    "--work", str(args.work / "train"), "--epochs", str(args.epochs),
                    "--steps-per-epoch", str(steps), "--batch-size", str(args.batch_size),
                    "--patch-px", str(args.patch_px), "--compl-lambda", str(lam),
                    "--val-fraction", "0",
                    "--seed", str(seed)]) == 0
            train_s = time.perf_counter() - t0
            scores = evaluate(ckpt.with_suffix(".safetensors"), heldout / "cohort.csv",
                              args.work / "runs" / name)
            rows.append((seed, arm, steps, scores, train_s))
            print(f"seed {seed} {arm:<17} steps/epoch {steps}: case balanced accuracy "
                  f"{scores['balanced_accuracy']:.3f}, Dice tumour {scores['dice_tumour']:.3f} "
                  f"(HCC {scores['dice_hcc']:.3f}, CCA {scores['dice_cca']:.3f}); "
                  f"train {train_s:.0f} s, {scores['seconds_per_slide']:.1f} s/slide", flush=True)
    for arm in dict.fromkeys(r[1] for r in rows):
        got = [r[3] for r in rows if r[1] == arm]
        mean_sd = {k: f"{np.mean([g[k] for g in got]):.3f} +/- {np.std([g[k] for g in got]):.3f}"
                   for k in ("balanced_accuracy", "dice_tumour", "dice_hcc", "dice_cca")}
        print(f"{arm:<17} over {len(got)} seed(s): balanced accuracy "
              f"{mean_sd['balanced_accuracy']}, Dice tumour {mean_sd['dice_tumour']} (HCC "
              f"{mean_sd['dice_hcc']}, CCA {mean_sd['dice_cca']})")


if __name__ == "__main__":
    main()
