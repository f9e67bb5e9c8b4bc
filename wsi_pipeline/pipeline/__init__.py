"""The runner: one slide through the stages, for any task (it names none).

- `options`: the stage names, `RunOptions`, `resolve_device`
- `context`: `SlideContext`, what every stage sees
- `stages`: the seven stages as records (name, params, run)
- `runner`: `run_slide`, the loop over the stages with resume
- `report`: report.json from the stages' results
"""

from .options import MODEL_STAGES, STAGES, RunOptions, resolve_device
from .runner import run_slide

__all__ = ["MODEL_STAGES", "STAGES", "RunOptions", "resolve_device", "run_slide"]
