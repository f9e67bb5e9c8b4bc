"""Losses: BCEDice for M2CF-Net (docs/models.md §4); soft Dice, the hybrid loss L_s and the
weighted-focal joint loss L_t for kidney-layer segmentation (§1); SimCLR's NT-Xent for the
mesangial glomerulus pretraining (§5). All are computed in float32; segmentation losses take
a ``valid`` mask, and pixels where it is 0 count in no term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """BCEDice = BCE(z, g) + 1 - (2 sum p g + smooth) / (sum p + sum g + smooth), p = sigmoid(z).

    ``logits`` z and ``target`` g (float {0, 1}) have the same shape, e.g. (B, 1, H, W). BCE
    is the mean over pixels; the Dice sums run over the whole batch (all pixels of all
    images and channels at once), not per image. Pixels where ``valid`` (same shape, or
    broadcastable to it) is 0 count in neither term. Computed in float32; returns a scalar.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    z, g = logits.float(), target.float()
    weight = torch.ones_like(z) if valid is None else valid.float().expand_as(z)
    bce = F.binary_cross_entropy_with_logits(z, g, weight=weight, reduction="sum")
    bce = bce / weight.sum().clamp_min(1.0)
    p = torch.sigmoid(z) * weight
    g = g * weight
    dice = (2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth)
    return bce + 1 - dice


# --- kidney-layer (docs/models.md §1) ------------------------------------------------------------

KIDNEY_HUMAN_CLASSES = (5, 6)  # human cortex, human medulla in the 7-class joint space
KIDNEY_CLASS_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.5, 1.5)


def kidney_class_weights(classes: int = 7, human: tuple[int, ...] = KIDNEY_HUMAN_CLASSES,
                         human_weight: float = 1.5) -> torch.Tensor:
    """Class weights w (classes,) float32 for the joint loss: 1 everywhere, ``human_weight``
    on the human classes (up-weights the scarce human data). The default is the 7-class joint
    space 0 background, 1-4 mouse inner medulla / inner stripe / outer stripe / cortex,
    5 human cortex, 6 human medulla, i.e. ``KIDNEY_CLASS_WEIGHTS``."""
    if any(not 0 <= c < classes for c in human):
        raise ValueError(f"human classes {human} outside 0..{classes - 1}")
    w = torch.ones(classes, dtype=torch.float32)
    w[list(human)] = human_weight
    return w


def _valid_weight(target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W) float32 mask: 1 where the pixel counts, 0 elsewhere."""
    if valid is None:
        return torch.ones(target.shape, dtype=torch.float32, device=target.device)
    return valid.float().expand(target.shape)


def _class_index(target: torch.Tensor, classes: int, v: torch.Tensor) -> torch.Tensor:
    """``target`` as int64 with pixels outside ``v`` set to 0 (they may hold any value, e.g.
    an ignore label); raises if a counted pixel is not in 0..classes-1."""
    if target.ndim != 3:
        raise ValueError(f"target must be (B, H, W) class indices, got {tuple(target.shape)}")
    t = torch.where(v > 0, target.long(), torch.zeros_like(target, dtype=torch.long))
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= classes):
        raise ValueError(f"target holds class indices outside 0..{classes - 1}")
    return t


def _check_pair(scores: torch.Tensor, target: torch.Tensor) -> None:
    if scores.ndim != 4 or target.shape != (scores.shape[0], *scores.shape[2:]):
        raise ValueError(f"expected scores (B, C, H, W) and target (B, H, W), got "
                         f"{tuple(scores.shape)} and {tuple(target.shape)}")


def soft_dice_scores(probs: torch.Tensor, target: torch.Tensor,
                     valid: torch.Tensor | None = None, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice per class (C,), background included:
    S_c = (2 TP_c + s) / (2 TP_c + FN_c + FP_c + s) with TP_c = sum p g, FP_c = sum p - TP_c,
    FN_c = sum g - TP_c, s = ``smooth``; the sums run over all pixels of the whole batch.

    ``probs`` (B, C, H, W) class probabilities, ``target`` (B, H, W) int64 class indices,
    ``valid`` (B, H, W) or broadcastable, nonzero where a pixel counts. float32.
    """
    _check_pair(probs, target)
    v = _valid_weight(target, valid)
    classes = probs.shape[1]
    g = F.one_hot(_class_index(target, classes, v), classes).permute(0, 3, 1, 2).float()
    v = v.unsqueeze(1)
    p = probs.float() * v
    g = g * v
    tp = (p * g).sum((0, 2, 3))
    fp = p.sum((0, 2, 3)) - tp
    fn = g.sum((0, 2, 3)) - tp
    return (2 * tp + smooth) / (2 * tp + fn + fp + smooth)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
              smooth: float = 1e-5) -> torch.Tensor:
    """L_Dice = 1 - mean_c S_c on softmax(``logits``) (B, C, H, W); see ``soft_dice_scores``."""
    probs = torch.softmax(logits.float(), 1)
    return 1 - soft_dice_scores(probs, target, valid, smooth).mean()


