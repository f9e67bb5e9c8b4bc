"""SimCLR pretraining on glomerulus crops and the M0/M1 glomerulus classifier for the
`mesangial` task (docs/models.md §5, seed 004).

SimCLR [standard]: two augmented views of each unlabelled glomerulus crop go through the
encoder, global average pooling (features h) and a Linear-ReLU-Linear projection head
(z, 128-d); NT-Xent (``losses.nt_xent_loss``) pulls the two views together. The classifier
fine-tunes the same encoder + pooling with a single logit (M1 = hypercellular) and no head.

Our choices (the backbone is unpublished): a ResNet-18 from smp's encoders with random
weights (any smp/timm name works, e.g. ``tu-mobilenetv3_small_100`` for speed), hidden width
of the projection head = encoder width. Both models take (B, 3, H, W) in [0, 1] (or the
pipeline's (B, 1, 3, H, W)) and normalise with ImageNet statistics inside.

Views: the seed's augmentations (random crop, horizontal flip, rotation, colour jitter,
CLAHE) on uint8 RGB glomerulus crops (512 x 512 at ~0.5 um/px), in numpy/skimage, fully
determined by the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hsv2rgb, rgb2hsv
from skimage.exposure import equalize_adapthist
from skimage.transform import resize, rotate
from torch import nn

from ..errors import CheckpointError
from .m2cf_net import ImageNetNormalise, make_encoder

DEFAULT_SIMCLR_ENCODER = "resnet18"
DEFAULT_SIMCLR_DEPTH = 5
PROJECTION_DIM = 128

# Random resized crop: fraction of the crop's area kept, and aspect-ratio range. The lower
# bound 0.4 keeps a side of >= 63 % of the 512 px crop (>= ~160 um at 0.5 um/px), i.e. most
# of a glomerular tuft (150-250 um across) with several mesangial areas in view, and once
# resized to 224 px a mesangial nucleus (~5-7 um) still spans >= ~4-6 px: cells stay
# countable, which the M0/M1 rule (> 3 cells per mesangial area) needs. SimCLR's ImageNet
# default (0.08) would show a few cells at most and blow them up out of scale.
CROP_SCALE = (0.4, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
MAX_ANGLE_DEG = 15.0
# Colour jitter, milder than SimCLR's ImageNet setting: stain hue carries meaning (PAS
# magenta vs haematoxylin blue), so hue moves by at most 0.04 of the colour circle.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.25, 0.25, 0.25, 0.04
CLAHE_PROBABILITY = 0.5
CLAHE_CLIP = 0.01


def _images(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W), or the pipeline's (B, 1, 3, H, W), -> (B, 3, H, W)."""
    if x.ndim == 5 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected input (B, 3, H, W) or (B, 1, 3, H, W), got {tuple(x.shape)}")
    return x


