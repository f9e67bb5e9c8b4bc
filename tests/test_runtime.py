"""Inference-time graph work and the CPU runtimes (issue 17 item 2): BatchNorm folding
keeps the network's output, each optional runtime agrees with eager torch within the
tolerance, and a runtime that cannot run the network gives way to torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsi_pipeline.errors import UsageError
from wsi_pipeline.models import build_model
from wsi_pipeline.runtime import (
    TOLERANCE,
    available_runtimes,
    choose_runtime,
    compile_runtime,
    fold_batchnorm,
    prepare,
)

TINY = {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 3,
        "decoder_channels": (16, 8, 8)}


def trained_looking(arch: str, **kwargs) -> nn.Module:
    """A tiny network whose BatchNorms hold non-trivial statistics, as after training."""
    torch.manual_seed(0)
    extra = {"fusion_channels": 16} if arch == "m2cf_net" else {}
    model = build_model(arch, **TINY, **extra, **kwargs)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("arch", ["m2cf_net", "unet"])
def test_folding_removes_every_batchnorm_and_keeps_the_output(arch):
    model = trained_looking(arch, output_stride=2)
    before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_batchnorm(model)
    assert before > 10 and sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 0
    x = torch.rand(2, len(model.levels), 3, 64, 64)
    with torch.inference_mode():
        ref, out = model(x), folded(x)
    assert (out - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))
    # the original is untouched; prepare() gives the folded, gradient-free, channels-last one
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == before
    ready = prepare(model)
    assert not any(p.requires_grad for p in ready.parameters()) and not ready.training
    conv = next(m for m in ready.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_misfolded_network_is_kept_unfolded():
    class BatchNormFirst(nn.Module):   # bn is registered after conv but runs before it
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.levels = (0,)

        def forward(self, x):
            return self.conv(self.bn(x[:, 0]))

    model = BatchNormFirst().eval()
    model.bn.running_mean.fill_(0.5)
    model.bn.running_var.fill_(0.1)
    with pytest.warns(RuntimeWarning, match="unfolded"):
        ready = prepare(model)
    assert isinstance(ready.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_runtime_agrees_with_eager_torch(runtime, tmp_path, monkeypatch):
    if runtime not in available_runtimes():
        pytest.skip(f"{runtime} is not installed (extra 'fast')")
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path))
    model = prepare(trained_looking("m2cf_net", classes=3, output_stride=4))
    example = torch.rand(1, 3, 3, 64, 64)
    run, used = compile_runtime(model, runtime, example)
    assert used == runtime and run is not model
    x = torch.rand(5, 3, 3, 64, 64)                      # another batch size than the example
    with torch.inference_mode():
        gap = (run(x).softmax(1) - model(x).softmax(1)).abs().max()
    assert run(x).shape == (5, 3, 16, 16) and float(gap) <= TOLERANCE
    assert len(list((tmp_path / "runtime").glob("*.onnx"))) == 1   # converted once, cached
    compile_runtime(model, runtime, example)
    assert len(list((tmp_path / "runtime").glob("*.onnx"))) == 1


def test_a_network_a_runtime_cannot_take_falls_back_to_torch(tmp_path, monkeypatch):
    if len(available_runtimes()) == 1:
        pytest.skip("no optional runtime installed (extra 'fast')")
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path))

    class Spectral(nn.Module):          # the ONNX exporter has no FFT
        levels = (0,)

        def forward(self, x):
            return torch.fft.fft2(x[:, 0]).abs()[:, :1]

    notes: list[str] = []
    model = Spectral().eval()
    run, used = compile_runtime(model, available_runtimes()[1], torch.rand(1, 1, 3, 8, 8),
                                log=notes.append)
    assert used == "torch" and run is model
    assert len(notes) == 1 and notes[0].endswith("using torch")


def test_choice_of_runtime():
    assert choose_runtime("torch", "cpu") == "torch"
    assert choose_runtime("auto", "cuda") == "torch"       # the GPU path is torch + autocast
    assert choose_runtime("auto", "cpu") == ([r for r in ("openvino", "onnxruntime")
                                              if r in available_runtimes()] + ["torch"])[0]
    with pytest.raises(UsageError, match="unknown runtime"):
        choose_runtime("tensorrt", "cpu")
