"""Segmenters that stop decoding at the resolution the task stores (issue 17 item 1): the
output grid, the training targets on that grid and the engine's pooling to the task's
output downsample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from wsi_pipeline.infer import pool_factor
from wsi_pipeline.models import build_model
from wsi_pipeline.train.loop import at_output_stride, target_index

TINY = {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 3,
        "decoder_channels": (16, 8, 8)}
SEGMENTERS = ("m2cf_net", "unet", "hooknet", "deeplabv3plus", "segformer")


def tiny(arch: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "deeplabv3plus":
        return build_model(arch, encoder_name=TINY["encoder_name"], decoder_channels=16,
                           **kwargs)
    if arch == "segformer":
        return build_model(arch, decoder_channels=16, **kwargs)
    extra = {"fusion_channels": 16} if arch == "m2cf_net" else {}
    return build_model(arch, **TINY, **extra, **kwargs)


def gflop(model: torch.nn.Module, px: int = 128) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(1, len(model.levels), 3, px, px))
    return counter.get_total_flops() / 1e9


@pytest.mark.parametrize("arch", SEGMENTERS)
@pytest.mark.parametrize("stride", [1, 2, 4])
def test_logits_come_out_on_the_stride_grid(arch, stride):
    model = tiny(arch, classes=3, output_stride=stride).eval()
    assert model.output_stride == stride and model.arch_kwargs["output_stride"] == stride
    with torch.inference_mode():
        out = model(torch.rand(2, len(model.levels), 3, 128, 128))
    assert out.shape == (2, 3, 128 // stride, 128 // stride)
    rebuilt = build_model(arch, **json.loads(json.dumps(model.arch_kwargs)))
    assert rebuilt.output_stride == stride


@pytest.mark.parametrize("arch", ["m2cf_net", "unet", "hooknet"])
def test_stopping_the_decoder_saves_most_of_its_work(arch):
    full, strided = tiny(arch).eval(), tiny(arch, output_stride=4).eval()
    # the tiny models' full-resolution decoder steps are over half of all their FLOPs
    assert gflop(strided) < 0.5 * gflop(full)
    assert sum(p.numel() for p in strided.parameters()) < \
        sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("stride", [3, 8, 0])
def test_impossible_strides_are_refused(stride):
    with pytest.raises(ValueError, match="output_stride"):
        tiny("unet", output_stride=stride)   # depth 3: strides 1, 2, 4 only


def test_targets_are_class_fractions_of_each_cell():
    target = torch.zeros(1, 2, 4, 4)
    target[0, 1, :2, :3] = 1           # class 1 over a 2 x 3 block
    target[0, 0] = 1 - target[0, 1]
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 3, 3] = False
    t, v = at_output_stride(target, valid, 2)
    np.testing.assert_allclose(t[0, 1].numpy(), [[1.0, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(t[0, 0].numpy(), [[0.0, 0.5], [1.0, 1.0]])
    assert v.tolist() == [[[True, True], [True, False]]]   # a cell needs all its pixels
    assert target_index(t).tolist() == [[[1, 0], [0, 0]]]  # ties go to the lower class
    same_t, same_v = at_output_stride(target, valid, 1)
    assert same_t is target and same_v is valid


def test_engine_pools_from_the_model_stride_to_the_task_resolution():
    assert pool_factor(tiny("unet"), 4) == 4
    assert pool_factor(tiny("unet", output_stride=2), 4) == 2
    assert pool_factor(tiny("unet", output_stride=4), 4) == 1
    with pytest.raises(ValueError, match="does not divide"):
        pool_factor(tiny("unet", output_stride=4), 2)
