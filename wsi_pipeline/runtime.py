"""How a trained network runs at inference time: graph preparation and the CPU runtime.

`prepare` gives the network the engine runs: evaluation mode, no autograd state, each
BatchNorm folded into the convolution before it, channels-last weights. `compile_runtime`
then hands it to a runtime:

- ``torch``: the prepared network, eager (always available; the reference).
- ``openvino``: OpenVINO's CPU plugin, fp32 (optional extra ``fast``).
- ``onnxruntime``: ONNX Runtime's CPU provider (optional extra ``fast``).
- ``auto``: on a CPU the first of openvino, onnxruntime that is installed, else torch; on a
  GPU torch (autocast bf16 is the engine's).

Measured by ``benchmarks/bench_runtime.py`` (2 CPU cores, demo M2CF-Net, batches of 8
windows of 512 px): OpenVINO and ONNX Runtime both ran faster than eager torch by more
than the 1.3x that earns a runtime the default, with probabilities within 1e-3 of it; the
closing figures are in the benchmark's output and the issue note. ``torch.compile`` was
measured too and not adopted (slower to start than a slide's inference saves).

Every compiled runtime is checked once against the eager network on one window before it
is used; if it cannot be built or disagrees by more than ``TOLERANCE`` in probability, the
engine falls back to torch and says why. Converted models are cached on disk under
``cache_dir()`` by the network's weights, input shape and runtime version, so a batch of
slides converts once.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:   # torch is imported where used, so the CLI can name RUNTIMES cheaply
    import torch
    from torch import nn

__all__ = ["RUNTIMES", "TOLERANCE", "available_runtimes", "cache_dir", "choose_runtime",
           "compile_runtime", "fold_batchnorm", "prepare"]

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
TOLERANCE = 1e-3   # largest probability difference a runtime may show against eager torch

Runner = Callable[["torch.Tensor"], "torch.Tensor"]


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution computing bn(conv(x)) with the BatchNorm's running statistics."""
    import torch
    from torch import nn

    scale = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    factor = scale / torch.sqrt(bn.running_var + bn.eps)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(conv.weight.detach() * factor.reshape(-1, 1, 1, 1),
                                requires_grad=False)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter((bias - bn.running_mean) * factor + shift, requires_grad=False)
    return fused


