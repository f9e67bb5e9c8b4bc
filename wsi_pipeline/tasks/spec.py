"""The task contract: what a task module declares (`TaskSpec`, `ModelSpec`) and the hooks it
hands the pipeline (`Task`). A task is one module that builds a `Task` and registers it under
the entry-point group ``wsi_pipeline.tasks``; the runner, the batch tools, ``wsi-run``,
``wsi-train`` and the Python API only ever talk to a task through this contract.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the contract names these types; importing them here would pull in torch
    import torch

    from ..slide import Slide
    from ..stain import StainFit
    from ..store import SlideStore

RGB = tuple[int, int, int]


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
    demo_weights    the bundled demo checkpoint: a stem under ``wsi_pipeline/weights``, or
                    the path of a ``.safetensors`` file (a plugin ships its own)
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
    input_kind   "slide", or "case" (a folder of modalities whose om/ holds the slide)
    """

    name: str
    title: str
    mpp: float
    tile_px: int
    stain: str
    context: tuple[int, ...] = (1, 2, 4)
    input_kind: str = "slide"
    model: ModelSpec | None = None  # None: no model stage
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

    slide        the open slide
    store        the slide's store (pyramid, predictions, labels)
    stain        the slide's fitted stain matrices
    areas_mm2    the stitch stage's areas
    classifier   the task's object classifier (eval mode) or None
    device       where to run the classifier ("cpu" or "cuda"), and its batch size
    """

    slide: Slide
    store: SlideStore
    stain: StainFit
    areas_mm2: dict[str, float]
    classifier: torch.nn.Module | None = None
    device: str = "cpu"
    batch_size: int = 8


@dataclass(frozen=True)
class NoParams:
    """Rules of a task that has none to tune."""


@dataclass(frozen=True)
class AltModel:
    """A model mode besides the network (``wsi-run --model NAME``), run by the infer stage.

    description  one line for the report's provenance
    params       everything the mode's output depends on (part of the stage's inputs)
    infer        ``infer(slide, store, stain, workers, progress) -> dict``: writes what the
                 stitch stage reads (``pred/prob`` at the task's ``pred_mpp``) and returns
                 the stage's summary
    """

    description: str
    params: Callable[[], dict[str, Any]]
    infer: Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class PatientRule:
    """A diagnosis over all slides of a patient (``OUT/cases.csv``).

    columns  the rule's own ``cases.csv`` columns, after ``diagnosis``
    rule     ``rule(reports) -> {"diagnosis": label, <column>: value, ...}`` from the
             ``report.json`` of each of the patient's finished slides
    """

    columns: tuple[str, ...]
    rule: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class Task:
    """A task plugin: everything task-specific the pipeline runs, as data and hooks.

    spec            resolutions, stain, model(s)
    legend          class id -> name of the label map ``pred/classes`` (and mask.ome.tif)
    stitch          ``stitch(store, params) -> {"mpp", "areas_mm2"}``: writes
                    ``pred/labels`` from ``pred/prob`` band by band
    measure         ``measure(MeasureInputs, params) -> {"diagnosis", "scores", "counts",
                    "areas_mm2", "objects"}``: writes ``pred/classes``
    params          the frozen dataclass of the stitch and measure rules (its defaults
                    are part of both stages' inputs)
    measure_params  everything else the measure stage depends on (recorded in the manifest)
    overlay_classes label-map classes drawn over the overlay thumbnail
    region_classes  label-map classes exported as QuPath region annotations
                    (regions.geojson, beside the tissue outline)
    main_score      the key of ``scores`` that the batch page plots across slides
    colors          class id -> RGB of the overlay and QuPath objects (else Okabe-Ito by id)
    modes           alternative models by ``--model`` name (e.g. a weight-free detector)
    patient_rule    a diagnosis over a patient's slides, or None
    read_inputs     for a "case" task, reads the case before any slide work (fails early
                    on a missing modality) and returns a fingerprint of its files, which
                    the measure stage's inputs include
    demo            ``demo(folder) -> path``: writes the task's demo input into ``folder``
                    (``wsi-run --demo``); None: no demo
    synth           ``synth(path, *, width, height, mpp, seed, label, workers) -> truth``:
                    a synthetic slide with ground truth (``wsi-train --synth``); None: none
    synth_labels    the labels ``synth`` takes, positive first (a cohort alternates them)
    trainer         how ``wsi-train`` trains the task: "slides" (a segmentation model on
                    annotated slides), "crops" (an object classifier on crops) or "cases"
                    (a case-level model)
    runnable        False for a model that only ``wsi-train`` addresses (a shared detector)
    """

    spec: TaskSpec
    legend: Mapping[int, str]
    stitch: Callable[..., dict[str, Any]]
    measure: Callable[..., dict[str, Any]]
    params: type = NoParams
    measure_params: Callable[[], dict[str, Any]] = dict
    overlay_classes: tuple[int, ...] = ()
    region_classes: tuple[int, ...] = ()
    main_score: str | None = None
    colors: Mapping[int, RGB] = field(default_factory=dict)
    modes: Mapping[str, AltModel] = field(default_factory=dict)
    patient_rule: PatientRule | None = None
    read_inputs: Callable[[str | Path], dict[str, Any]] | None = None
    demo: Callable[[Path], Path] | None = None
    synth: Callable[..., dict[str, Any]] | None = None
    synth_labels: tuple[str, ...] = ()
    trainer: str = "slides"
    runnable: bool = True

    @property
    def name(self) -> str:
        return self.spec.name
