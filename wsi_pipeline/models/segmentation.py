"""Single-resolution smp segmenters for kidney-layer (docs/models.md §1): the paper's CNN row
(DeepLabv3+) and Transformer row (a SegFormer with a Mix-Transformer encoder).

Both follow the model contract: input (B, 1, 3, H, W) in [0, 1] (level 0 only), output
logits (B, classes, H/s, W/s), s = ``output_stride`` (1, 2 or 4: both decoders work at
stride 4 and smp upsamples their logits by 4/s). Each exposes ``family`` ("cnn" or
"transformer"), which selects the hybrid loss L_s (``losses.hybrid_loss``); models without
it count as CNNs.

Defaults are small enough to train on a CPU (random initialisation, no downloads); the
paper-size models are a matter of arguments:
- DeepLabV3Plus: default encoder ``tu-mobilenetv3_small_100`` with a 64-channel decoder,
  1.16 M parameters for 7 classes; the paper's DeepLabv3+ MobileNetV2 is
  ``encoder_name="mobilenet_v2", decoder_channels=256`` (4.4 M). Output stride 16, so H and
  W must be multiples of 16. In training mode the ASPP image-pooling branch has a BatchNorm
  over one value per channel, so a training batch needs B >= 2.
- Segformer: encoder ``mit_b0`` (the smallest Mix Transformer, 3.3 M parameters) with a
  64-channel decoder, 3.37 M for 7 classes; ``mit_b2`` with ``decoder_channels=256`` (24.7 M)
  is about the size of the paper's Swin-UNet. H and W must be multiples of 32; any batch
  size trains.
Measured on 2 CPU cores (shared, so rough): one training step on 2 x 512 px patches takes
about 0.5-0.7 s for the default DeepLabV3Plus and 0.9 s for the default Segformer.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from .m2cf_net import ImageNetNormalise, split_levels

DEFAULT_DEEPLAB_ENCODER = "tu-mobilenetv3_small_100"
DEFAULT_DEEPLAB_CHANNELS = 64
DEFAULT_SEGFORMER_ENCODER = "mit_b0"
DEFAULT_SEGFORMER_CHANNELS = 64


def _upsampling(output_stride: int) -> int:
    """smp's logit upsampling from the decoders' stride 4 to ``output_stride``."""
    if output_stride not in (1, 2, 4):
        raise ValueError(f"output_stride must be 1, 2 or 4, got {output_stride}")
    return 4 // output_stride


class DeepLabV3Plus(nn.Module):
    """smp ``DeepLabV3Plus`` under the contract (level 0 only); a CNN."""

    arch = "deeplabv3plus"
    family = "cnn"
    levels: tuple[int, ...] = (0,)

    def __init__(self, encoder_name: str = DEFAULT_DEEPLAB_ENCODER,
                 decoder_channels: int = DEFAULT_DEEPLAB_CHANNELS,
                 atrous_rates: tuple[int, ...] | list[int] = (12, 24, 36),
                 classes: int = 1, output_stride: int = 1) -> None:
        super().__init__()
        rates = tuple(int(r) for r in atrous_rates)
        self.arch_kwargs = {"encoder_name": encoder_name, "decoder_channels": decoder_channels,
                            "atrous_rates": list(rates), "classes": classes,
                            "output_stride": output_stride}
        self.classes = classes
        self.output_stride = output_stride
        self.normalise = ImageNetNormalise()
        # No feature_cls="getter" for timm encoders here: the getter cannot dilate, and the
        # default depth 5 runs the whole encoder anyway.
        self.net = smp.DeepLabV3Plus(encoder_name=encoder_name, encoder_weights=None,
                                     decoder_channels=decoder_channels,
                                     decoder_atrous_rates=rates, classes=classes,
                                     upsampling=_upsampling(output_stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (patch,) = split_levels(self.normalise(x), 1)
        return self.net(patch)


class Segformer(nn.Module):
    """smp ``Segformer`` under the contract; a Transformer (``family`` is fixed, so keep a
    Mix-Transformer ``mit_b*`` encoder)."""

    arch = "segformer"
    family = "transformer"
    levels: tuple[int, ...] = (0,)

    def __init__(self, encoder_name: str = DEFAULT_SEGFORMER_ENCODER,
                 decoder_channels: int = DEFAULT_SEGFORMER_CHANNELS, classes: int = 1,
                 output_stride: int = 1) -> None:
        super().__init__()
        self.arch_kwargs = {"encoder_name": encoder_name, "decoder_channels": decoder_channels,
                            "classes": classes, "output_stride": output_stride}
        self.classes = classes
        self.output_stride = output_stride
        self.normalise = ImageNetNormalise()
        self.net = smp.Segformer(encoder_name=encoder_name, encoder_weights=None,
                                 decoder_segmentation_channels=decoder_channels, classes=classes,
                                 upsampling=_upsampling(output_stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (patch,) = split_levels(self.normalise(x), 1)
        return self.net(patch)
