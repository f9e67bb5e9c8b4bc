"""Losses. BCEDice is M2CF-Net's training loss (models.md §4)."""

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
