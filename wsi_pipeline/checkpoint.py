"""Model checkpoints: safetensors weights + a JSON sidecar (docs/design.md "Checkpoints").

``NAME.safetensors`` holds the state dict (floating tensors stored as float16 by default,
restored to the model's float32 on load); ``NAME.json`` says what the weights are:
``format``, ``task``, ``architecture`` and ``arch_kwargs`` (all ``build_model`` needs),
``classes`` (names), ``levels``, ``mpp``, ``tile_px``, ``stain_reference``, ``demo``,
``training``, ``metrics``, ``weights`` (file name), ``weights_dtype``, ``sha256`` (of the
weights file), ``parameters``, ``created``.

A user-supplied file is never unpickled: ``torch.load`` is not used anywhere, and pickled
torch files (.pt/.pth/.ckpt, zip or pickle magic bytes) are refused by name.
"""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .errors import CheckpointError, UsageError
from .models import ARCHITECTURES, build_model, count_parameters
from .models.m2cf_net import describe
from .store import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from .tasks import ModelSpec, Task

FORMAT = "wsi_pipeline-checkpoint/1"
WEIGHTS_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar")
REQUIRED_META = ("task", "classes", "mpp", "tile_px")
REQUIRED_SIDECAR = ("task", "architecture", "arch_kwargs", "classes", "levels", "sha256")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header (bytes)


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any],
                    weights_dtype: str = "float16") -> Path:
    """Write ``model``'s weights to ``path`` with suffix .safetensors and the sidecar beside
    it (same name, .json), each atomically (weights first). ``meta`` must hold ``task``,
    ``classes`` (names, one per output channel), ``mpp`` (um/px) and ``tile_px``; it may
    hold ``stain_reference``, ``demo``, ``training`` and ``metrics``. ``weights_dtype``:
    "float16" (half the size; any tensor that would overflow stays float32) or "float32".
    Returns the weights path."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {', '.join(missing)}")
    if len(meta["classes"]) != model.classes:
        raise ValueError(f"{len(meta['classes'])} class names for a model with "
                         f"{model.classes} output channels")
    if weights_dtype not in ("float16", "float32"):
        raise ValueError(f"weights_dtype must be float16 or float32, not {weights_dtype!r}")
    weights = _weights_path(Path(path))
    tensors = {}
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        if t.is_floating_point() and weights_dtype == "float16" and _fits_half(t):
            t = t.to(torch.float16)
        tensors[key] = t
    blob = save_safetensors(tensors, metadata={"format": FORMAT, "task": str(meta["task"])})
    sidecar = {
        "format": FORMAT,
        "task": meta["task"],
        "architecture": model.arch,
        "arch_kwargs": model.arch_kwargs,
        "classes": list(meta["classes"]),
        "levels": list(model.levels),
        "mpp": meta["mpp"],
        "tile_px": meta["tile_px"],
        "stain_reference": meta.get("stain_reference"),
        "demo": bool(meta.get("demo", False)),
        "training": meta.get("training", {}),
        "metrics": meta.get("metrics", {}),
        "weights": weights.name,
        "weights_dtype": weights_dtype,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "parameters": count_parameters(model),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_bytes(weights, blob)
    atomic_write_json(weights.with_suffix(SIDECAR_SUFFIX), sidecar)
    return weights


def load_checkpoint(path: str | Path, *, task: str,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model (eval mode, on ``device``) and sidecar of the checkpoint for ``task`` at
    ``path``: the .safetensors file, its .json sidecar, or a folder holding exactly one
    checkpoint for ``task``. Every expected failure is one ``CheckpointError`` line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but no CUDA GPU is available")
    weights = None
    if path.is_dir():
        sidecar_path = _find_in_folder(path, task)
    elif path.suffix == SIDECAR_SUFFIX:
        sidecar_path = path
    else:
        _refuse_pickle(path, _head(path))
        weights, sidecar_path = path, path.with_suffix(SIDECAR_SUFFIX)
    meta = _read_sidecar(sidecar_path)
    if meta["task"] != task:
        raise CheckpointError(f"checkpoint is for task {meta['task']}, not {task}: {sidecar_path}")
    arch, arch_kwargs = meta["architecture"], meta["arch_kwargs"]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"checkpoint architecture {arch!r} is unknown (known: "
                              f"{', '.join(sorted(ARCHITECTURES))}): {sidecar_path}")
    if weights is None:  # the sidecar names its weights file, in its own folder
        name = meta.get("weights") or sidecar_path.stem + WEIGHTS_SUFFIX
        weights = sidecar_path.with_name(Path(str(name)).name)
    tensors = _read_weights(weights, meta["sha256"])
    signature = describe(arch, arch_kwargs)
    try:
        model = build_model(arch, **arch_kwargs)
    except Exception as e:  # any constructor failure means arguments the code cannot take
        raise CheckpointError(f"cannot build {signature} from {sidecar_path}: {e}") from None
    _check_fit(model, tensors, signature)
    if list(model.levels) != list(meta["levels"]) or len(meta["classes"]) != model.classes:
        raise CheckpointError(f"sidecar levels/classes {meta['levels']}/{meta['classes']} do "
                              f"not match {signature}: {sidecar_path}")
    model.load_state_dict(tensors)  # copies into the model's own float32 tensors
    return model.to(device).eval(), meta


def sidecar_task(path: str | Path) -> str | None:
    """The task named by the sidecar of checkpoint file ``path`` (.safetensors or .json);
    None for a folder or a file without a readable sidecar (loading then says why)."""
    path = Path(path)
    if path.is_dir():
        return None
    try:
        return str(_read_sidecar(path.with_suffix(SIDECAR_SUFFIX))["task"])
    except CheckpointError:
        return None


def checkpoint_id(meta: dict[str, Any]) -> str:
    """Short id of a checkpoint for reports: the first 12 hex digits of its weights' sha256."""
    return str(meta["sha256"])[:12]


