"""`write_slide`: the synthetic tasks by name, and a slide of one of them written to disk.

The registry of task names (`task_specs`, `get_spec`) imports every task module; the
writing itself is task-independent and lives in `writer`, which task modules may import in
turn (liver's cohorts, the glomerular-dx cases). No module of the package imports this one
but the package `__init__` and the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import UsageError
from . import kidney, liver, salivary
from .common import SynthSpec
from .writer import JPEG_QUALITY, TILE_PX, resolve_mpp, write_spec_slide


def task_specs() -> dict[str, SynthSpec]:
    """All implemented synthetic tasks by name."""
    return {spec.name: spec for spec in (salivary.SPEC, kidney.LAYER_SPEC, kidney.MESANGIAL_SPEC,
                                         liver.SPEC, kidney.CASE_OM_SPEC)}


def get_spec(task: str) -> SynthSpec:
    """The SynthSpec of `task`, or a UsageError naming the choices."""
    specs = task_specs()
    if task not in specs:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(sorted(specs))}")
    return specs[task]


def write_slide(task: str, path: str | os.PathLike, *, width: int | None = None,
                height: int | None = None, mpp: float | None = None, seed: int = 0,
                label: str | None = None, pen: bool | str = False, fold: bool = False,
                workers: int | None = None, progress: Callable | None = None,
                tile: int = TILE_PX, quality: int = JPEG_QUALITY,
                species: str | None = None, randomise: bool = False) -> dict:
    """Write a synthetic slide (Aperio SVS) and its truth; return the truth dict.

    task: 'fls', 'kidney-layer', 'mesangial', 'liver' or 'glomerular-dx' (the biopsy slide
    of a case); width/height in level-0 pixels and mpp in um/px (defaults per task); label:
    a true diagnosis label the task accepts (e.g. 'positive', 'M1', 'HCC'), None = drawn
    from the seed; workers: rendering processes (default: up to 2, inline for small
    slides); progress: a tqdm-like factory or None; species: kidney-layer only, 'human'
    (default: needle cores) or 'mouse' (a whole kidney section; default size 11 x 7 mm at
    the given MPP); randomise: domain-randomised stains, section, nuclei, artefacts and
    scanner effects, drawn from the seed (`synth.randomise`; recorded in the truth JSON
    under generator.randomise; the label mask is unchanged). False keeps the slide exactly
    as without the option.
    Writes PATH, <stem>.truth.json and <stem>.truth.zarr.
    """
    spec = get_spec(task)
    build_kw = {}
    if species is not None:
        mpp = resolve_mpp(spec, mpp)
        if task != "kidney-layer":
            raise UsageError(f"species applies to task kidney-layer only, not {task!r}")
        default_size = kidney.default_size_px(species, mpp)
        width = width or default_size[0]
        height = height or default_size[1]
        build_kw = {"species": species}
    return write_spec_slide(spec, path, width=width, height=height, mpp=mpp, seed=seed,
                            label=label, pen=pen, fold=fold, workers=workers,
                            progress=progress, tile=tile, quality=quality, build_kw=build_kw,
                            randomise=randomise)
