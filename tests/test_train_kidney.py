"""Training pieces of the kidney tasks: species-mixed sampling, the softmax losses and
scores wired into wsi-train, and real annotated tiles turned into trainable slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.tasks import get_task
from wsi_pipeline.train.data import TrainSlide, sample_mixed
from wsi_pipeline.train.loop import confusion_scores, make_loss, target_index

KIDNEY_PAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "kidney-pas"


def _slide(n_tiles: int, species: str) -> TrainSlide:
    tiles = np.stack([np.zeros(n_tiles, int), np.arange(n_tiles)], 1)
    return TrainSlide("s", Path("s.svs"), Path("s.zarr"), None, tiles, np.zeros((0, 2), int),
                      (512, 512 * n_tiles), 512, species)


def test_mixed_sampling_gives_mouse_its_share_whatever_the_slide_sizes():
    # 3 small human slides (2 tiles each) and one big mouse section (100 tiles): by tiles
    # the mouse would get 100/106 of the patches; mixing gives it exactly its fraction
    slides = [_slide(2, "human"), _slide(2, "human"), _slide(2, "human"), _slide(100, "mouse")]
    plan = sample_mixed(slides, 1000, 64, np.random.default_rng(0), positive_fraction=0.0,
                        mouse_fraction=0.3)
    assert (plan[:, 0] == 3).sum() == 300
    assert set(np.unique(plan[:, 0])) == {0, 1, 2, 3}
    # shuffled together: the first 100 patches already mix the species
    assert 10 < (plan[:100, 0] == 3).sum() < 60
    alone = sample_mixed(slides[:3], 100, 64, np.random.default_rng(0), 0.0, 0.3)
    assert set(np.unique(alone[:, 0])) <= {0, 1, 2}


def test_confusion_scores_by_hand():
    # rows = truth, columns = prediction (background, cortex, medulla)
    m = np.array([[5, 1, 0], [1, 3, 1], [0, 0, 4]])
    s = confusion_scores(m, (1, 2))
    # cortex: tp 3, fp 1 (column 1 minus tp), fn 2 (row 1 minus tp): Dice 6/9, IoU 3/6
    # medulla: tp 4, fp 1, fn 0: Dice 8/9, IoU 4/5
    assert s["dice_per_class"][1:] == [pytest.approx(0.6667, abs=1e-4),
                                       pytest.approx(0.8889, abs=1e-4)]
    assert s["iou_per_class"][1:] == [0.5, 0.8]
    assert s["dice"] == pytest.approx((6 / 9 + 8 / 9) / 2)
    assert s["iou"] == pytest.approx(0.65)


def test_target_index_puts_unlabelled_pixels_in_background():
    t = torch.zeros(1, 3, 1, 3)
    t[0, 2, 0, 0] = 1
    t[0, 1, 0, 1] = 1            # pixel 2 has no class
    assert target_index(t).tolist() == [[[2, 1, 0]]]


def test_kidney_layer_trains_with_the_joint_loss():
    from wsi_pipeline.models.losses import joint_loss

    spec = get_task("kidney-layer").model
    name, loss = make_loss(spec)
    assert name.startswith("L_t") and "1.5" in name
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 4, 4)
    index = torch.randint(0, 7, (2, 4, 4))
    target = torch.nn.functional.one_hot(index, 7).permute(0, 3, 1, 2).float()
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    weights = torch.tensor([1, 1, 1, 1, 1, 1.5, 1.5])
    assert float(loss(logits, target, valid)) == pytest.approx(
        float(joint_loss(logits, index, weights, valid=valid)))
    assert make_loss(get_task("fls").model)[0] == "BCEDice"
    assert make_loss(get_task("glomeruli", trainable=True).model)[0] == "BCEDice"


@pytest.mark.skipif(not KIDNEY_PAS.is_dir(), reason="../shared/data/kidney-pas is absent")
def test_real_pas_tiles_become_annotated_slides(tmp_path):
    from PIL import Image

    from wsi_pipeline.annotations import find_annotations
    from wsi_pipeline.slide import open_slide
    from wsi_pipeline.tiles import tiles_to_slides

    slides = tiles_to_slides(KIDNEY_PAS, tmp_path, mpp=0.5, colours={(255, 0, 0): "glomerulus"})
    assert [s.stem for s in slides] == ["10025", "10149"]
    for slide_path in slides:
        slide = open_slide(slide_path)
        assert slide.mpp == pytest.approx(0.5) and slide.dimensions == (1024, 1024)
        assert "resolution" in slide.mpp_source
        mask = np.asarray(Image.open(KIDNEY_PAS / "masks" / f"{slide_path.stem}.png")
                          .convert("RGB"))
        true_fraction = float((mask == (255, 0, 0)).all(-1).mean())
        source = find_annotations(slide_path)
        target, valid = source.crop(0, 0, 512, 512, 1.0, {"glomerulus": ("glomerulus",)})
        assert valid.all()
        assert float(target[0].mean()) == pytest.approx(true_fraction, abs=0.005)
        slide.close()
