"""`wsi-synth`: write a synthetic slide with its ground truth.

    wsi-synth --task fls --out out/fls_001.svs --seed 1 --positive --pen
    wsi-synth --task kidney-layer --species mouse --out out/mouse_001.svs --mpp 2

Defaults per task: fls 12000 x 9000 px, kidney-layer and mesangial 16000 x 8000 px, all at
0.5 um/px (20x); a mouse kidney-layer slide covers 11 x 7 mm at the chosen MPP (22000 x
14000 px at 0.5 um/px). Expected failures print one line `wsi-synth: error: ...` on stderr
and exit non-zero (2 = usage); no traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError, WsiError

_SHORTHANDS = {"fls": ("positive", "negative"), "mesangial": ("M1", "M0")}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wsi-synth", description="Write a synthetic whole-slide image (Aperio "
                "SVS) and its ground truth (<stem>.truth.json, <stem>.truth.zarr).")
    p.add_argument("--task", required=True,
                   help="fls, kidney-layer or mesangial (liver, glomerular-dx: later)")
    p.add_argument("--out", required=True, metavar="PATH", help="slide file to write (.svs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--width", type=int, metavar="PX", help="level-0 width in pixels")
    p.add_argument("--height", type=int, metavar="PX", help="level-0 height in pixels")
    p.add_argument("--mpp", type=float, metavar="UM", help="microns per pixel (default 0.5)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--label", help="true diagnosis: fls positive|negative, kidney-layer "
                   "adequate|inadequate, mesangial M0|M1 (default: drawn from the seed)")
    g.add_argument("--positive", action="store_true", help="fls: FS >= 1; mesangial: M1")
    g.add_argument("--negative", action="store_true", help="fls: FS < 1; mesangial: M0")
    p.add_argument("--species", choices=("human", "mouse"),
                   help="kidney-layer only: human needle cores (default) or a whole mouse "
                   "kidney section")
    p.add_argument("--pen", action="store_true", help="add a marker-pen stroke")
    p.add_argument("--fold", action="store_true", help="add a tissue fold")
    p.add_argument("--workers", type=int, metavar="N",
                   help="rendering processes (default: up to 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _label(args) -> str | None:
    if not (args.positive or args.negative):
        return args.label
    if args.task not in _SHORTHANDS:
        raise UsageError(f"--positive/--negative apply to fls and mesangial; for task "
                         f"{args.task!r} use --label")
    pos, neg = _SHORTHANDS[args.task]
    return pos if args.positive else neg


def run(argv: list[str] | None = None) -> dict:
    """Parse arguments and write the slide; returns the truth dict."""
    from .generate import get_spec, write_slide

    args = build_parser().parse_args(argv)
    get_spec(args.task)
    if args.workers is not None and args.workers < 0:
        raise UsageError("--workers must be >= 0")
    if args.species is not None and args.task != "kidney-layer":
        raise UsageError(f"--species applies to --task kidney-layer only, not {args.task!r}")
    progress = None
    if not args.quiet and sys.stderr.isatty():
        from functools import partial

        from tqdm import tqdm

        progress = partial(tqdm, unit="tile", leave=False, dynamic_ncols=True)
    truth = write_slide(args.task, args.out, width=args.width, height=args.height,
                        mpp=args.mpp, seed=args.seed, label=_label(args), pen=args.pen,
                        fold=args.fold, workers=args.workers, progress=progress,
                        species=args.species)
    if not args.quiet:
        gen = truth["generator"]
        key = next(iter(truth["scores"]), None)
        score = f", {key} {truth['scores'][key]}" if key else ""
        print(f"wrote {args.out} ({gen['width']}x{gen['height']} px, {gen['mpp']} um/px, "
              f"{len(gen['levels'])} levels); diagnosis {truth['diagnosis']['label']}{score}")
    return truth


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    try:
        run(argv)
    except WsiError as e:
        print(f"wsi-synth: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("wsi-synth: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
