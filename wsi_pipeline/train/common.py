"""What every ``wsi-train`` trainer shares: the log, the output folders, option parsing and
the JSON and metadata helpers. Imports nothing else of the `train` package."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputNotWritable, UsageError

if TYPE_CHECKING:
    import torch

    from ..tasks import TaskSpec

Log = Callable[[str], None]


def say(message: str) -> None:
    """The default log: one line on stdout, flushed (progress under a batch scheduler)."""
    print(message, flush=True)


def make_folders(out: Path, work: Path | None) -> Path:
    """Create the checkpoint's folder and the work folder (default: ``OUT.work``); returns
    the work folder. Raises OutputNotWritable with one line when either cannot be made."""
    work = work or Path(str(out) + ".work")
    for folder in (out.parent, work):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputNotWritable(f"cannot create {folder}: {exc.strerror or exc}") from None
    return work


def parse_size(text: str, option: str) -> tuple[int, int]:
    """``"WxH"`` -> (W, H), both positive; a UsageError naming ``option`` otherwise."""
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
        assert len(size) == 2 and min(size) > 0
    except (ValueError, AssertionError):
        raise UsageError(f"{option} {text!r}: expected WxH, e.g. 6000x4500") from None
    return size  # type: ignore[return-value]


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def command_line(argv: Sequence[str]) -> str:
    """The command as a sidecar records it: ``wsi-train`` and its quoted arguments."""
    return "wsi-train " + shlex.join(list(argv))


def software_meta(device: torch.device) -> dict[str, Any]:
    """The package and torch versions and the device, for a sidecar's ``training``."""
    import torch

    from ..version import __version__

    return {"package_version": __version__, "torch": torch.__version__, "device": str(device)}


def stain_reference_meta(task: TaskSpec) -> dict[str, Any]:
    """The sidecar's ``stain_reference``: the task's reference basis by name and value."""
    from ..stain import REFERENCES

    return {"name": task.stain, **REFERENCES[task.stain].to_dict()}
