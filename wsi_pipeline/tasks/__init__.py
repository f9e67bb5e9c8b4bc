"""Task registry: each module under ``tasks/`` declares one task's resolutions, stain
reference, model and rules as a `TaskSpec`; `get_task` looks one up by its CLI name."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError


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