class SimCLR(nn.Module):
    """Encoder + global average pool (h, ``features``) + projection head to z (``forward``).
    ``classes`` is the width of z (the checkpoint code counts output channels)."""

    arch = "simclr"
    levels: tuple[int, ...] = (0,)

    def __init__(self, encoder_name: str = DEFAULT_SIMCLR_ENCODER,
                 encoder_depth: int = DEFAULT_SIMCLR_DEPTH,
                 projection_dim: int = PROJECTION_DIM, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.normalise = ImageNetNormalise()
        self.encoder = make_encoder(encoder_name, encoder_depth)
        dim = self.encoder.out_channels[-1]
        hidden = hidden_dim or dim
        self.arch_kwargs = {"encoder_name": encoder_name, "encoder_depth": encoder_depth,
                            "projection_dim": projection_dim, "hidden_dim": hidden}
        self.classes = projection_dim
        self.feature_dim = dim
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, projection_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """h (B, feature_dim): pooled encoder output, the representation to fine-tune."""
        return F.adaptive_avg_pool2d(self.encoder(self.normalise(_images(x)))[-1], 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """z (B, projection_dim), the input of NT-Xent."""
        return self.head(self.features(x))


class GlomerulusClassifier(nn.Module):
    """Encoder + global average pool + Linear(feature_dim, 1): logit of M1 (hypercellular)
    per glomerulus crop, (B, 3, H, W) in [0, 1] -> (B, 1)."""

    arch = "glomerulus_classifier"
    levels: tuple[int, ...] = (0,)
    classes = 1

    def __init__(self, encoder_name: str = DEFAULT_SIMCLR_ENCODER,
                 encoder_depth: int = DEFAULT_SIMCLR_DEPTH) -> None:
        super().__init__()
        self.arch_kwargs = {"encoder_name": encoder_name, "encoder_depth": encoder_depth}
        self.normalise = ImageNetNormalise()
        self.encoder = make_encoder(encoder_name, encoder_depth)
        self.feature_dim = self.encoder.out_channels[-1]
        self.fc = nn.Linear(self.feature_dim, 1)

    @classmethod
    def from_simclr(cls, model: SimCLR) -> GlomerulusClassifier:
        """A classifier with ``model``'s encoder architecture and a copy of its weights
        (the head is dropped; the logit layer starts fresh)."""
        kw = model.arch_kwargs
        clf = cls(encoder_name=kw["encoder_name"], encoder_depth=kw["encoder_depth"])
        clf.load_encoder(model.encoder.state_dict())
        return clf

    def load_encoder(self, state: dict[str, torch.Tensor]) -> None:
        """Copy pretrained encoder weights: an encoder state dict, or a whole SimCLR state
        dict (keys ``encoder.*``; the rest is ignored), e.g. read from a checkpoint."""
        if any(k.startswith("encoder.") for k in state):
            state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        try:
            self.encoder.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"encoder weights do not fit {self.arch_kwargs}: {first}") \
                from None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """h (B, feature_dim)."""
        return F.adaptive_avg_pool2d(self.encoder(self.normalise(_images(x)))[-1], 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# --- views -----------------------------------------------------------------------------------

def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 RGB (H, W, 3), got {rgb.dtype} {rgb.shape}")


def _resize(img: np.ndarray, out_px: int) -> np.ndarray:
    """float (h, w, 3) -> float (out_px, out_px, 3), anti-aliased when shrinking."""
    shrinking = min(img.shape[:2]) > out_px
    return resize(img, (out_px, out_px), order=1, mode="reflect", anti_aliasing=shrinking)


def _crop_box(h: int, w: int, u: np.ndarray) -> tuple[int, int, int, int]:
    """Random resized crop box (top, left, height, width) from uniforms ``u`` (4,): area
    fraction in CROP_SCALE, log-uniform aspect ratio in CROP_RATIO; clipped to the image."""
    area = h * w * (CROP_SCALE[0] + u[0] * (CROP_SCALE[1] - CROP_SCALE[0]))
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = math.exp(lo + u[1] * (hi - lo))  # width / height
    ch = min(h, max(1, round(math.sqrt(area / ratio))))
    cw = min(w, max(1, round(math.sqrt(area * ratio))))
    top = int(u[2] * (h - ch + 1)) if h > ch else 0
    left = int(u[3] * (w - cw + 1)) if w > cw else 0
    return min(top, h - ch), min(left, w - cw), ch, cw


def _jitter(img: np.ndarray, b: float, c: float, s: float, dh: float) -> np.ndarray:
    """Brightness (scale), contrast (blend with the mean grey), saturation (blend with the
    grey image), hue (rotation of the HSV hue); float [0, 1] in and out."""
    img = np.clip(img * b, 0, 1)
    grey = img @ np.array([0.299, 0.587, 0.114])
    img = np.clip((img - grey.mean()) * c + grey.mean(), 0, 1)
    grey = img @ np.array([0.299, 0.587, 0.114])
    img = np.clip((img - grey[..., None]) * s + grey[..., None], 0, 1)
    hsv = rgb2hsv(img)
    hsv[..., 0] = (hsv[..., 0] + dh) % 1.0
    return hsv2rgb(hsv)


def simclr_view(rgb: np.ndarray, rng: np.random.Generator, out_px: int = 224) -> np.ndarray:
    """One augmented SimCLR view of a glomerulus crop: uint8 (H, W, 3) -> uint8
    (out_px, out_px, 3). In order: random resized crop (area fraction ``CROP_SCALE``, see
    there for why), resize to ``out_px``; rotation by a multiple of 90 degrees plus a small
    angle (+/- ``MAX_ANGLE_DEG``, reflect padding); horizontal flip (p 0.5); colour jitter
    (brightness, contrast, saturation, hue); CLAHE (p 0.5). Every random number is drawn up
    front, so a view costs the same draws from ``rng`` whatever the branches."""
    _check_rgb(rgb)
    u = rng.random(12)
    img = rgb.astype(np.float64) / 255.0
    top, left, ch, cw = _crop_box(*rgb.shape[:2], u[:4])
    img = _resize(img[top:top + ch, left:left + cw], out_px)
    quarter_turns, angle = int(u[4] * 4) % 4, (2 * u[5] - 1) * MAX_ANGLE_DEG
    img = rotate(np.rot90(img, quarter_turns), angle, order=1, mode="reflect")
    if u[6] < 0.5:
        img = img[:, ::-1]
    img = _jitter(img, 1 + (2 * u[7] - 1) * BRIGHTNESS, 1 + (2 * u[8] - 1) * CONTRAST,
                  1 + (2 * u[9] - 1) * SATURATION, (2 * u[10] - 1) * HUE)
    if u[11] < CLAHE_PROBABILITY:
        img = equalize_adapthist(np.ascontiguousarray(img), clip_limit=CLAHE_CLIP)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def classifier_input(rgb: np.ndarray, out_px: int = 224) -> np.ndarray:
    """The deterministic evaluation view: the whole crop (512 x 512 at ~0.5 um/px) resized
    (anti-aliased) to uint8 (out_px, out_px, 3). A non-square crop is stretched."""
    _check_rgb(rgb)
    img = _resize(rgb.astype(np.float64) / 255.0, out_px)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def images_to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 views (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1], the models' input."""
    arr = np.ascontiguousarray(np.stack(list(images)) if not isinstance(images, np.ndarray)
                               else images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
