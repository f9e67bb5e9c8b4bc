"""Model registry in the style of segmentation-models-pytorch.

Contract of every model: ``forward(x)`` takes (B, L, 3, H, W) float in [0, 1] -- L
concentric patches of the same pixel size around one centre, level i covering
2**levels[i] times the finest field of view, finest first -- and returns logits
(B, classes, H, W) over the finest patch. Each model normalises its own input and exposes
``levels`` (pyramid levels it needs, 0 = working MPP), ``classes``, ``arch`` (its registry
name) and ``arch_kwargs`` (every argument ``build_model`` needs to rebuild it). Segmenters may
expose ``family`` ("cnn" or "transformer", which picks the loss recipe); none means "cnn".
The `mesangial` models (``simclr``, ``glomerulus_classifier``) are image-level: they take
(B, 3, H, W) (or (B, 1, 3, H, W)) and return (B, classes) -- projections or the M1 logit.
The `glomerular-dx` model (``cmus_net``) is case-level: ``forward(om, im, tem, tem_mask)``
(or one dict of those) takes the OM and IM images (B, 3, H, W), the zero-padded TEM bag
(B, T, 3, H, W), all in [0, 1], and the bag's mask (B, T) bool (True = real image), and
returns a dict with the fusion ``logits`` (B, classes), the per-modality logits ``om``,
``im``, ``tem`` and the TEM instances SMIL kept (``kept``, ``weights``, ``medoid``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import UsageError
from .baselines import HookNet, UNet
from .cmus_net import CMUSNet
from .m2cf_net import M2CFNet
from .segmentation import DeepLabV3Plus, Segformer
from .simclr import GlomerulusClassifier, SimCLR

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "m2cf_net": M2CFNet,
    "unet": UNet,
    "hooknet": HookNet,
    "deeplabv3plus": DeepLabV3Plus,
    "segformer": Segformer,
    "simclr": SimCLR,
    "glomerulus_classifier": GlomerulusClassifier,
    "cmus_net": CMUSNet,
}

__all__ = ["ARCHITECTURES", "CMUSNet", "DeepLabV3Plus", "GlomerulusClassifier", "HookNet",
           "M2CFNet", "Segformer", "SimCLR", "UNet", "build_model", "count_parameters"]


def build_model(arch: str, **kwargs) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (a key of ``ARCHITECTURES``)."""
    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r} (choices: "
                         f"{', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[arch](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (weights only, not buffers such as BatchNorm statistics)."""
    return sum(p.numel() for p in model.parameters())
