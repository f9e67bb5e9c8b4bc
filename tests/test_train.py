"""wsi-train: sampling, augmentation, and a tiny end-to-end run to a loadable checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_pipeline import train
from wsi_pipeline.checkpoint import load_checkpoint
from wsi_pipeline.models import count_parameters
from wsi_pipeline.stain import REFERENCES
from wsi_pipeline.tasks import get_task, task_names

TASK = get_task("fls")
HE = REFERENCES["he"].matrix
TINY = {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 3,
        "decoder_channels": [16, 8, 8], "fusion_channels": 16}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two tiny synthetic slides (one positive, one negative) and their prepared stores."""
    from wsi_pipeline.synth import write_slide

    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    data.mkdir()
    for i, label in enumerate(("positive", "negative")):
        write_slide("fls", data / f"t{i}.svs", width=2048, height=1536, seed=8100 + i,
                    label=label, workers=0)
    slides = train.prepare_slides(sorted(data.glob("*.svs")), TASK, root / "work" / "stores",
                                  workers=1, log=lambda _: None)
    return root, slides


def test_end_to_end_checkpoint(cohort, capsys):
    root, _ = cohort
    out = root / "ckpt" / "fls_tiny"
    argv = ["--task", "fls", "--data", str(root / "data"), "--out", str(out),
            "--work", str(root / "work"), "--arch-kwargs", json.dumps(TINY),
            "--patch-px", "64", "--epochs", "2", "--steps-per-epoch", "2",
            "--batch-size", "4", "--val-patches", "8", "--workers", "1", "--seed", "3"]
    assert train.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == 2
    model, meta = load_checkpoint(out.with_suffix(".safetensors"), task="fls")
    assert meta["task"] == "fls" and meta["architecture"] == "m2cf_net"
    assert meta["arch_kwargs"]["encoder_name"] == TINY["encoder_name"]
    # the decoder stops at the resolution the task stores (fls: 4x the working MPP)
    assert meta["arch_kwargs"]["output_stride"] == TASK.model.out_downsample == 4
    assert meta["classes"] == ["focus"] and meta["levels"] == [0, 1, 2]
    assert meta["mpp"] == 0.5 and meta["tile_px"] == 512 and meta["demo"] is False
    assert meta["stain_reference"]["name"] == "he"
    np.testing.assert_allclose(meta["stain_reference"]["matrix"], HE, atol=1e-6)
    t = meta["training"]
    assert t["command"].startswith("wsi-train --task fls --data ")
    assert len(t["slides"]["train"]) == 1 and len(t["slides"]["validation"]) == 1
    assert t["sampling"]["patch_px"] == 64 and t["seed"] == 3
    m = meta["metrics"]
    assert 0.0 <= m["val_dice"] <= 1.0 and m["epochs"] == 2 and m["steps"] == 4
    assert m["parameters"] == count_parameters(model) == meta["parameters"]
    assert [h["epoch"] for h in m["history"]] == [1, 2] and m["seconds"] > 0
    import torch

    with torch.inference_mode():
        y = model(torch.rand(1, 3, 3, 64, 64))
    assert y.shape == (1, 1, 16, 16) and torch.isfinite(y).all()


