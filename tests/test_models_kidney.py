"""kidney-layer segmenters (DeepLabV3Plus, Segformer) and the `mesangial` SimCLR pieces:
model contract, encoder transfer, augmentation views, a short SimCLR run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsi_pipeline.checkpoint import load_checkpoint, save_checkpoint
from wsi_pipeline.errors import CheckpointError
from wsi_pipeline.models import ARCHITECTURES, build_model
from wsi_pipeline.models.losses import hybrid_loss, nt_xent_loss
from wsi_pipeline.models.simclr import (
    GlomerulusClassifier,
    SimCLR,
    classifier_input,
    images_to_tensor,
    simclr_view,
)

# Smallest encoders that keep the tests fast: a 3-stage MobileNetV3 for SimCLR.
TINY_SIMCLR = {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 3}
TINY_SEG = {"deeplabv3plus": {"encoder_name": "tu-mobilenetv3_small_050",
                              "decoder_channels": 16},
            "segformer": {"decoder_channels": 16}}


def rebuild_matches(model: torch.nn.Module) -> bool:
    kwargs = json.loads(json.dumps(model.arch_kwargs))
    rebuilt = build_model(model.arch, **kwargs).state_dict()
    return {k: v.shape for k, v in rebuilt.items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def glomerulus_like(seed: int, px: int = 96) -> np.ndarray:
    """uint8 RGB: pink background with a few dark round 'nuclei' at random places."""
    rng = np.random.default_rng(seed)
    img = np.empty((px, px, 3), np.float64)
    img[:] = (0.93, 0.75, 0.85)
    yy, xx = np.mgrid[:px, :px]
    for _ in range(12):
        cy, cx, r = rng.uniform(0, px), rng.uniform(0, px), rng.uniform(2, 6)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (0.35, 0.25, 0.55)
    img += rng.normal(0, 0.03, img.shape)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("arch", "family"), [("deeplabv3plus", "cnn"),
                                              ("segformer", "transformer")])
def test_segmenters_follow_the_contract(arch, family):
    assert arch in ARCHITECTURES
    torch.manual_seed(0)
    model = build_model(arch, classes=7, **TINY_SEG[arch])
    assert model.levels == (0,) and model.classes == 7 and model.arch == arch
    assert model.family == family
    x = torch.rand(2, 1, 3, 64, 64)
    model.train()
    out = model(x)
    assert out.shape == (2, 7, 64, 64) and out.dtype == torch.float32
    target = torch.randint(0, 7, (2, 64, 64))
    hybrid_loss(out, target, family).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 3, 96, 96)).shape == (1, 7, 96, 96)
    with pytest.raises(ValueError, match=r"\(B, 1, 3, H, W\)"):
        model(torch.rand(2, 3, 64, 64))
    assert rebuild_matches(model)


def test_segmenter_defaults_are_small_and_paper_sizes_build():
    counts = {arch: sum(p.numel() for p in build_model(arch, classes=7).parameters())
              for arch in ("deeplabv3plus", "segformer")}
    assert counts["deeplabv3plus"] < 1_500_000 and counts["segformer"] < 3_500_000
    paper = build_model("deeplabv3plus", encoder_name="mobilenet_v2", decoder_channels=256,
                        classes=7)
    assert sum(p.numel() for p in paper.parameters()) > 4_000_000
    assert paper.arch_kwargs["encoder_name"] == "mobilenet_v2"


def test_simclr_and_classifier_contract():
    torch.manual_seed(0)
    simclr = build_model("simclr", **TINY_SIMCLR)
    x = torch.rand(3, 3, 64, 64)
    z, h = simclr(x), simclr.features(x)
    assert z.shape == (3, 128) and h.shape == (3, simclr.feature_dim)
    assert simclr.classes == 128 and simclr.levels == (0,) and rebuild_matches(simclr)
    clf = build_model("glomerulus_classifier", **TINY_SIMCLR)
    assert clf.classes == 1 and clf.arch == "glomerulus_classifier" and rebuild_matches(clf)
    assert clf(x).shape == (3, 1)
    clf.eval()
    with torch.no_grad():  # the pipeline's (B, 1, 3, H, W) is accepted too
        torch.testing.assert_close(clf(x[:, None]), clf(x))
    with pytest.raises(ValueError, match="expected input"):
        clf(torch.rand(3, 2, 3, 64, 64))
    # the default backbone is a ResNet-18 (512-d features)
    assert SimCLR().feature_dim == 512


def test_encoder_weights_copy_from_simclr_to_classifier():
    torch.manual_seed(0)
    simclr = SimCLR(**TINY_SIMCLR)
    with torch.no_grad():  # make the encoder differ from any fresh initialisation
        for p in simclr.encoder.parameters():
            p.add_(0.01)
    clf = GlomerulusClassifier.from_simclr(simclr)
    src, dst = simclr.encoder.state_dict(), clf.encoder.state_dict()
    assert src.keys() == dst.keys()
    assert all(torch.equal(src[k], dst[k]) for k in src)
    assert all(src[k].data_ptr() != dst[k].data_ptr() for k in src if src[k].numel())
    # the same features, so fine-tuning starts from the pretrained representation
    simclr.eval()
    clf.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clf.features(x), simclr.features(x))
    # a whole SimCLR state dict (e.g. from a checkpoint) loads as well
    fresh = GlomerulusClassifier(**TINY_SIMCLR)
    fresh.load_encoder(simclr.state_dict())
    assert all(torch.equal(fresh.encoder.state_dict()[k], src[k]) for k in src)
    with pytest.raises(CheckpointError, match="do not fit"):
        GlomerulusClassifier().load_encoder(simclr.encoder.state_dict())


def test_views_are_deterministic_in_range_and_vary():
    rgb = glomerulus_like(0, px=128)
    a = simclr_view(rgb, np.random.default_rng(7), out_px=64)
    b = simclr_view(rgb, np.random.default_rng(7), out_px=64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    others = [simclr_view(rgb, np.random.default_rng(s), out_px=64) for s in (8, 9, 10)]
    assert all(not np.array_equal(a, o) for o in others)
    # successive views from one generator differ too, and stay images (not flat or saturated)
    rng = np.random.default_rng(1)
    views = [simclr_view(rgb, rng, out_px=64) for _ in range(4)]
    assert all(not np.array_equal(views[0], v) for v in views[1:])
    assert all(v.std() > 10 for v in views)
    with pytest.raises(ValueError, match="uint8"):
        simclr_view(rgb.astype(np.float32), rng)
    # the evaluation view: deterministic resize of the whole crop
    e = classifier_input(rgb, out_px=64)
    assert e.shape == (64, 64, 3) and e.dtype == np.uint8
    assert np.array_equal(e, classifier_input(rgb, out_px=64))
    flat = np.full((512, 512, 3), 200, np.uint8)
    assert np.array_equal(classifier_input(flat), np.full((224, 224, 3), 200, np.uint8))
    t = images_to_tensor([e, e])
    assert t.shape == (2, 3, 64, 64) and t.dtype == torch.float32 and float(t.max()) <= 1


def test_a_few_simclr_steps_lower_the_nt_xent_loss():
    torch.manual_seed(0)
    model = SimCLR(**TINY_SIMCLR)
    rng = np.random.default_rng(0)
    crops = [glomerulus_like(s) for s in range(8)]
    v1 = images_to_tensor([simclr_view(c, rng, out_px=48) for c in crops])
    v2 = images_to_tensor([simclr_view(c, rng, out_px=48) for c in crops])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = nt_xent_loss(model(v1), model(v2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        after = nt_xent_loss(model(v1), model(v2)).item()
    assert after < losses[0] - 0.1, (losses, after)


@pytest.mark.parametrize("arch", ["deeplabv3plus", "segformer", "simclr",
                                  "glomerulus_classifier"])
def test_channels_last_and_bf16_autocast(arch):
    torch.manual_seed(0)
    if arch in TINY_SEG:
        model, x = build_model(arch, classes=3, **TINY_SEG[arch]), torch.rand(2, 1, 3, 64, 64)
    else:
        model, x = build_model(arch, **TINY_SIMCLR), torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert float((low.float() - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-3


@pytest.mark.parametrize("arch", ["segformer", "simclr", "glomerulus_classifier"])
def test_checkpoint_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    kwargs = {"classes": 3, **TINY_SEG[arch]} if arch in TINY_SEG else TINY_SIMCLR
    model = build_model(arch, **kwargs).eval()
    task = "kidney-layer" if arch in TINY_SEG else "mesangial"
    names = [f"c{i}" for i in range(model.classes)]
    path = save_checkpoint(tmp_path / arch, model, {"task": task, "classes": names,
                                                    "mpp": 0.5, "tile_px": 64},
                           weights_dtype="float32")
    loaded, meta = load_checkpoint(path, task=task)
    assert meta["architecture"] == arch and type(loaded) is type(model)
    x = torch.rand(2, 1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
