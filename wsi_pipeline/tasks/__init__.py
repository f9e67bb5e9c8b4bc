"""Task registry: each module under ``tasks/`` declares one task's resolutions, stain
reference, model and rules as a `TaskSpec`; `get_task` looks one up by its CLI name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import UsageError


@dataclass(frozen=True)
class ModelSpec:
    """The network a task runs and how its output is read.

    arch            name in `wsi_pipeline.models.ARCHITECTURES`
    classes         one name per output channel (one channel = binary, sigmoid)
    annotations     per output class, the annotation class names that mean it (truth
                    legend names, QuPath classification names; case-insensitive)
    out_downsample  probability maps are stored at ``mpp * out_downsample`` um/px
    overlap_px      overlap of neighbouring inference windows at the working MPP, px
    demo_weights    stem of the bundled demo checkpoint under ``wsi_pipeline/weights``
    """

    arch: str
    classes: tuple[str, ...]
    annotations: dict[str, tuple[str, ...]]
    out_downsample: int = 4
    overlap_px: int = 128
    demo_weights: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """What the pipeline needs to know about a task before any model runs.

    mpp          working resolution of the normalised pyramid's finest level, um/px
    tile_px      tile (and zarr chunk) edge in pixels at every pyramid level
    context      downsample factors of the stored pyramid levels relative to ``mpp``
    stain        name of the stain reference in `wsi_pipeline.stain.REFERENCES`
    """

    name: str
    title: str
    mpp: float
    tile_px: int
    stain: str
    context: tuple[int, ...] = (1, 2, 4)
    input_kind: str = "slide"  # "slide" or "case" (a folder of modalities)
    model: ModelSpec | None = None  # None: no model stage yet

    @property
    def pred_mpp(self) -> float:
        """Resolution of the stored probability and label maps, um/px."""
        return self.mpp * (self.model.out_downsample if self.model else 1)

    @property
    def tile_um(self) -> float:
        """Tile edge at the working resolution, in microns."""
        return self.tile_px * self.mpp

    @property
    def level_mpps(self) -> tuple[float, ...]:
        return tuple(self.mpp * f for f in self.context)


def _registry() -> dict[str, TaskSpec]:
    from . import fls, glomerular_dx, kidney_layer, liver, mesangial

    return {m.TASK.name: m.TASK for m in (fls, liver, kidney_layer, mesangial, glomerular_dx)}


TASK_NAMES: tuple[str, ...] = ("fls", "liver", "kidney-layer", "mesangial", "glomerular-dx")


def get_task(name: str) -> TaskSpec:
    """The `TaskSpec` registered under ``name`` (e.g. ``"fls"``)."""
    tasks = _registry()
    if name not in tasks:
        raise UsageError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return tasks[name]


def task_rules(task: TaskSpec) -> ModuleType:
    """The module under ``tasks/`` that declares ``task`` and its post-processing
    (``Params``, ``LEGEND``, ``stitch``, ``measure``)."""
    return importlib.import_module(f"{__name__}.{task.name.replace('-', '_')}")
