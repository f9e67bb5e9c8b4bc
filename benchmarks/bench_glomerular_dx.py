"""glomerular-dx ablation: CMUS-Net fusion vs each single-modality head, with and without
SMIL, by patient-level k-fold cross-validation on a synthetic case cohort (models.md §2),
and the seconds per case of ``wsi-run`` with the bundled demo weights.

    OMP_NUM_THREADS=1 nice python benchmarks/bench_glomerular_dx.py --cases 45 \\
        --seed 3000 --work /tmp/bench_gdx

Cases come from `wsi_pipeline.synth.cases.write_case_cohort` (balanced IgAN / MN / LN, each
modality weak with probability 0.2, 15-40 % of each TEM bag uninformative) and are read as
``wsi-train --task glomerular-dx`` reads them (`train_cases.collect_cases`). For each fold a
fresh CMUS-Net (``train_cases.DEMO_ARCH``) is trained with SMIL and one without (the TEM
bag's plain mean, ``smil=False``); held-out cases are classified as inference does. Rows:
the fusion output, the OM, IM and TEM heads of the SMIL model, the fusion without SMIL:
accuracy mean +/- sd over the folds and per fold. Then ``wsi-run`` (cli ``main``) runs
``--time-cases`` cases of the cohort from scratch with the demo weights: seconds per case
(every stage, the OM slide included) and, when the cohort is not the demo weights' own,
their accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline.models import build_model
from wsi_pipeline.tasks.glomerular_dx import CLASSES
from wsi_pipeline.train_cases import (
    DEMO_ARCH,
    SYNTH_CASE_SEED,
    CaseTrainOptions,
    collect_cases,
    cross_validate,
    make_synthetic_cases,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=45)
    p.add_argument("--seed", type=int, default=3000, help="cohort seed (demo weights: "
                   f"{SYNTH_CASE_SEED})")
    p.add_argument("--size", default="2048x1536", help="OM slide WxH px at 0.5 um/px")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=CaseTrainOptions.epochs)
    p.add_argument("--lr", type=float, default=CaseTrainOptions.lr)
    p.add_argument("--time-cases", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_gdx"))
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    device = torch.device("cpu")
    t0 = time.perf_counter()
    folders = make_synthetic_cases(args.work / "synth", args.cases, args.seed, size)
    probe = build_model("cmus_net", **DEMO_ARCH, classes=list(CLASSES))
    cases = collect_cases(folders, args.work / "stores", CLASSES, probe.image_px,
                          probe.max_tem, log=lambda m: None)
    prep = time.perf_counter() - t0
    print(f"{len(cases)} cases ready in {prep:.0f} s (cohort seed {args.seed}, OM {args.size})")
    opts = CaseTrainOptions(epochs=args.epochs, lr=args.lr)
    results = {}
    setting = {"cases": args.cases, "seed": args.seed, "size": args.size,
               "folds": args.folds, "epochs": args.epochs, "lr": args.lr}
    for smil in (True, False):
        # each arm's result is kept in WORK: a rerun after a kill redoes only what is missing
        saved = args.work / f"cv_{'smil' if smil else 'mean'}.json"
        if saved.is_file() and json.loads(saved.read_text())["setting"] == setting:
            results[smil] = json.loads(saved.read_text())["result"]
            print(f"CV {'with' if smil else 'without'} SMIL: reused {saved}")
            continue
        kw = {**DEMO_ARCH, "classes": list(CLASSES), "smil": smil}
        t1 = time.perf_counter()
        results[smil] = cross_validate(cases, args.folds,
                                       lambda kw=kw: build_model("cmus_net", **kw), opts,
                                       device, log=lambda m: print("  " + m, flush=True))
        print(f"CV {'with' if smil else 'without'} SMIL: {time.perf_counter() - t1:.0f} s")
        saved.write_text(json.dumps({"setting": setting, "result": results[smil]}))
    rows = [("fusion (SMIL)", results[True], "fusion"), ("OM head", results[True], "om"),
            ("IM head", results[True], "im"), ("TEM head", results[True], "tem"),
            ("fusion without SMIL", results[False], "fusion")]
    print(f"\n{args.folds}-fold patient-level CV, {len(cases)} synthetic cases, "
          f"{args.epochs} epochs, lr {args.lr:g}")
    print(f"| {'output':22s} | accuracy mean +/- sd | per fold |")
    print(f"|{'-' * 24}|{'-' * 21}|{'-' * 10}|")
    for name, res, head in rows:
        acc = res["accuracy"][head]
        folds = " ".join(f"{r[f'accuracy_{head}']:.2f}" for r in res["per_fold"])
        print(f"| {name:22s} | {acc['mean']:.3f} +/- {acc['sd']:.3f}       | {folds} |")

    if args.time_cases > 0:
        from wsi_pipeline.cli import main as wsi_run

        out = args.work / "run"
        shutil.rmtree(out, ignore_errors=True)
        seconds, right = [], []
        for folder in folders[:args.time_cases]:
            t1 = time.perf_counter()
            code = wsi_run([str(folder), "--task", "glomerular-dx", "--out", str(out),
                            "--quiet", "--device", "cpu"])
            seconds.append(time.perf_counter() - t1)
            report = json.loads((out / folder.name / "report.json").read_text())
            truth = json.loads((folder / "truth.json").read_text())["diagnosis"]["label"]
            right.append(code == 0 and report["diagnosis"]["label"] == truth)
        demo = args.seed == SYNTH_CASE_SEED
        print(f"\nwsi-run (demo weights, CPU, every stage from scratch): "
              f"{np.mean(seconds):.1f} s per case (min {min(seconds):.1f}, max "
              f"{max(seconds):.1f}, {len(seconds)} cases); diagnosis right "
              f"{sum(right)}/{len(right)}" + (" (training cases of the demo weights)"
                                              if demo else " (held out from the demo "
                                                           "weights)"))


if __name__ == "__main__":
    main()
