"""Task registry: each module under ``tasks/`` declares one task's resolutions, stain
reference, model and rules as a `TaskSpec`; `get_task` looks one up by its CLI name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ..errors import UsageError


@dataclass(frozen=True)
class ModelSpec:
    """The network a task runs and how its output is read.

    arch            name in `wsi_pipeline.models.ARCHITECTURES`
    classes         one name per output channel (one channel = binary, sigmoid)
    annotations     per output class, the annotation class names that mean it (truth
                    legend names, QuPath classification names; case-insensitive)
    out_downsample  probability maps are stored at ``out_downsample`` times the MPP of the
                    level the network reads
    overlap_px      overlap of neighbouring inference windows, px at that level
    demo_weights    stem of the bundled demo checkpoint under ``wsi_pipeline/weights``
    level           index into the task's ``context`` of the pyramid level the network's
                    finest input reads (0 = the working MPP); its windows are ``tile_px``
                    pixels at that level
    checkpoint_task the task name its checkpoints carry (default: the task's own name)
    loss            training loss: "bce_dice" (one class), "focal" (focal CE), "joint"
                    (weighted focal + Dice, L_t) or "hybrid" (CE + Dice, L_s); "auto" =
                    bce_dice for one class, else hybrid
    class_weights   per-class loss weights of a softmax model (empty: all 1)
    score_classes   classes whose mean Dice scores a validation (empty: all but 0)
    complementary   per diagnosis, the class a weakly labelled slide of that diagnosis
                    cannot show (its patches' complementary label; empty: no weak labels)
    """

    arch: str
    classes: tuple[str, ...]
    annotations: dict[str, tuple[str, ...]]
    out_downsample: int = 4
    overlap_px: int = 128
    demo_weights: str | None = None
    level: int = 0
    checkpoint_task: str | None = None
    loss: str = "auto"
    class_weights: tuple[float, ...] = ()
    score_classes: tuple[int, ...] = ()
    complementary: dict[str, str] = field(default_factory=dict)

    @property
    def softmax(self) -> bool:
        """Several classes share one softmax (class 0 = background); else one sigmoid."""
        return len(self.classes) > 1


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
    classifier: ModelSpec | None = None  # a second network the measure stage runs on objects

    @property
    def pred_mpp(self) -> float:
        """Resolution of the stored probability and label maps, um/px."""
        if self.model is None:
            return self.mpp
        return self.mpp * self.context[self.model.level] * self.model.out_downsample

    def checkpoint_task(self, spec: ModelSpec) -> str:
        """The task name that checkpoints of ``spec`` (this task's model or classifier)
        carry in their sidecar."""
        return spec.checkpoint_task or self.name

    @property
    def tile_um(self) -> float:
        """Tile edge at the working resolution, in microns."""
        return self.tile_px * self.mpp

    @property
    def level_mpps(self) -> tuple[float, ...]:
        return tuple(self.mpp * f for f in self.context)


@dataclass(frozen=True)
class MeasureInputs:
    """What a task's ``measure(inputs)`` gets from the pipeline.

    slide        the open `wsi_pipeline.slide.Slide`
    store        the slide's `wsi_pipeline.store.SlideStore` (pyramid, predictions, labels)
    stain        the slide's `wsi_pipeline.stain.StainFit`
    areas_mm2    the stitch stage's areas
    classifier   the task's object classifier (eval mode) or None
    device       where to run the classifier ("cpu" or "cuda"), and its batch size
    """

    slide: Any
    store: Any
    stain: Any
    areas_mm2: dict[str, float]
    classifier: Any = None
    device: str = "cpu"
    batch_size: int = 8


def _registry() -> dict[str, TaskSpec]:
    from . import fls, glomerular_dx, glomeruli, kidney_layer, liver, mesangial

    return {m.TASK.name: m.TASK
            for m in (fls, liver, kidney_layer, mesangial, glomerular_dx, glomeruli)}


TASK_NAMES: tuple[str, ...] = ("fls", "liver", "kidney-layer", "mesangial", "glomerular-dx")
# models trained on their own but run only inside a task (the glomerulus detector)
TRAINABLE_NAMES: tuple[str, ...] = (*TASK_NAMES, "glomeruli")


def get_task(name: str, *, trainable: bool = False) -> TaskSpec:
    """The `TaskSpec` registered under ``name`` (e.g. ``"fls"``); with ``trainable``, also
    the shared models that only ``wsi-train`` addresses (``"glomeruli"``)."""
    names = TRAINABLE_NAMES if trainable else TASK_NAMES
    if name not in names:
        raise UsageError(f"unknown task {name!r}; choose one of {', '.join(names)}")
    return _registry()[name]


def task_rules(task: TaskSpec) -> ModuleType:
    """The module under ``tasks/`` that declares ``task`` and its post-processing
    (``Params``, ``LEGEND``, ``stitch``, ``measure``)."""
    return importlib.import_module(f"{__name__}.{task.name.replace('-', '_')}")
