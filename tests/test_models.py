"""Models for the `fls` task (M2CF-Net, U-Net, HookNet) and the BCEDice loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from wsi_pipeline.errors import UsageError
from wsi_pipeline.models import ARCHITECTURES, build_model, count_parameters
from wsi_pipeline.models.losses import bce_dice_loss
from wsi_pipeline.models.m2cf_net import align_coarse, crop_centre

# A tiny configuration: the smallest timm MobileNetV3 cut to three stages.
TINY = {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 3,
        "decoder_channels": (16, 8, 8)}


# the fls architectures (M2CF-Net and its baselines); the kidney models: test_models_kidney
FLS = ("hooknet", "m2cf_net", "unet")


def tiny(arch: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"fusion_channels": 16} if arch == "m2cf_net" else {}
    return build_model(arch, **TINY, **extra, **kwargs)


def patches(model: torch.nn.Module, batch: int = 2, px: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, len(model.levels), 3, px, px, generator=g)


@pytest.mark.parametrize(("arch", "levels"),
                         [("m2cf_net", (0, 1, 2)), ("unet", (0,)), ("hooknet", (0, 2))])
def test_contract_shapes_levels_and_rebuild(arch, levels):
    model = tiny(arch).eval()
    assert model.levels == levels and model.classes == 1 and model.arch == arch
    with torch.no_grad():
        out = model(patches(model))
        assert out.shape == (2, 1, 64, 64) and out.dtype == torch.float32
        assert tiny(arch, classes=3).eval()(patches(model, px=128)).shape == (2, 3, 128, 128)
    # arch_kwargs is JSON and rebuilds the same architecture (same keys and shapes)
    kwargs = json.loads(json.dumps(model.arch_kwargs))
    rebuilt = build_model(arch, **kwargs).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_wrong_number_of_levels_is_refused():
    model = tiny("m2cf_net")
    with pytest.raises(ValueError, match=r"\(B, 3, 3, H, W\)"):
        model(torch.rand(2, 2, 3, 64, 64))


def test_unknown_architecture_names_the_choices():
    with pytest.raises(UsageError, match="hooknet, m2cf_net"):
        build_model("transunet")
    assert set(FLS) <= set(ARCHITECTURES)


def test_default_configuration_is_small_and_m2cf_is_the_largest():
    counts = {arch: count_parameters(build_model(arch)) for arch in FLS}
    assert counts["m2cf_net"] <= 1_500_000
    assert counts["unet"] < counts["hooknet"] < counts["m2cf_net"]
    m2cf = build_model("m2cf_net")
    assert counts["m2cf_net"] == sum(p.numel() for p in m2cf.parameters())
    # three separate, equally sized branch encoders
    sizes = [count_parameters(e) for e in m2cf.encoders]
    assert len(sizes) == 3 and len(set(sizes)) == 1
    assert m2cf.encoders[0].state_dict().keys() == m2cf.encoders[2].state_dict().keys()
    w0, w2 = (next(e.parameters()) for e in (m2cf.encoders[0], m2cf.encoders[2]))
    assert w0.data_ptr() != w2.data_ptr() and not torch.equal(w0, w2)


@pytest.mark.parametrize("arch", FLS)
def test_default_models_take_any_multiple_of_32(arch):
    model = build_model(arch).eval()
    with torch.no_grad():
        assert model(torch.rand(1, len(model.levels), 3, 96, 96)).shape == (1, 1, 96, 96)


def test_gradients_reach_every_m2cf_branch():
    model = tiny("m2cf_net").train()
    model(patches(model)).square().mean().backward()
    for level, encoder in zip(model.levels, model.encoders, strict=True):
        grads = [p.grad for p in encoder.parameters()]
        assert all(g is not None for g in grads), f"level {level} has parameters without grad"
        assert sum(float(g.abs().sum()) for g in grads) > 0, f"level {level} gets no gradient"
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch", FLS)
def test_channels_last_and_bf16_autocast(arch):
    model = tiny(arch).eval()
    x = patches(model)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    # bf16 keeps ~3 significant digits: the maps agree to a few % of their range
    assert float((low.float() - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-3


def test_crop_centre_takes_the_centre():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    half = crop_centre(x, 2)
    assert half.shape == (1, 1, 4, 4)
    torch.testing.assert_close(half[0, 0], x[0, 0, 2:6, 2:6])
    assert half[0, 0, 0, 0] == 18 and half[0, 0, -1, -1] == 45
    torch.testing.assert_close(crop_centre(x, 4)[0, 0], torch.tensor([[27.0, 28], [35, 36]]))
    with pytest.raises(ValueError, match="centre-cropped"):
        crop_centre(torch.zeros(1, 1, 6, 6), 4)


def test_align_coarse_lands_on_the_finer_grid():
    """A coarse map holding each cell centre's physical x (coarse cells of 2 units, 16
    cells) aligned onto a finer grid of 16 cells of 1 unit over the centre half: every
    fine cell must read its own centre's physical x (exact for a linear ramp away from
    the edge cells, where bilinear resampling clamps)."""
    coarse_x = (torch.arange(16.0) + 0.5) * 2
    coarse = coarse_x.view(1, 1, 1, 16).expand(1, 1, 16, 16)
    fine = align_coarse(coarse, 2, (16, 16))
    fine_x = 8 + (torch.arange(16.0) + 0.5) * 1  # the centre half starts at x = 32 / 4
    torch.testing.assert_close(fine[0, 0, 5, 1:-1], fine_x[1:-1])


@pytest.mark.parametrize("arch", ["m2cf_net", "hooknet"])
def test_output_depends_on_the_coarse_levels(arch):
    """CPU inference is deterministic, so a level that did not reach the output would change
    it by exactly 0. Randomly initialised deep paths attenuate, so the change through the
    coarse branches is small (~1e-5 on logits ~1e-2) but far above float32 rounding."""
    model = tiny(arch).eval()
    x = patches(model)
    with torch.no_grad():
        ref = model(x)
        assert float((model(x.clone()) - ref).abs().max()) == 0
        for i in range(len(model.levels)):
            y = x.clone()
            y[:, i] = 1 - y[:, i]
            assert float((model(y) - ref).abs().max()) > 1e-6, f"level {model.levels[i]} ignored"
        # context beyond the finest field of view counts too: change only the outer ring
        # of the coarsest patch (outside the centre quarter that the finest patch covers)
        y = x.clone()
        y[:, -1, :, :8, :] = 0
        y[:, -1, :, -8:, :] = 0
        assert float((model(y) - ref).abs().max()) > 1e-6


def test_bce_dice_hand_computed():
    z = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(1, 1, 2, 2)
    g = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    p = [1 / (1 + math.exp(-v)) for v in (0.0, 2.0, -1.0, 3.0)]
    bce = -(math.log(1 - p[0]) + math.log(p[1]) + math.log(p[2]) + math.log(1 - p[3])) / 4
    dice = (2 * (p[1] + p[2]) + 1) / (sum(p) + 2 + 1)
    expected = bce + 1 - dice  # 1.7065...
    assert float(bce_dice_loss(z, g)) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.70653, abs=1e-4)
    # smooth enters both numerator and denominator
    dice0 = 2 * (p[1] + p[2]) / (sum(p) + 2)
    assert float(bce_dice_loss(z, g, smooth=0.0)) == pytest.approx(bce + 1 - dice0, rel=1e-6)


def test_bce_dice_sums_over_the_batch_and_ignores_invalid_pixels():
    z = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(2, 1, 1, 2)
    g = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(2, 1, 1, 2)
    # same numbers as the (1, 1, 2, 2) case: the Dice is one sum over the batch
    assert float(bce_dice_loss(z, g)) == pytest.approx(1.70653, abs=1e-4)
    valid = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(2, 1, 1, 2)
    masked = bce_dice_loss(z, g, valid=valid)
    kept = bce_dice_loss(z.flatten()[:3].view(1, 1, 1, 3), g.flatten()[:3].view(1, 1, 1, 3))
    assert float(masked) == pytest.approx(float(kept), rel=1e-6)
    assert float(masked) != pytest.approx(float(bce_dice_loss(z, g)), rel=1e-3)


def test_bce_dice_limits_and_precision():
    g = torch.zeros(2, 1, 8, 8)
    g[:, :, 2:6, 2:6] = 1
    perfect = (g * 2 - 1) * 30
    assert float(bce_dice_loss(perfect, g)) < 1e-6
    wrong = -perfect
    assert float(bce_dice_loss(wrong, g)) > 29  # BCE ~ 30 per pixel, Dice term ~ 1
    loss = bce_dice_loss(perfect.bfloat16(), g)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    with pytest.raises(ValueError, match="differ"):
        bce_dice_loss(perfect, g[:, :, :4])
