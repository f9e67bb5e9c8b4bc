"""`wsi-synth`: write a synthetic slide with its ground truth.

    wsi-synth --task fls --out out/fls_001.svs --seed 1 --positive --pen
    wsi-synth --task fls --out out/fls_red.svs --seed 1 --pen red
    wsi-synth --task kidney-layer --species mouse --out out/mouse_001.svs --mpp 2
    wsi-synth --task liver --label HCC --out out/liver_001.svs
    wsi-synth --task liver --cohort 40 --annotated 8 --out out/liver_cohort --seed 3
    wsi-synth --task glomerular-dx --label MN --out out/case_001 --seed 2
    wsi-synth --task glomerular-dx --cohort 30 --out out/cases
    wsi-synth --task fls --out out/fls_r1.svs --seed 1 --randomise

Defaults per task: fls 12000 x 9000 px, kidney-layer and mesangial 16000 x 8000 px, liver
8000 x 6000 px, all at 0.5 um/px (20x); a mouse kidney-layer slide covers 11 x 7 mm at the
chosen MPP (22000 x 14000 px at 0.5 um/px). A liver cohort (--cohort N) writes N patients
(half HCC, half CCA; 1-2 slides each, 4096 x 3072 px by default) under the --out folder,
FOLDER/<patient>/<patient>_<n>.svs, and FOLDER/cohort.csv; only the --annotated K patients
(default N // 4) keep their label masks. A glomerular-dx case is a folder (om/ PAS biopsy,
6000 x 4000 px by default; im/ immunofluorescence image; tem/ 3-15 electron micrographs);
--cohort N writes N cases and cases.csv. Expected failures print one line
`wsi-synth: error: ...` on stderr and exit non-zero (2 = usage); no traceback.
--randomise draws, per slide and from its seed, stain vectors and strengths around the
real references, section and nuclear variation, artefacts (folds, bubbles, debris,
marking dye) and scanner effects (focus blur, illumination, field seams, white balance,
noise, JPEG quality); it applies to cohorts and cases too, and is recorded in each
slide's truth JSON (generator.randomise). Without it a slide is exactly as before.
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
                   help="fls, kidney-layer, mesangial, liver or glomerular-dx (a case "
                   "folder: om/ slide, im/ and tem/ images), or an installed task plugin "
                   "with a generator")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="slide file to write (.svs); glomerular-dx: the case folder; with "
                   "--cohort, the cohort folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--width", type=int, metavar="PX", help="level-0 width in pixels")
    p.add_argument("--height", type=int, metavar="PX", help="level-0 height in pixels")
    p.add_argument("--mpp", type=float, metavar="UM", help="microns per pixel (default 0.5)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--label", help="true diagnosis: fls positive|negative, kidney-layer "
                   "adequate|inadequate, mesangial M0|M1, liver HCC|CCA, glomerular-dx "
                   "IgAN|MN|LN (default: drawn from the seed)")
    g.add_argument("--positive", action="store_true", help="fls: FS >= 1; mesangial: M1")
    g.add_argument("--negative", action="store_true", help="fls: FS < 1; mesangial: M0")
    p.add_argument("--species", choices=("human", "mouse"),
                   help="kidney-layer only: human needle cores (default) or a whole mouse "
                   "kidney section")
    p.add_argument("--cohort", type=int, metavar="N",
                   help="liver: a cohort of N patients (cohort.csv); glomerular-dx: N "
                   "cases (cases.csv); written into the --out folder")
    p.add_argument("--annotated", type=int, metavar="K",
                   help="liver --cohort: patients that keep their label masks "
                   "(default N // 4)")
    p.add_argument("--pen", nargs="?", const=True, default=False, metavar="COLOUR",
                   help="add a marker-pen stroke; COLOUR red, green, blue or black "
                   "(default: drawn from the seed among blue, green and black)")
    p.add_argument("--fold", action="store_true", help="add a tissue fold")
    p.add_argument("--randomise", action="store_true",
                   help="domain-randomise stains, section, nuclei, artefacts and scanner "
                   "effects per slide (from the seed; recorded in the truth JSON)")
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


def _pen_colour(args) -> str | None:
    """The ink of ``--pen COLOUR``; None for a plain ``--pen`` (drawn from the seed)."""
    from .scene import PEN_INKS

    if not isinstance(args.pen, str):
        return None
    colour = args.pen.lower()
    if colour not in PEN_INKS:
        raise UsageError(f"--pen {args.pen!r}: choose a colour among {', '.join(PEN_INKS)}")
    return colour


def run(argv: list[str] | None = None) -> dict:
    """Parse arguments and write the slide; returns the truth dict."""
    from .generate import get_spec, write_slide

    args = build_parser().parse_args(argv)
    plugin = _plugin(args.task)
    if plugin is not None:
        return _from_plugin(plugin, args)
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
    if args.cohort is not None or args.annotated is not None:
        return _cohort(args, progress)
    if args.task == "glomerular-dx":
        return _case(args)
    truth = write_slide(args.task, args.out, width=args.width, height=args.height,
                        mpp=args.mpp, seed=args.seed, label=_label(args),
                        pen=_pen_colour(args) or bool(args.pen), fold=args.fold,
                        workers=args.workers, progress=progress, species=args.species,
                        randomise=args.randomise)
    if not args.quiet:
        gen = truth["generator"]
        key = next(iter(truth["scores"]), None)
        score = f", {key} {truth['scores'][key]}" if key else ""
        print(f"wrote {args.out} ({gen['width']}x{gen['height']} px, {gen['mpp']} um/px, "
              f"{len(gen['levels'])} levels); diagnosis {truth['diagnosis']['label']}{score}")
    return truth


def _plugin(name: str):
    """An installed task plugin (not one of the generators here) with a ``synth`` hook."""
    from ..tasks import task_names
    from .generate import task_specs

    if name in task_specs() or name not in task_names(trainable=True):
        return None
    from ..tasks import get_plugin

    plugin = get_plugin(name, trainable=True)
    if plugin.synth is None:
        raise UsageError(f"task {name!r} has no synthetic-slide generator")
    return plugin


def _from_plugin(plugin, args) -> dict:
    """A slide from a task plugin's own ``synth`` hook (--label, size, MPP, seed)."""
    if args.cohort or args.annotated or args.pen or args.fold or args.species \
            or args.positive or args.negative or args.randomise:
        raise UsageError(f"task {plugin.name!r} (a plugin) takes --label, --width, --height, "
                         "--mpp, --seed and --workers only")
    truth = plugin.synth(args.out, width=args.width, height=args.height, mpp=args.mpp,
                         seed=args.seed, label=args.label, workers=args.workers)
    if not args.quiet:
        print(f"wrote {args.out} ({plugin.name}); diagnosis "
              f"{(truth.get('diagnosis') or {}).get('label')}")
    return truth


