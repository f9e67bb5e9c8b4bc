"""wsi_pipeline: from a gigapixel whole-slide image to a diagnosis-level report.

From Python::

    import wsi_pipeline as w
    report = w.analyse("slide.svs", task="fls", out="wsi-out")
    report.diagnosis["label"], report.scores, report.files

and the stage functions on your own arrays: `open_slide` (read in microns at any MPP),
`detect_tissue` and `tile_grid`, `fit_vahadane` and `normalise_stain`, `read_pyramid`,
`predict_region`. Names are imported on first use, so ``import wsi_pipeline`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "analyse": "api", "Report": "api", "read_pyramid": "api", "PyramidLevel": "api",
    "normalise_stain": "api", "predict_region": "api",
    "open_slide": "slide", "Slide": "slide",
    "detect_tissue": "tissue", "tile_grid": "tissue", "TissueParams": "tissue",
    "fit_vahadane": "stain", "StainFit": "stain",
    "get_task": "tasks", "task_names": "tasks", "Task": "tasks", "TaskSpec": "tasks",
    "WsiError": "errors",
}
__all__ = ["PyramidLevel", "Report", "Slide", "StainFit", "Task", "TaskSpec", "TissueParams",
           "WsiError", "__version__", "analyse", "detect_tissue", "fit_vahadane", "get_task",
           "normalise_stain", "open_slide", "predict_region", "read_pyramid", "task_names",
           "tile_grid"]

if TYPE_CHECKING:
    from .api import PyramidLevel, Report, analyse, normalise_stain, predict_region, read_pyramid
    from .errors import WsiError
    from .slide import Slide, open_slide
    from .stain import StainFit, fit_vahadane
    from .tasks import Task, TaskSpec, get_task, task_names
    from .tissue import TissueParams, detect_tissue, tile_grid


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'wsi_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
