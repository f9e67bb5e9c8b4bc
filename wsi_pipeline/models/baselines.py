"""Baselines for M2CF-Net under the same contract and training code: a single-resolution
U-Net and a two-branch HookNet-style model.

Input (B, L, 3, H, W) in [0, 1] with L = len(model.levels); output logits
(B, classes, H/s, W/s) over the finest patch, s = ``output_stride`` (the decoder stops
there). Same encoder/decoder defaults as M2CF-Net.

HookNet (van Rijthoven et al., 2021) [paper]: a target branch at fine and a context branch
at coarse resolution over concentric patches of the same pixel size, power-of-two ratio;
the context branch's decoder features are centre-cropped and "hooked" (concatenated) into
the target branch where the feature-map spacings match. Our choices: context at level 2
(x4), so the context decoder's map at stride 2**(depth - 2) has the spacing of the target's
deepest map (stride 2**depth) and is hooked in there, with no resampling; smp's U-Net
decoder in both branches; no auxiliary context loss (the contract returns target logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import nn

from .m2cf_net import (
    DEFAULT_DECODER_CHANNELS,
    DEFAULT_DEPTH,
    DEFAULT_ENCODER,
    ImageNetNormalise,
    crop_centre,
    decoder_blocks,
    encoder_kwargs,
    make_encoder,
    split_levels,
)


def _decoder_channels(channels: Sequence[int], depth: int) -> tuple[int, ...]:
    channels = tuple(int(c) for c in channels)
    if len(channels) != depth:
        raise ValueError(f"decoder_channels needs {depth} entries (one per encoder stage), "
                         f"got {len(channels)}")
    return channels


class UNet(nn.Module):
    """Single-resolution smp ``Unet`` (level 0 only), its decoder stopped at
    ``output_stride``."""

    arch = "unet"
    levels: tuple[int, ...] = (0,)

    def __init__(self, encoder_name: str = DEFAULT_ENCODER, encoder_depth: int = DEFAULT_DEPTH,
                 decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
                 classes: int = 1, output_stride: int = 1) -> None:
        super().__init__()
        decoder_channels = _decoder_channels(decoder_channels, encoder_depth)
        blocks = decoder_blocks(encoder_depth, output_stride)
        self.arch_kwargs = {"encoder_name": encoder_name, "encoder_depth": encoder_depth,
                            "decoder_channels": list(decoder_channels), "classes": classes,
                            "output_stride": output_stride}
        self.classes = classes
        self.output_stride = output_stride
        self.normalise = ImageNetNormalise()
        self.net = smp.Unet(encoder_name=encoder_name, encoder_depth=encoder_depth,
                            encoder_weights=None, decoder_channels=decoder_channels,
                            classes=classes, **encoder_kwargs(encoder_name))
        if blocks < encoder_depth:  # same module names, fewer decoder blocks, a narrower head
            self.net.decoder = UnetDecoder(encoder_channels=self.net.encoder.out_channels,
                                           decoder_channels=decoder_channels[:blocks],
                                           n_blocks=blocks)
            self.net.segmentation_head = smp.base.SegmentationHead(
                decoder_channels[blocks - 1], classes, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (patch,) = split_levels(self.normalise(x), 1)
        return self.net(patch)


class HookNet(nn.Module):
    """Target branch at level 0, context branch at level 2 (4x the field of view)."""

    arch = "hooknet"
    levels: tuple[int, ...] = (0, 2)

    def __init__(self, encoder_name: str = DEFAULT_ENCODER, encoder_depth: int = DEFAULT_DEPTH,
                 decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
                 classes: int = 1, output_stride: int = 1) -> None:
        super().__init__()
        decoder_channels = _decoder_channels(decoder_channels, encoder_depth)
        blocks = decoder_blocks(encoder_depth, output_stride)
        steps = self.levels[1] - self.levels[0]  # context decoder steps to matching spacing
        if encoder_depth < steps:
            raise ValueError(f"hooknet needs encoder_depth >= {steps}")
        self.ratio = 2**steps
        self.arch_kwargs = {"encoder_name": encoder_name, "encoder_depth": encoder_depth,
                            "decoder_channels": list(decoder_channels), "classes": classes,
                            "output_stride": output_stride}
        self.classes = classes
        self.output_stride = output_stride
        self.normalise = ImageNetNormalise()
        self.target_encoder = make_encoder(encoder_name, encoder_depth)
        self.context_encoder = make_encoder(encoder_name, encoder_depth)
        context_channels = decoder_channels[:steps]
        self.context_decoder = UnetDecoder(encoder_channels=self.context_encoder.out_channels,
                                           decoder_channels=context_channels, n_blocks=steps)
        skips = list(self.target_encoder.out_channels)
        skips[-1] += context_channels[-1]
        self.decoder = UnetDecoder(encoder_channels=skips,
                                   decoder_channels=decoder_channels[:blocks], n_blocks=blocks)
        self.head = nn.Conv2d(decoder_channels[blocks - 1], classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target, context = split_levels(self.normalise(x), 2)
        t = self.target_encoder(target)
        c = self.context_encoder(context)
        hook = crop_centre(self.context_decoder(c), self.ratio)
        deepest = torch.cat([t[-1], hook], 1)
        return self.head(self.decoder([*t[:-1], deepest]))
