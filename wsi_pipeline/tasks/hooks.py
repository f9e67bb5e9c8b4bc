"""Ready-made `Task` hooks for tasks whose synthetic slides and demo input come from
``wsi-synth``'s generators."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def synth_slides(generator: str) -> Callable[..., dict[str, Any]]:
    """A ``Task.synth`` hook: ``wsi-synth --task generator`` slides with their truth."""

    def synth(path: str | Path, **kwargs: Any) -> dict[str, Any]:
        from ..synth import write_slide

        return write_slide(generator, path, **kwargs)

    synth.__doc__ = f"A synthetic {generator} slide with its truth (`synth.write_slide`)."
    return synth


def demo_slide(synth: Callable[..., dict[str, Any]], stem: str, **kwargs: Any
               ) -> Callable[[Path], Path]:
    """A ``Task.demo`` hook: writes ``<folder>/<stem>.svs`` with ``synth(**kwargs)`` (a
    fixed seed that no demo weights were trained on)."""

    def demo(folder: Path) -> Path:
        path = folder / f"{stem}.svs"
        synth(path, **kwargs)
        return path

    return demo