def _case(args) -> dict:
    """glomerular-dx: a case folder (om/ slide, im/ immunofluorescence, tem/ bag) at --out."""
    from .cases import write_case

    if args.pen or args.fold or args.positive or args.negative:
        raise UsageError("--pen, --fold, --positive and --negative do not apply to "
                         "glomerular-dx cases; use --label IgAN|MN|LN")
    truth = write_case(args.out, label=args.label, seed=args.seed,
                       om_size_px=(args.width or 6000, args.height or 4000),
                       mpp=args.mpp or 0.5, workers=args.workers, randomise=args.randomise)
    if not args.quiet:
        print(f"wrote case {args.out}: diagnosis {truth['diagnosis']['label']}, "
              f"{truth['counts']['tem_images']} TEM images")
    return truth


def _cohort(args, progress) -> dict:
    """--cohort: a liver cohort folder, returns {"cohort": cohort.csv rows}; or a folder of
    glomerular-dx cases, returns {"cases": their truth dicts}."""
    if args.cohort is None:
        raise UsageError("--annotated applies with --cohort only")
    if args.task == "glomerular-dx":
        from .cases import write_case_cohort

        rows = write_case_cohort(args.out, args.cohort, seed=args.seed, workers=args.workers,
                                 randomise=args.randomise)
        if not args.quiet:
            print(f"wrote {args.cohort} cases in {args.out}; list in cases.csv")
        return {"cases": rows}
    if args.task != "liver":
        raise UsageError(f"--cohort applies to --task liver and glomerular-dx, not "
                         f"{args.task!r}")
    if args.label or args.positive or args.negative or args.pen or args.fold:
        raise UsageError("--cohort draws the diagnoses itself (half HCC, half CCA); "
                         "--label, --pen and --fold do not apply")
    from .liver import write_liver_cohort

    annotated = args.cohort // 4 if args.annotated is None else args.annotated
    rows = write_liver_cohort(args.out, args.cohort, annotated, seed=args.seed,
                              width=args.width, height=args.height, mpp=args.mpp,
                              workers=args.workers, progress=progress,
                              randomise=args.randomise)
    if not args.quiet:
        n_hcc = len({r["patient_id"] for r in rows if r["diagnosis"] == "HCC"})
        n_ann = len({r["patient_id"] for r in rows if r["annotated"]})
        print(f"wrote cohort {args.out}: {args.cohort} patients ({n_hcc} HCC, "
              f"{args.cohort - n_hcc} CCA), {len(rows)} slides, {n_ann} patients annotated; "
              f"list in cohort.csv")
    return {"cohort": rows}


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
