"""M2CF-Net for focal lymphocytic sialadenitis foci (docs/models.md §4), and the helpers that the
baselines share with it.

From the paper: three encoder branches, one per resolution, over concentric patches of the
same pixel size at downsample 1, 2 and 4 around one centre; a cascade decoder of fusion
blocks running coarse to fine, each of which crops the centre of the coarser branch's
feature map to the shared field of view, upsamples it onto the finer grid (HookNet's
alignment rule), concatenates, and applies channel attention
M_c = sigmoid(MLP(AvgPool F) + MLP(MaxPool F)) then spatial attention
M_s = sigmoid(conv7x7([mean_c F; max_c F])), F' = M_s * (M_c * F); BCEDice loss.

Our choices (the paper leaves the details unpublished): the fusion runs on each branch's
deepest feature map (stride 2**encoder_depth); a 3x3 conv-BN-ReLU after the attention mixes
the concatenation down to ``fusion_channels``; the attention MLP reduces channels 4x; the
decoder is smp's U-Net decoder with skip connections from the finest branch, stopped at
``output_stride`` (the resolution the task stores: decoding to full resolution and pooling
afterwards spent 72 % of the FLOPs on pixels that were averaged away); the encoders are
small timm MobileNetV3s (see ``DEFAULT_ENCODER``), trained from scratch (no downloaded
weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

# Default (demo) configuration, shared by the baselines so all three train alike. Measured
# (benchmarks/bench_models.py): M2CF-Net 0.94 M parameters (1.9 MB as float16), 5.6 GFLOP
# per 512 px patch at output stride 1, most of it in the decoder's full-resolution layers
# (hence 16 and 8 channels there); the three encoders together cost about 1 GFLOP.
DEFAULT_ENCODER = "tu-mobilenetv3_small_100"
DEFAULT_DEPTH = 4
DEFAULT_DECODER_CHANNELS = (64, 32, 16, 8)
DEFAULT_FUSION_CHANNELS = 96

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def encoder_kwargs(name: str) -> dict[str, Any]:
    """Extra ``get_encoder`` arguments: timm (``tu-``) encoders go through timm's feature
    getter, which drops the stages deeper than ``depth`` (the default extractor of e.g. a
    MobileNetV3 keeps, and runs, all of its blocks)."""
    return {"feature_cls": "getter"} if name.startswith("tu-") else {}


def make_encoder(name: str, depth: int) -> nn.Module:
    """An smp encoder with random weights (never downloads)."""
    return get_encoder(name, in_channels=3, depth=depth, weights=None, **encoder_kwargs(name))


class ImageNetNormalise(nn.Module):
    """(x - mean) / std per RGB channel on inputs in [0, 1]; any shape ending in (3, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        # 3-D buffers: nn.Module.to(memory_format=channels_last) only touches 4-D tensors.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def split_levels(x: torch.Tensor, n_levels: int) -> list[torch.Tensor]:
    """(B, L, 3, H, W) -> L tensors (B, 3, H, W), checking the shape against the model."""
    if x.ndim != 5 or x.shape[1] != n_levels or x.shape[2] != 3:
        raise ValueError(f"expected input (B, {n_levels}, 3, H, W), got {tuple(x.shape)}")
    return list(x.unbind(1))


def crop_centre(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """The centre 1/ratio of a (B, C, H, W) map in each spatial direction: the part of a
    coarser level's field of view that a level ``ratio`` times finer covers. H and W must be
    multiples of ``ratio`` so that the crop falls on cell boundaries."""
    h, w = x.shape[-2:]
    if h % ratio or w % ratio:
        raise ValueError(f"feature map {h}x{w} cannot be centre-cropped by 1/{ratio}: "
                         "use a patch size with more factors of 2")
    ch, cw = h // ratio, w // ratio
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


def align_coarse(coarse: torch.Tensor, ratio: int, size: Sequence[int]) -> torch.Tensor:
    """HookNet alignment: crop the coarser map to the finer field of view, then resample it
    onto the finer grid of ``size`` (H, W) cells."""
    cropped = crop_centre(coarse, ratio)
    if tuple(cropped.shape[-2:]) == tuple(size):
        return cropped
    return F.interpolate(cropped, size=tuple(size), mode="bilinear", align_corners=False)


def decoder_blocks(encoder_depth: int, output_stride: int) -> int:
    """How many 2x decoder steps take the deepest map (stride 2**encoder_depth) to
    ``output_stride``, a power of two no larger than 2**encoder_depth."""
    steps = output_stride.bit_length() - 1
    if output_stride < 1 or 2**steps != output_stride or steps >= encoder_depth:
        raise ValueError(f"output_stride must be a power of two below 2**encoder_depth "
                         f"({2**encoder_depth}), got {output_stride}")
    return encoder_depth - steps


def describe(arch: str, kwargs: dict[str, Any]) -> str:
    """``arch(k=v, ...)`` for messages."""
    return f"{arch}({', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))})"


class ChannelAttention(nn.Module):
    """M_c = sigmoid(MLP(AvgPool F) + MLP(MaxPool F)), one shared MLP; returns (B, C, 1, 1)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        avg = F.adaptive_avg_pool2d(f, 1)
        peak = F.adaptive_max_pool2d(f, 1)
        return torch.sigmoid(self.mlp(avg) + self.mlp(peak))


class SpatialAttention(nn.Module):
    """M_s = sigmoid(conv7x7([mean_c F; max_c F])); returns (B, 1, H, W)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], 1)
        return torch.sigmoid(self.conv(pooled))