def test_sampler_is_class_balanced(cohort):
    _, slides = cohort
    assert all(len(s.positives_px) for s in slides)     # aggregates on the negative slide too
    plan = train.sample_patches(slides, 400, 64, np.random.default_rng(0))
    assert 0.42 < plan[:, 3].mean() < 0.58
    assert (plan[:, 1:3] % train.ALIGN_PX == 0).all()
    data = train.PatchDataset(slides, plan, 64, TASK, (0, 1, 2), augment=False)
    near_centre = np.array([bool(data[i][1][0, 28:36, 28:36].any()) for i in range(len(plan))])
    positive = plan[:, 3] == 1
    assert near_centre[positive].all()                 # centred on a positive annotation
    assert near_centre[~positive].mean() < 0.15        # random tissue: mostly background
    assert 0.42 < near_centre.mean() < 0.65            # about half the patches in all
    x, target, valid = data[0]
    assert tuple(x.shape) == (3, 64, 64, 3) and x.dtype.is_floating_point is False
    assert tuple(target.shape) == (1, 64, 64) and tuple(valid.shape) == (64, 64)
    # random patches lie in tissue tiles
    tiles = {(int(r), int(c)) for r, c in slides[0].tiles}
    for s, y0, x0, _, _ in plan[~positive][:50]:
        if s == 0:  # the drawn centre lies within 3 px after the corner's alignment
            assert tiles & {((y0 + 32 + d) // 512, (x0 + 32 + e) // 512)
                            for d in (0, 3) for e in (0, 3)}


def _he_image(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 made from known H and E concentrations in the reference basis."""
    conc = rng.uniform(0.1, 0.9, shape + (2,))
    rgb = np.clip(np.rint(255 * np.exp(-(conc @ HE))), 0, 255).astype(np.uint8)
    return rgb, conc


def test_stain_jitter_scales_concentrations():
    rgb, _ = _he_image(np.random.default_rng(1), (2, 48, 48))
    before = train.stain_concentrations(rgb, HE)
    out = train.stain_jitter(rgb, HE, (1.12, 0.87))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    ratio = train.stain_concentrations(out, HE) / before
    np.testing.assert_allclose(np.median(ratio.reshape(-1, 2), axis=0), (1.12, 0.87), atol=0.01)
    np.testing.assert_array_equal(train.stain_jitter(rgb, HE, (1.0, 1.0)), rgb)


def test_augment_draws_stain_factors_and_keeps_alignment():
    rgb, _ = _he_image(np.random.default_rng(2), (3, 32, 32))
    target = (rgb[None, 0, :, :, 0] > 120).astype(np.float32)
    valid = rgb[0, :, :, 1] % 2 == 0
    for seed in range(6):
        patch, t, v, params = train.augment(rgb, target, valid, np.random.default_rng(seed), HE)
        assert patch.shape == rgb.shape and patch.dtype == np.uint8
        assert t.shape == target.shape and t.dtype == np.float32 and v.dtype == bool
        f = np.array(params["stain_factors"])
        assert ((0.85 <= f) & (f <= 1.15)).all() and abs(f[0] - f[1]) > 1e-6
        geo = np.rot90(rgb, params["rot90"], axes=(1, 2))
        geo = np.flip(geo, axis=2) if params["flip"] else geo
        ratio = train.stain_concentrations(patch, HE) / train.stain_concentrations(geo, HE)
        np.testing.assert_allclose(np.median(ratio.reshape(-1, 2), axis=0), f, atol=0.015)
        np.testing.assert_array_equal(t[0], (geo[0, :, :, 0] > 120).astype(np.float32))
        np.testing.assert_array_equal(v, geo[0, :, :, 1] % 2 == 0)


def test_flips_keep_levels_and_target_aligned():
    """Without colour jitter, a target and mask drawn from the image stay equal to the same
    functions of the augmented image, on every level, for all 8 flips/rotations."""
    rng = np.random.default_rng(4)
    field = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    patch = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    patch[:, :, :, 1] = field                  # every level carries the same field
    target = np.stack([field > 100, field > 200]).astype(np.float32)
    valid = field % 3 == 0
    seen = set()
    for seed in range(40):
        p, t, v, params = train.augment(patch, target, valid, np.random.default_rng(seed), HE,
                                        jitter=0.0)
        seen.add((params["rot90"], params["flip"]))
        for level in range(3):
            np.testing.assert_array_equal(p[level, :, :, 1], p[0, :, :, 1])
        np.testing.assert_array_equal(t, np.stack([p[0, :, :, 1] > 100,
                                                   p[0, :, :, 1] > 200]).astype(np.float32))
        np.testing.assert_array_equal(v, p[0, :, :, 1] % 3 == 0)
        assert not np.array_equal(p[:, :, :, 0], patch[:, :, :, 0]) or params["rot90"] == 0
    assert len(seen) == 8


def test_split_is_slide_level_and_stratified(cohort):
    _, slides = cohort
    a, b = train.split_slides(slides, 0.25, seed=0)
    assert len(a) == 1 and len(b) == 1 and {a[0].slide_id, b[0].slide_id} == {"t0", "t1"}
    assert train.split_slides(slides, 0.0, seed=0) == (slides, [])


def test_lr_schedule():
    f = [train.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] == pytest.approx(0.05, abs=0.01)


@pytest.mark.parametrize("task", [t for t in task_names() if get_task(t).model is None])
def test_task_without_trainer_exits_2(task, tmp_path, capsys):
    assert train.main(["--task", task, "--out", str(tmp_path / "w"), "--synth", "2"]) == 2
    err = capsys.readouterr().err
    assert err == f"wsi-train: task {task} has no trainer in this version\n"
    assert not (tmp_path / "w.work").exists()


def test_usage_errors_are_one_line(tmp_path, capsys):
    assert train.main(["--task", "nope", "--out", str(tmp_path / "w")]) == 2
    assert train.main(["--task", "fls", "--out", str(tmp_path / "w")]) == 2
    assert train.main(["--task", "fls", "--out", str(tmp_path / "w"), "--data",
                       str(tmp_path / "missing.svs")]) == 2
    assert train.main(["--task", "fls", "--out", str(tmp_path / "w"), "--synth", "2",
                       "--patch-px", "66"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("wsi-train: error: ") for line in err)
    assert "Traceback" not in "".join(err)
    assert err[0].startswith("wsi-train: error: unknown task 'nope'")
    assert train.main(["--task", "glomerulii", "--out", str(tmp_path / "w")]) == 2
    assert "did you mean 'glomeruli'?" in capsys.readouterr().err


def test_bundled_demo_weights_load_and_describe_themselves():
    from pathlib import Path

    import wsi_pipeline

    weights = Path(wsi_pipeline.__file__).parent / "weights" / "fls_demo.safetensors"
    assert weights.stat().st_size < 5e6                      # a few MB at most
    model, meta = load_checkpoint(weights, task="fls")
    assert meta["demo"] is True and meta["architecture"] == TASK.model.arch
    assert meta["training"]["command"].startswith("wsi-train --task fls --synth 8 ")
    assert meta["training"]["command"] in " ".join(train.__doc__.replace("\\\n", " ").split())
    assert meta["metrics"]["val_dice"] >= 0.85
    assert meta["parameters"] == count_parameters(model)
