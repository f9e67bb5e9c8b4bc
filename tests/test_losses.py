"""Kidney-layer losses (soft Dice, L_s, weighted focal L_t) and SimCLR's NT-Xent, against
hand-computed values on tiny tensors (docs/models.md §1, §5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_pipeline.models.losses import (
    KIDNEY_CLASS_WEIGHTS,
    complementary_loss,
    complementary_matrix,
    dice_loss,
    focal_ce_loss,
    hybrid_loss,
    joint_loss,
    kidney_class_weights,
    nt_xent_loss,
    soft_dice_scores,
    weighted_focal_loss,
)

# One 2x2 image, 2 classes. Probability of class 1 per pixel, and the true classes:
#   p1 = [[0.9, 0.2],      target = [[1, 0],
#         [0.6, 0.1]]                [1, 1]]
# p0 = 1 - p1. Logits log(p) give softmax == p exactly.
P1 = torch.tensor([[0.9, 0.2], [0.6, 0.1]])
TARGET = torch.tensor([[[1, 0], [1, 1]]])


def probs() -> torch.Tensor:
    return torch.stack([1 - P1, P1])[None]  # (1, 2, 2, 2)


def logits() -> torch.Tensor:
    return probs().log()


def test_soft_dice_scores_by_hand():
    # class 1: TP = 0.9 + 0.6 + 0.1 = 1.6; sum p = 1.8 -> FP = 0.2; sum g = 3 -> FN = 1.4
    #          S1 = 2*1.6 / (2*1.6 + 1.4 + 0.2) = 3.2 / 4.8 = 2/3
    # class 0: TP = 0.8; sum p = 0.1 + 0.8 + 0.4 + 0.9 = 2.2 -> FP = 1.4; sum g = 1 -> FN = 0.2
    #          S0 = 1.6 / (1.6 + 0.2 + 1.4) = 0.5
    s = soft_dice_scores(probs(), TARGET, smooth=0.0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([0.5, 2 / 3]))
    # L_Dice = 1 - (0.5 + 2/3) / 2 = 5/12 (s = 1e-5 moves it by < 1e-5)
    assert dice_loss(logits(), TARGET).item() == pytest.approx(5 / 12, abs=1e-5)


def test_soft_dice_valid_mask_excludes_pixels():
    # Drop pixel (1, 1) (p1 = 0.1, g = 1):
    # class 1: TP = 1.5, FP = 1.7 - 1.5 = 0.2, FN = 2 - 1.5 = 0.5 -> S1 = 3 / 3.7
    # class 0: TP = 0.8, FP = 1.3 - 0.8 = 0.5, FN = 0.2          -> S0 = 1.6 / 2.3
    valid = torch.tensor([[[1, 1], [1, 0]]])
    s = soft_dice_scores(probs(), TARGET, valid=valid, smooth=0.0)
    torch.testing.assert_close(s, torch.tensor([1.6 / 2.3, 3 / 3.7]))
    # whatever the excluded pixel holds (another prediction, an ignore label 255) is unseen
    z, t = logits(), TARGET.clone()
    z[0, :, 1, 1] = torch.tensor([7.0, -3.0])
    t[0, 1, 1] = 255
    for family in ("cnn", "transformer"):
        assert hybrid_loss(z, t, family, valid=valid).item() == pytest.approx(
            hybrid_loss(logits(), TARGET, family, valid=valid).item(), abs=1e-6)
    w = torch.tensor([1.0, 1.5])
    assert joint_loss(z, t, w, valid=valid).item() == pytest.approx(
        joint_loss(logits(), TARGET, w, valid=valid).item(), abs=1e-6)
    with pytest.raises(ValueError, match="outside 0..1"):
        dice_loss(z, t)  # 255 counted without the mask


def test_perfect_prediction_has_zero_dice_loss():
    target = torch.tensor([[[0, 1, 2], [2, 1, 0]], [[1, 1, 2], [0, 0, 2]]])
    z = 30.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert dice_loss(z, target).item() == pytest.approx(0.0, abs=1e-6)
    assert hybrid_loss(z, target).item() == pytest.approx(0.0, abs=1e-6)
    # the opposite prediction: every TP is 0, so every S_c is ~0 and the loss ~1
    assert dice_loss(-z, target).item() > 0.99


def test_hybrid_loss_by_hand():
    # -log p_y per pixel: -ln 0.9 = 0.105361, -ln 0.8 = 0.223144, -ln 0.6 = 0.510826,
    # -ln 0.1 = 2.302585. Weights (1, 2); pixels of class 1 weigh 2, the class-0 pixel 1:
    # CE_w = (2*0.105361 + 0.223144 + 2*0.510826 + 2*2.302585) / (2+1+2+2) = 0.865812
    # plain CE = (0.105361 + 0.223144 + 0.510826 + 2.302585) / 4 = 0.785479
    w = torch.tensor([1.0, 2.0])
    cnn = hybrid_loss(logits(), TARGET, "cnn", class_weights=w)
    assert cnn.item() == pytest.approx(0.865812 + 5 / 12, abs=1e-5)
    # torch's own weighted mean agrees
    ce_torch = F.cross_entropy(logits(), TARGET, weight=w).item()
    assert cnn.item() == pytest.approx(ce_torch + dice_loss(logits(), TARGET).item(), abs=1e-6)
    transformer = hybrid_loss(logits(), TARGET, "transformer")
    assert transformer.item() == pytest.approx(0.5 * 0.785479 + 0.5 * 5 / 12, abs=1e-5)
    with pytest.raises(ValueError, match="family"):
        hybrid_loss(logits(), TARGET, "rnn")


def test_weighted_focal_loss_by_hand():
    # alpha 0.5, gamma 2, w = (1, 1.5); l = -0.5 (1 - p^w)^2 * w * ln p
    # (0,0) y=1 p=0.9: 0.9^1.5 = 0.853815, (1-.)^2 = 0.021370, *1.5*0.105361*0.5 = 0.00168867
    # (0,1) y=0 p=0.8: 0.8^1   = 0.8,      (1-.)^2 = 0.04,     *1.0*0.223144*0.5 = 0.00446287
    # (1,0) y=1 p=0.6: 0.6^1.5 = 0.464758, (1-.)^2 = 0.286484, *1.5*0.510826*0.5 = 0.10975752
    # (1,1) y=1 p=0.1: 0.1^1.5 = 0.031623, (1-.)^2 = 0.937754, *1.5*2.302585*0.5 = 1.61944456
    # mean = 1.73535362 / 4 = 0.43383841
    w = torch.tensor([1.0, 1.5])
    assert weighted_focal_loss(logits(), TARGET, w).item() == pytest.approx(0.43383841, abs=1e-6)
    # valid mask: drop (1,1) -> (0.00168867 + 0.00446287 + 0.10975752) / 3 = 0.03863635
    valid = torch.tensor([[[True, True], [True, False]]])
    assert weighted_focal_loss(logits(), TARGET, w, valid=valid).item() == pytest.approx(
        0.03863635, abs=1e-6)
    # L_t = mean focal + L_Dice
    assert joint_loss(logits(), TARGET, w).item() == pytest.approx(0.43383841 + 5 / 12, abs=1e-5)


def test_focal_with_gamma_0_alpha_1_unit_weights_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 5, generator=g)
    t = torch.randint(0, 4, (2, 3, 5), generator=g)
    focal = weighted_focal_loss(z, t, torch.ones(4), alpha=1.0, gamma=0.0)
    assert focal.item() == pytest.approx(F.cross_entropy(z, t).item(), abs=1e-6)


def test_kidney_class_weights():
    w = kidney_class_weights()
    assert w.dtype == torch.float32 and w.tolist() == [1, 1, 1, 1, 1, 1.5, 1.5]
    assert tuple(w.tolist()) == KIDNEY_CLASS_WEIGHTS
    assert kidney_class_weights(3, human=(2,), human_weight=2.0).tolist() == [1, 1, 2]
    with pytest.raises(ValueError):
        kidney_class_weights(3, human=(5,))


def test_nt_xent_by_hand():
    # N = 2, views v0 = v2 = (1, 0), v1 = v3 = (0, 1); tau = 0.5.
    # For v0: positive v2 with s = 1, negatives v1, v3 with s = 0:
    # l = -log(e^2 / (e^0 + e^2 + e^0)) = log(1 + 2 e^-2) = 0.239545; the same for all four.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert nt_xent_loss(z, z).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-6)
    assert nt_xent_loss(3 * z, z).item() == pytest.approx(0.239545, abs=1e-6)  # cosine: scale-free
    # anti-aligned pairs: s = -1 -> l = log(1 + 2 e^2) = 2.758624
    assert nt_xent_loss(z, -z).item() == pytest.approx(2.758624, abs=1e-6)
    # tau = 1: log(1 + 2 e^-1)
    assert nt_xent_loss(z, z, tau=1.0).item() == pytest.approx(math.log(1 + 2 / math.e),
                                                                abs=1e-6)


def test_nt_xent_identical_pairs_beat_random_pairs():
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(16, 32, generator=g), dim=1)
    z2 = F.normalize(torch.randn(16, 32, generator=g), dim=1)
    same, rand = nt_xent_loss(z1, z1.clone()).item(), nt_xent_loss(z1, z2).item()
    # random pairs: the positive is no closer than the 30 negatives, ~ log(31) = 3.43
    assert rand > 3.0 and same < rand - 1.0
    with pytest.raises(ValueError):
        nt_xent_loss(z1, z2[:8])


def test_gradients_are_finite_even_for_extreme_logits():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 7, (2, 4, 4), generator=g)
    z = (60 * torch.randn(2, 7, 4, 4, generator=g)).requires_grad_()
    w = kidney_class_weights()
    valid = torch.rand(2, 4, 4, generator=g) > 0.3
    for loss in (dice_loss(z, t, valid), hybrid_loss(z, t, "cnn", w, valid),
                 hybrid_loss(z, t, "transformer", valid=valid), joint_loss(z, t, w, valid),
                 weighted_focal_loss(z, t, w, gamma=0.0)):
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # excluded pixels get no gradient
    (grad,) = torch.autograd.grad(joint_loss(z, t, w, valid), z)
    assert (grad.permute(1, 0, 2, 3)[:, ~valid] == 0).all()
    a = torch.randn(5, 8, generator=g).requires_grad_()
    (grad,) = torch.autograd.grad(nt_xent_loss(a, a + 0.01), a)
    assert torch.isfinite(grad).all()


# --- liver: complementary labels (docs/models.md §3) ---------------------------------------------

def _pixels(*p: tuple[float, float, float]) -> torch.Tensor:
    """Logits (1, 3, 1, n) whose softmax is exactly the given class probabilities."""
    return torch.tensor(p).log().T[None, :, None, :]


def test_complementary_matrix():
    assert complementary_matrix(3).tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    assert complementary_matrix(3, excluded_only=False).tolist() == [
        [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    with pytest.raises(ValueError):
        complementary_matrix(1)


def test_complementary_loss_by_hand():
    # one pixel, p = (0.2, 0.5, 0.3), complementary label 1 ("not class 1"), gamma 2
    z, y = _pixels((0.2, 0.5, 0.3)), torch.tensor([1])
    # special Q: q = p0 + p2 = 1 - p1 = 0.5; L = -(0.5)^2 ln 0.5 = 0.173287
    assert complementary_loss(z, y, complementary_matrix(3)).item() == pytest.approx(
        0.25 * math.log(2), abs=1e-6)
    # uniform Q: q = (0.2 + 0.3) / 2 = 0.25; L = -(0.75)^2 ln 0.25 = 0.779791
    assert complementary_loss(z, y, complementary_matrix(3, False)).item() == pytest.approx(
        0.779791, abs=1e-6)
    # a general Q: column 1 = (0.7, 0, 0.6) -> q = 0.7*0.2 + 0.6*0.3 = 0.32;
    # L = -(0.68)^2 ln 0.32 = 0.4624 * 1.139434 = 0.526874
    q = torch.tensor([[0.0, 0.7, 0.3], [0.5, 0.0, 0.5], [0.4, 0.6, 0.0]])
    assert complementary_loss(z, y, q).item() == pytest.approx(0.526874, abs=1e-6)
    # gamma 0: plain -ln q = ln 2
    assert complementary_loss(z, y, complementary_matrix(3), gamma=0.0).item() == pytest.approx(
        math.log(2), abs=1e-6)
    # clipping: p = (1, e^-100, e^-100) -> (1 - 1e-5, 1e-5, 1e-5); "not class 0":
    # q = 2e-5, L = -(1 - 2e-5)^2 ln 2e-5 = 10.819345 (finite)
    far = torch.tensor([100.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert complementary_loss(far, torch.tensor([0]), complementary_matrix(3)).item() == \
        pytest.approx(10.819345, abs=1e-3)


def test_complementary_loss_special_case_and_reduction():
    # special Q gives q = 1 - p_excluded for every complementary label
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 3, generator=g)
    y = torch.tensor([3, 1])
    p = torch.softmax(z, 1).clamp(1e-5, 1 - 1e-5)
    q = 1 - p[torch.arange(2), y]  # (2, 3, 3)
    expected = (-(1 - q) ** 2 * q.log()).mean()
    assert complementary_loss(z, y, complementary_matrix(4)).item() == pytest.approx(
        expected.item(), abs=1e-6)
    # reduction: mean over patches of the per-patch mean over valid pixels.
    # patch 0, "not 1": (0.2, 0.5, 0.3) -> q 0.5, L 0.173287; (0.25, 0.25, 0.5) -> q 0.75,
    #   L = 0.0625 * ln(4/3) = 0.017980; patch mean 0.095633
    # patch 1, "not 0": (0.5, 0.2, 0.3) -> q 0.5, L 0.173287; its 2nd pixel is not valid
    # patch 2: no valid pixel, does not count
    # -> (0.095633 + 0.173287) / 2 = 0.134460 (all valid pixels pooled would give 0.121518)
    z = torch.cat([_pixels((0.2, 0.5, 0.3), (0.25, 0.25, 0.5)),
                   _pixels((0.5, 0.2, 0.3), (0.9, 0.05, 0.05)),
                   _pixels((0.1, 0.1, 0.8), (0.1, 0.1, 0.8))])
    valid = torch.tensor([[[1, 1]], [[1, 0]], [[0, 0]]])
    loss = complementary_loss(z, torch.tensor([1, 0, 2]), complementary_matrix(3), valid=valid)
    assert loss.item() == pytest.approx(0.134460, abs=1e-6)
    none = complementary_loss(z, torch.tensor([1, 0, 2]), complementary_matrix(3),
                              valid=torch.zeros(3, 1, 2))
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="outside"):
        complementary_loss(z, torch.tensor([1, 0, 3]), complementary_matrix(3))
    with pytest.raises(ValueError, match="Q must be"):
        complementary_loss(z, torch.tensor([1, 0, 2]), complementary_matrix(4))


def test_complementary_gradient_step_lowers_the_excluded_class():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 4, generator=g).requires_grad_()
    y = torch.tensor([2, 0])
    before = torch.softmax(z, 1)[torch.arange(2), y].detach()
    complementary_loss(z, y, complementary_matrix(3)).backward()
    assert torch.isfinite(z.grad).all()
    with torch.no_grad():
        after = torch.softmax(z - 1.0 * z.grad, 1)[torch.arange(2), y]
    assert (after < before).all()


def test_focal_ce_loss_by_hand():
    # -(1 - p)^2 ln p per pixel: 0.9 -> 0.01 * 0.105361; 0.8 -> 0.04 * 0.223144;
    # 0.6 -> 0.16 * 0.510826; 0.1 -> 0.81 * 2.302585; mean = 1.956805 / 4 = 0.489201
    assert focal_ce_loss(logits(), TARGET).item() == pytest.approx(0.489201, abs=1e-6)
    assert focal_ce_loss(logits(), TARGET, gamma=0.0).item() == pytest.approx(
        F.cross_entropy(logits(), TARGET).item(), abs=1e-6)