class FusionBlock(nn.Module):
    """Fuse a coarser map into a finer one: align (crop + upsample), concatenate to F,
    F' = M_s * (M_c * F), then a 3x3 conv-BN-ReLU to ``out_channels``."""

    def __init__(self, coarse_channels: int, fine_channels: int, out_channels: int,
                 ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        cat = coarse_channels + fine_channels
        self.channel_attention = ChannelAttention(cat)
        self.spatial_attention = SpatialAttention()
        self.mix = nn.Sequential(nn.Conv2d(cat, out_channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        f = torch.cat([align_coarse(coarse, self.ratio, fine.shape[-2:]), fine], 1)
        f = self.channel_attention(f) * f
        f = self.spatial_attention(f) * f
        return self.mix(f)


class M2CFNet(nn.Module):
    """M2CF-Net. Input (B, 3, 3, H, W) in [0, 1]: levels 0, 1, 2 (downsample 1, 2, 4) around
    one centre, finest first; output logits (B, classes, H/s, W/s) over the finest patch,
    s = ``output_stride``. H and W must be multiples of 2**(encoder_depth + 1) (32 at the
    default depth 4)."""

    arch = "m2cf_net"
    levels: tuple[int, ...] = (0, 1, 2)

    def __init__(self, encoder_name: str = DEFAULT_ENCODER, encoder_depth: int = DEFAULT_DEPTH,
                 decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
                 fusion_channels: int = DEFAULT_FUSION_CHANNELS, classes: int = 1,
                 output_stride: int = 1) -> None:
        super().__init__()
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if len(decoder_channels) != encoder_depth:
            raise ValueError(f"decoder_channels needs {encoder_depth} entries (one per "
                             f"encoder stage), got {len(decoder_channels)}")
        blocks = decoder_blocks(encoder_depth, output_stride)
        self.arch_kwargs = {"encoder_name": encoder_name, "encoder_depth": encoder_depth,
                            "decoder_channels": list(decoder_channels),
                            "fusion_channels": fusion_channels, "classes": classes,
                            "output_stride": output_stride}
        self.classes = classes
        self.output_stride = output_stride
        self.normalise = ImageNetNormalise()
        self.encoders = nn.ModuleList(make_encoder(encoder_name, encoder_depth)
                                      for _ in self.levels)
        deepest = self.encoders[0].out_channels[-1]
        # Cascade, coarse to fine: fusions[0] merges level 2 into level 1, fusions[1] the
        # result into level 0.
        ratios = [2 ** (c - f) for f, c in zip(self.levels[:-1], self.levels[1:], strict=True)]
        self.fusions = nn.ModuleList()
        coarse_channels = deepest
        for ratio in reversed(ratios):
            self.fusions.append(FusionBlock(coarse_channels, deepest, fusion_channels, ratio))
            coarse_channels = fusion_channels
        skips = list(self.encoders[0].out_channels[:-1]) + [fusion_channels]
        self.decoder = UnetDecoder(encoder_channels=skips,
                                   decoder_channels=decoder_channels[:blocks], n_blocks=blocks)
        self.head = nn.Conv2d(decoder_channels[blocks - 1], classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = split_levels(self.normalise(x), len(self.levels))
        features = [encoder(p) for encoder, p in zip(self.encoders, patches, strict=True)]
        fused = features[-1][-1]
        for fusion, finer in zip(self.fusions, reversed(features[:-1]), strict=True):
            fused = fusion(fused, finer[-1])
        return self.head(self.decoder([*features[0][:-1], fused]))
