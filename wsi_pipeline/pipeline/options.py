"""The stage names and the options of a run (``wsi-run``'s, less the batch's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..tissue import TissueParams

STAGES: tuple[str, ...] = ("tissue", "stain", "pyramid", "infer", "stitch", "measure",
                           "export")
MODEL_STAGES = STAGES[STAGES.index("infer"):]


@dataclass(frozen=True)
class RunOptions:
    """Everything a run needs besides the slide and the task (the CLI's options)."""

    out: Path
    until: str = "export"
    mpp: float | None = None
    backend: str = "auto"
    stain_backend: str = "numpy"
    device: str = "auto"
    runtime: str = "auto"             # CPU inference runtime (wsi_pipeline.runtime.RUNTIMES)
    workers: int = 2
    batch_size: int = 8
    weights: Path | None = None       # None: the task's bundled demo weights
    model: str = "network"            # "network", or one of the task's alternative modes
    force: bool = False
    tissue: TissueParams = field(default_factory=TissueParams)
    min_tile_tissue: float = 0.01     # fraction of a tile that must be tissue (edges count)
    stain_sample_tiles: int = 16      # tiles sampled for the once-per-slide stain fit
    seed: int = 0
    show_progress: bool = False
    argv: tuple[str, ...] = ()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one fails."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible to torch")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device
