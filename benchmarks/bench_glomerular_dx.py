"""glomerular-dx ablation: CMUS-Net fusion vs each single-modality head, with and without
SMIL, by patient-level k-fold cross-validation on a synthetic case cohort (docs/models.md §2),
and the seconds per case of ``wsi-run`` with the bundled demo weights.

    OMP_NUM_THREADS=1 nice python benchmarks/bench_glomerular_dx.py --cases 45 \\
        --seed 3000 --work /tmp/bench_gdx

Cases come from `wsi_pipeline.synth.cases.write_case_cohort` (balanced IgAN / MN / LN, each
modality weak with probability 0.2, 15-40 % of each TEM bag uninformative) and are read as
``wsi-train --task glomerular-dx`` reads them (`train.cases.collect_cases`). For each fold a
fresh model is trained per arm (``--arms``) and held-out cases are classified as inference
does:

- ``smil``, ``mean``: CMUS-Net (``train.cases.DEMO_ARCH``) with SMIL, and without it (the
  TEM bag's plain mean, ``smil=False``); each model's OM, IM and TEM heads are rows too;
- ``om``, ``im``, ``tem``, ``tem-mean``: one modality trained alone (`SingleModality`: the
  same encoder and head, no CMSA, no fusion, loss CE of that head only; TEM with SMIL or
  with the bag mean).

Rows: accuracy mean +/- sd over the folds and per fold. Each arm's result is kept in WORK,
so a rerun after a kill redoes only the missing arms. Then ``wsi-run`` (cli ``main``) runs
``--time-cases`` cases of the cohort from scratch with the demo weights: seconds per case
(every stage, the OM slide included) and, when the cohort is not the demo weights' own,
their accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline.models import build_model
from wsi_pipeline.models.cmus_net import CMUSNet
from wsi_pipeline.tasks.glomerular_dx import CLASSES
from wsi_pipeline.train.cases import (
    DEMO_ARCH,
    SYNTH_CASE_SEED,
    CaseTrainOptions,
    collect_cases,
    cross_validate,
    make_synthetic_cases,
)

ARMS = ("smil", "mean", "om", "im", "tem", "tem-mean")


class SingleModality(CMUSNet):
    """One modality of CMUS-Net alone: its encoder, mean-pooled tokens and its head (TEM:
    the bag fused by SMIL, or by the mean with ``smil=False``); no CMSA, no fusion head.
    The output puts that head's logits under ``logits`` and None under the per-modality
    keys, so ``cmus_loss`` is that head's CE alone and evaluation scores it as "fusion"."""

    def __init__(self, modality: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.modality = modality

    def forward(self, om=None, im=None, tem=None, tem_mask=None) -> dict:
        if isinstance(om, Mapping):  # training passes the batch dict
            om, im, tem, tem_mask = (om.get(k) for k in ("om", "im", "tem", "tem_mask"))
        if self.modality == "tem":
            out = super().forward(None, None, tem, tem_mask)
            return {**out, "logits": out["tem"], "om": None, "im": None, "tem": None}
        x = om if self.modality == "om" else im
        enc, head = ((self.enc_om, self.head_om) if self.modality == "om"
                     else (self.enc_im, self.head_im))
        b = x.shape[0]
        empty = torch.zeros(0, dtype=torch.int64)
        return {"logits": head(enc(self._resize(x)).mean(1)), "om": None, "im": None,
                "tem": None, "kept": [empty] * b, "weights": [empty.float()] * b,
                "medoid": [-1] * b}


def build_arm(arm: str) -> torch.nn.Module:
    kw = {**DEMO_ARCH, "classes": list(CLASSES), "smil": arm not in ("mean", "tem-mean")}
    if arm in ("smil", "mean"):
        return build_model("cmus_net", **kw)
    return SingleModality(arm.split("-")[0], **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=45)
    p.add_argument("--seed", type=int, default=3000, help="cohort seed (demo weights: "
                   f"{SYNTH_CASE_SEED})")
    p.add_argument("--size", default="2048x1536", help="OM slide WxH px at 0.5 um/px")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=CaseTrainOptions.epochs)
    p.add_argument("--lr", type=float, default=CaseTrainOptions.lr)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {ARMS}")
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
    arms = [a for a in args.arms.split(",") if a]
    if not set(arms) <= set(ARMS):
        p.error(f"--arms: unknown {sorted(set(arms) - set(ARMS))}; choose from {ARMS}")
    results = {}
    setting = {"cases": args.cases, "seed": args.seed, "size": args.size,
               "folds": args.folds, "epochs": args.epochs, "lr": args.lr}
    for arm in arms:
        saved = args.work / f"cv_{arm}.json"
        if saved.is_file() and json.loads(saved.read_text())["setting"] == setting:
            results[arm] = json.loads(saved.read_text())["result"]
            print(f"CV {arm}: reused {saved}")
            continue
        t1 = time.perf_counter()
        results[arm] = cross_validate(cases, args.folds, lambda arm=arm: build_arm(arm), opts,
                                      device, log=lambda m: print("  " + m, flush=True))
        results[arm]["seconds"] = round(time.perf_counter() - t1)
        print(f"CV {arm}: {results[arm]['seconds']} s")
        saved.write_text(json.dumps({"setting": setting, "result": results[arm]}))
    names = {"smil": "fusion (SMIL)", "mean": "fusion without SMIL", "om": "OM alone",
             "im": "IM alone", "tem": "TEM alone (SMIL)", "tem-mean": "TEM alone (mean)"}
    rows = []
    for arm in arms:
        rows.append((names[arm], results[arm], "fusion"))
        if arm in ("smil", "mean"):
            rows += [(f"  {h.upper()} head of it", results[arm], h) for h in ("om", "im", "tem")]
    print(f"\n{args.folds}-fold patient-level CV, {len(cases)} synthetic cases, "
          f"{args.epochs} epochs, lr {args.lr:g}")
    print(f"| {'model / output':22s} | accuracy mean +/- sd | per fold | train s |")
    print(f"|{'-' * 24}|{'-' * 21}|{'-' * 10}|{'-' * 9}|")
    for name, res, head in rows:
        acc = res["accuracy"][head]
        folds = " ".join(f"{r[f'accuracy_{head}']:.2f}" for r in res["per_fold"])
        print(f"| {name:22s} | {acc['mean']:.3f} +/- {acc['sd']:.3f}       | {folds} | "
              f"{res.get('seconds', '')} |")

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