def _after_fold(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays of a folded BatchNorm: nothing, or the activation of a norm+act layer
    (timm's ``BatchNormAct2d`` applies ``drop`` then ``act`` after normalising)."""
    from torch import nn

    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return nn.Sequential(drop, act)
    return nn.Identity()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) in which every BatchNorm2d that directly follows
    a Conv2d among its parent's children is folded into that convolution.

    Children are paired in registration order, which is the order of the forward pass in
    ``nn.Sequential`` and in the timm and smp blocks our networks use; `prepare` checks the
    result against the original and keeps the original if they differ.
    """
    from torch import nn

    folded = copy.deepcopy(model).eval()
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:], strict=False):
            if (type(a) is nn.Conv2d and isinstance(b, nn.BatchNorm2d)
                    and b.track_running_stats and b.running_mean is not None
                    and a.out_channels == b.num_features):
                setattr(parent, name_a, _fold_pair(a, b))
                setattr(parent, name_b, _after_fold(b))
    return folded


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def prepare(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """The network as the engine runs it: eval mode, ``requires_grad`` off, BatchNorm folded
    (kept unfolded if the folded copy's output differs by more than 1e-4 on ``example``,
    a (B, L, 3, H, W) input; random when None), channels-last."""
    import torch
    from torch import nn

    model = model.eval().requires_grad_(False)
    if _count(model, nn.BatchNorm2d):
        folded = fold_batchnorm(model)
        levels = len(getattr(model, "levels", (0,)))
        device = next(model.parameters()).device
        x = example if example is not None else torch.rand(1, levels, 3, 64, 64,
                                                             device=device)
        with torch.inference_mode():
            same = torch.allclose(model(x), folded(x), atol=1e-4, rtol=1e-4)
        if same:
            model = folded
        else:
            warnings.warn("BatchNorm folding changed the network's output; running it "
                          "unfolded", RuntimeWarning, stacklevel=2)
    return model.to(memory_format=torch.channels_last)


def available_runtimes() -> list[str]:
    """The runtimes whose package is importable here, ``torch`` first."""
    import importlib.util

    found = ["torch"]
    found += [name for name in ("openvino", "onnxruntime")
              if importlib.util.find_spec(name) is not None]
    return found


def choose_runtime(runtime: str, device: str) -> str:
    """The runtime to use for ``runtime`` (one of `RUNTIMES`) on ``device``."""
    if runtime not in RUNTIMES:
        from .errors import UsageError

        raise UsageError(f"unknown runtime {runtime!r}; choose {', '.join(RUNTIMES)}")
    if device != "cpu":
        return "torch"
    if runtime != "auto":
        return runtime
    found = available_runtimes()
    return next((r for r in ("openvino", "onnxruntime") if r in found), "torch")


def cache_dir() -> Path:
    """Where converted networks are kept: ``$WSI_PIPELINE_CACHE``, else
    ``$XDG_CACHE_HOME/wsi_pipeline`` (default ``~/.cache/wsi_pipeline``)."""
    if os.environ.get("WSI_PIPELINE_CACHE"):
        return Path(os.environ["WSI_PIPELINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wsi_pipeline"


def _model_key(model: nn.Module, shape: tuple[int, ...], version: str) -> str:
    import torch

    h = hashlib.sha256(f"{version} torch {torch.__version__} {shape} "
                       f"{type(model).__name__}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


def _cached(model: nn.Module, example: torch.Tensor, version: str, suffix: str,
            build: Callable[[Path], None]) -> Path:
    """The converted network's file: built by ``build(path)`` into the cache unless there;
    into a temporary folder when the cache cannot be written."""
    key = _model_key(model, tuple(example.shape[1:]), version)
    folder = cache_dir() / "runtime"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="wsi_runtime."))
    path = folder / f"{key}{suffix}"
    if not path.exists():
        partial = folder / f".{key}.{os.getpid()}{suffix}"
        build(partial)
        partial.replace(path)
    return path


def _onnx_file(model: nn.Module, example: torch.Tensor, runtime_version: str) -> Path:
    return _cached(model, example, runtime_version, ".onnx",
                   lambda p: _export_onnx(model, example, p))


def _openvino(model: nn.Module, example: torch.Tensor, threads: int) -> Runner:
    import openvino as ov
    import torch

    # OpenVINO reads the ONNX graph directly (converting from torch took 6x longer)
    path = _onnx_file(model, example, f"openvino {ov.__version__}")
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: x.contiguous().numpy()})
        return torch.from_numpy(np.array(request.get_output_tensor(0).data))

    return run


def _onnxruntime(model: nn.Module, example: torch.Tensor, threads: int) -> Runner:
    import onnxruntime as ort
    import torch

    path = _onnx_file(model, example, f"onnxruntime {ort.__version__}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.contiguous().numpy()})[0])

    return run


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    import torch

    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)


def compile_runtime(model: nn.Module, runtime: str, example: torch.Tensor,
                    log: Callable[[str], None] | None = None) -> tuple[Runner, str]:
    """(run(x) -> logits, the runtime actually used) for a `prepare`-d network on the CPU.

    ``example`` is one (1, L, 3, H, W) float input of the window size. A runtime that is
    missing, fails to build, or disagrees with eager torch by more than `TOLERANCE` in
    probability on ``example`` gives way to torch, and ``log`` is told why.
    """
    import torch

    if runtime == "torch":
        return model, "torch"
    threads = torch.get_num_threads()
    try:
        run = (_openvino if runtime == "openvino" else _onnxruntime)(model, example, threads)
        with torch.inference_mode():
            gap = float((_probabilities(run(example)) - _probabilities(model(example)))
                        .abs().max())
    except Exception as e:  # any failure of an optional runtime means: use torch
        if log:
            log(f"runtime {runtime} unavailable ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:120] if str(e) else ''}); using torch")
        return model, "torch"
    if gap > TOLERANCE:
        if log:
            log(f"runtime {runtime} differs from torch by {gap:.2g} in probability; "
                "using torch")
        return model, "torch"
    return run, runtime
