"""Tasks: one module per task declares its resolutions, stain, model and rules as a `Task`
(`spec.py` holds the contract) and registers it under the entry-point group
``wsi_pipeline.tasks`` (``pyproject.toml``). The five built-in tasks register that way, so
an installed package of a lab's own can add a sixth without touching this one::

    [project.entry-points."wsi_pipeline.tasks"]
    tumour-area = "my_lab.tumour_area:TASK"

`get_plugin` loads one by its CLI name, `get_task` gives its `TaskSpec`.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from ..errors import UsageError
from .spec import (
    AltModel,
    MeasureInputs,
    ModelSpec,
    NoParams,
    PatientRule,
    Task,
    TaskSpec,
)

ENTRY_POINT_GROUP = "wsi_pipeline.tasks"

__all__ = ["ENTRY_POINT_GROUP", "AltModel", "MeasureInputs", "ModelSpec", "NoParams",
           "PatientRule", "Task", "TaskSpec", "get_plugin", "get_task", "task_names"]


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, EntryPoint]:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if not found:
        raise UsageError("no task is registered: wsi_pipeline is not installed (run "
                         "`pip install -e .` in its folder)")
    return found


def _load(name: str) -> Task:
    task = _entry_points()[name].load()
    if not isinstance(task, Task) or task.name != name:
        raise UsageError(f"the entry point {name!r} of group {ENTRY_POINT_GROUP} is not a "
                         f"wsi_pipeline Task named {name!r} ({_entry_points()[name].value})")
    return task


def task_names(*, trainable: bool = False) -> tuple[str, ...]:
    """The installed tasks ``wsi-run`` runs, in registration order; with ``trainable``,
    also the models that only ``wsi-train`` addresses (the shared glomerulus detector)."""
    return tuple(name for name in _entry_points()
                 if trainable or _load(name).runnable)


def get_plugin(name: str, *, trainable: bool = False) -> Task:
    """The `Task` registered under ``name`` (e.g. ``"fls"``); a typo gets a suggestion."""
    names = task_names(trainable=trainable)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown task {name!r}{hint} (installed: {', '.join(names)})")
    return _load(name)


def get_task(name: str, *, trainable: bool = False) -> TaskSpec:
    """The `TaskSpec` of the task registered under ``name``."""
    return get_plugin(name, trainable=trainable).spec