def _weighted_ce(logits: torch.Tensor, target: torch.Tensor, v: torch.Tensor,
                 class_weights: torch.Tensor | None) -> torch.Tensor:
    """Cross entropy, reduced like torch's weighted mean: sum_i v_i w_yi l_i / sum_i v_i w_yi."""
    z = logits.float()
    t = _class_index(target, z.shape[1], v)
    nll = F.cross_entropy(z, t, reduction="none")  # (B, H, W)
    w = v if class_weights is None else v * class_weights.float().to(z.device)[t]
    return (w * nll).sum() / w.sum().clamp_min(1e-12)


def hybrid_loss(logits: torch.Tensor, target: torch.Tensor, family: str = "cnn",
                class_weights: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_s for the independent (binary) tasks of docs/models.md §1: CNNs CE_w + L_Dice,
    Transformers 0.5 CE + 0.5 L_Dice.

    ``logits`` (B, C, H, W), ``target`` (B, H, W) int64 class indices, ``class_weights``
    (C,) or None (unweighted) weight the CE term in either family, reduced as torch's
    weighted mean; the spec's Transformer row is unweighted CE, i.e. ``class_weights=None``.
    CE and Dice count only pixels where ``valid`` is nonzero. Returns a float32 scalar.
    """
    _check_pair(logits, target)
    if family not in ("cnn", "transformer"):
        raise ValueError(f"family must be 'cnn' or 'transformer', not {family!r}")
    v = _valid_weight(target, valid)
    ce = _weighted_ce(logits, target, v, class_weights)
    dice = dice_loss(logits, target, v)
    return ce + dice if family == "cnn" else 0.5 * ce + 0.5 * dice


def weighted_focal_loss(logits: torch.Tensor, target: torch.Tensor,
                        class_weights: torch.Tensor, alpha: float = 0.5, gamma: float = 2.0,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted focal loss, mean over valid pixels of
    l_i = -alpha (1 - p_iy^(w_y))^gamma * w_y * log p_iy,
    p_iy = softmax(``logits``) of pixel i's true class y, w = ``class_weights`` (C,).

    The exponent w_y on p_iy is as written in the spec (docs/models.md §1, taken from the
    authors' code), not the usual (1 - p)^gamma: a weight above 1 lowers p^w and so also
    raises the modulating factor of the up-weighted classes. ``logits`` (B, C, H, W),
    ``target`` (B, H, W) int64. Returns a float32 scalar.
    """
    _check_pair(logits, target)
    z = logits.float()
    v = _valid_weight(target, valid)
    t = _class_index(target, z.shape[1], v)
    logp = torch.log_softmax(z, 1).gather(1, t.unsqueeze(1)).squeeze(1)  # (B, H, W)
    w = class_weights.float().to(z.device)[t]
    focal = 1 - torch.exp(w * logp)  # 1 - p^w, with p^w = exp(w log p)
    loss = -alpha * focal.clamp_min(0).pow(gamma) * w * logp
    return (loss * v).sum() / v.sum().clamp_min(1.0)


def joint_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_t = mean weighted focal (alpha 0.5, gamma 2) + L_Dice: the cross-species joint loss
    of docs/models.md §1. Shapes as ``weighted_focal_loss``; ``class_weights`` e.g.
    ``kidney_class_weights()``."""
    return (weighted_focal_loss(logits, target, class_weights, valid=valid)
            + dice_loss(logits, target, valid))


# --- mesangial SimCLR (docs/models.md §5) --------------------------------------------------------

def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N views of N images: ``z1[k]`` and ``z2[k]`` (N, D) are the
    two views of image k. With s_ij the cosine similarity,
    l(i, j) = -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ),
    averaged over all 2N positive pairs (i, j) and (j, i). Returns a float32 scalar."""
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise ValueError(f"expected two (N, D) batches of equal shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device),
                                float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)


# --- liver: complementary labels (docs/models.md §3) ---------------------------------------------

COMPLEMENTARY_P_CLIP = 1e-5


def complementary_matrix(classes: int, excluded_only: bool = True) -> torch.Tensor:
    """Transition matrix Q (classes, classes) float32, Q_kj = P(y~ = j | y = k), Q_kk = 0.

    ``excluded_only``: every off-diagonal entry 1 -- the special case of docs/models.md §3, where
    for any complementary label y~ the loss sees q = 1 - p_y~ and only pushes the excluded
    class down (not a stochastic matrix: rows sum to classes - 1). Otherwise uniform
    complementary labels, 1 / (classes - 1) off the diagonal: q = (1 - p_y~) / (classes - 1).
    """
    if classes < 2:
        raise ValueError(f"complementary labels need at least 2 classes, got {classes}")
    off = 1.0 - torch.eye(classes, dtype=torch.float32)
    return off if excluded_only else off / (classes - 1)


def complementary_loss(logits: torch.Tensor, comp_label: torch.Tensor, Q: torch.Tensor,
                       gamma: float = 2.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Complementary-label loss of weakly labelled patches (docs/models.md §3, [code]).

    Patch b carries a class it cannot be, ``comp_label`` y~_b ((B,) int64). With
    p = softmax(``logits``) (B, K, H, W) clipped to [1e-5, 1 - 1e-5] and ``Q`` (K, K) (see
    ``complementary_matrix``): q_b(h, w) = sum_k Q[k, y~_b] p_k(h, w) and
    L(b) = mean over the valid pixels of patch b of -(1 - q)^gamma log q.
    Returned: the mean of L(b) over the patches with at least one valid pixel -- every weak
    patch weighs the same whatever its valid area [choice] (0 if none has any). ``valid``
    (B, H, W) or broadcastable, nonzero where a pixel counts. 1 - q is clamped at 0 (q can
    pass 1 by the clipping's 1e-5s). float32 scalar.
    """
    if logits.ndim != 4 or comp_label.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (B, K, H, W) and comp_label (B,), got "
                         f"{tuple(logits.shape)} and {tuple(comp_label.shape)}")
    k = logits.shape[1]
    if Q.shape != (k, k):
        raise ValueError(f"Q must be ({k}, {k}) for {k} classes, got {tuple(Q.shape)}")
    y = comp_label.long().to(logits.device)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"comp_label holds class indices outside 0..{k - 1}")
    p = torch.softmax(logits.float(), 1).clamp(COMPLEMENTARY_P_CLIP, 1 - COMPLEMENTARY_P_CLIP)
    cols = Q.float().to(logits.device)[:, y].T  # (B, K): column y~_b of Q for each patch
    q = torch.einsum("bk,bkhw->bhw", cols, p)
    loss = -(1 - q).clamp_min(0).pow(gamma) * torch.log(q)
    v = _valid_weight(q, valid)
    per_pixels = v.sum((1, 2))
    counted = per_pixels > 0
    per_patch = (loss * v).sum((1, 2)) / per_pixels.clamp_min(1.0)
    return (per_patch * counted).sum() / counted.sum().clamp_min(1)


def focal_ce_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised focal cross entropy, mean over valid pixels of -(1 - p_y)^gamma log p_y:
    ``weighted_focal_loss`` with unit class weights and alpha 1 (gamma 0 is plain CE).
    ``logits`` (B, C, H, W), ``target`` (B, H, W) int64. float32 scalar."""
    ones = torch.ones(logits.shape[1], dtype=torch.float32, device=logits.device)
    return weighted_focal_loss(logits, target, ones, alpha=1.0, gamma=gamma, valid=valid)