def _weights_path(path: Path) -> Path:
    if path.suffix == WEIGHTS_SUFFIX:
        return path
    if path.suffix == SIDECAR_SUFFIX:
        return path.with_suffix(WEIGHTS_SUFFIX)
    return path.with_name(path.name + WEIGHTS_SUFFIX)  # keep dots in names such as "fls.v1"


def _fits_half(t: torch.Tensor) -> bool:
    return t.numel() == 0 or float(t.abs().max()) <= torch.finfo(torch.float16).max


def _head(path: Path, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None


def _refuse_pickle(path: Path, head: bytes) -> None:
    """Refuse torch/pickle files by suffix or magic bytes (zip for torch.save >= 1.6,
    the pickle protocol opcode otherwise) before anything else is read."""
    if path.suffix.lower() in PICKLE_SUFFIXES or head.startswith(b"PK\x03\x04") \
            or (len(head) >= 2 and head[0] == 0x80 and head[1] <= 5):
        raise CheckpointError(f"refusing to unpickle {path}: it is a torch/pickle file, not "
                              "safetensors; only .safetensors checkpoints with a JSON sidecar "
                              "are loaded")


def _find_in_folder(folder: Path, task: str) -> Path:
    found, tasks = [], set()
    for sidecar in sorted(folder.glob("*" + SIDECAR_SUFFIX)):
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            tasks.add(str(meta.get("task")))
            if meta.get("task") == task:
                found.append(sidecar)
    if not found:
        others = f" (it holds checkpoints for {', '.join(sorted(tasks))})" if tasks else ""
        if any(p.suffix.lower() in PICKLE_SUFFIXES for p in folder.iterdir()):
            others += "; torch/pickle files there are never loaded"
        raise CheckpointError(f"no checkpoint for task {task} in {folder}{others}")
    if len(found) > 1:
        raise CheckpointError(f"{len(found)} checkpoints for task {task} in {folder} "
                              f"({', '.join(p.name for p in found)}): name one")
    return found[0]


def _read_sidecar(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint sidecar missing: {path} (every .safetensors "
                              "checkpoint needs its .json beside it)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint sidecar unreadable: {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"not a wsi_pipeline checkpoint sidecar (format {FORMAT}): {path}")
    missing = [k for k in REQUIRED_SIDECAR if k not in meta]
    if missing or not isinstance(meta["arch_kwargs"], dict):
        lacks = ", ".join(missing) or "a dict arch_kwargs"
        raise CheckpointError(f"checkpoint sidecar {path} lacks {lacks}")
    return meta


def _read_weights(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights missing: {path}")
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    _refuse_pickle(path, blob[:8])
    expected = _safetensors_size(blob)
    if expected != len(blob):
        found = f"{len(blob)} bytes, header says {expected}" if expected else "no valid header"
        raise CheckpointError(f"not a safetensors file (or truncated): {path} ({found})")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        raise CheckpointError(f"checkpoint weights corrupt: sha256 {digest[:12]} of {path} does "
                              f"not match {str(sha256)[:12]} in the sidecar")
    try:
        return load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"not a valid safetensors file: {path}: {e}") from None


def _safetensors_size(blob: bytes) -> int | None:
    """File size that a safetensors header announces (8-byte little-endian header length,
    JSON header, then the tensor data up to the largest end offset); None if no header."""
    if len(blob) < 8:
        return None
    (n,) = struct.unpack("<Q", blob[:8])
    if not 2 <= n <= min(len(blob) - 8, _MAX_HEADER):
        return None
    try:
        header = json.loads(blob[8:8 + n])
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return 8 + n + max(ends, default=0)


def _check_fit(model: nn.Module, tensors: dict[str, torch.Tensor], signature: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(tensors))
             if tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (e.g. {wrong[0]})")
    if problems:
        raise CheckpointError(f"weights do not fit architecture {signature}: tensors "
                              + "; ".join(problems))


# -- which checkpoint serves a task's model ---------------------------------------------------
def demo_weights(task: Task, spec: ModelSpec | None = None) -> Path:
    """The bundled demo checkpoint of ``task``'s model, or of ``spec`` (its classifier):
    ``wsi_pipeline/weights/<stem>.safetensors``, or the path the spec names (a plugin's
    own)."""
    spec = spec or task.spec.model
    name = spec.demo_weights if spec else None
    path = None
    if name is not None:
        path = Path(name) if Path(name).suffix == WEIGHTS_SUFFIX else \
            Path(__file__).parent / "weights" / f"{name}{WEIGHTS_SUFFIX}"
    if path is None or not path.exists():
        modes = "".join(f" or --model {m}" for m in task.modes)
        raise CheckpointError(f"no bundled demo weights for task {task.name}; pass --weights "
                              f"FILE{modes}")
    return path


def checkpoint_path(task: Task, spec: ModelSpec, weights: Path | None) -> Path:
    """Which checkpoint serves ``spec`` (the task's model or classifier): ``weights`` when it
    is a folder (it must hold one for each of the task's models) or a file made for
    ``spec``; the bundled demo weights when ``weights`` is None, or when the file is for
    the task's other model (``--weights`` names a classifier: the detector stays the demo
    one)."""
    if weights is None or weights.is_dir():
        return weights or demo_weights(task, spec)
    others = [m for m in (task.spec.model, task.spec.classifier) if m is not None and m is not spec]
    named = sidecar_task(weights)
    if named is not None and named != task.spec.checkpoint_task(spec) \
            and any(named == task.spec.checkpoint_task(m) for m in others):
        return demo_weights(task, spec)
    return weights


def load_task_model(task: Task, spec: ModelSpec, weights: Path | None
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """(network in eval mode on the CPU, sidecar + its ``path``) of the checkpoint that
    serves ``spec`` (`checkpoint_path`)."""
    path = checkpoint_path(task, spec, weights)
    network, meta = load_checkpoint(path, task=task.spec.checkpoint_task(spec))
    return network, meta | {"path": str(path)}
