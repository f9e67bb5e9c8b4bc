"""What every stage of one slide's run sees: a frozen `SlideContext`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..slide import Slide
from ..store import SlideStore
from ..tasks import Task
from .options import RunOptions

if TYPE_CHECKING:
    import torch

Log = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class LoadedModel:
    """A network in eval mode (None for an alternative mode such as a weight-free
    detector) and its description: the checkpoint's sidecar plus its ``path``."""

    network: torch.nn.Module | None
    meta: dict[str, Any]


@dataclass(frozen=True)
class SlideContext:
    """One slide's run: the open slide, its store and output folder, the task and the
    run's options, the slide file's fingerprint, and the models (loaded before the first
    stage, so a wrong checkpoint fails before the long work).

    model        the task's model, or the alternative mode ``opts.model`` names; None
                 when the run stops before the model stages
    classifier   the task's object classifier, or None
    extra_inputs fingerprint of the task's inputs besides the slide (a case's image files)
    """

    slide: Slide
    store: SlideStore
    task: Task
    opts: RunOptions
    slide_id: str
    out_dir: Path
    fingerprint: dict[str, Any]
    log: Log
    model: LoadedModel | None = None
    classifier: LoadedModel | None = None
    extra_inputs: dict[str, Any] | None = None
