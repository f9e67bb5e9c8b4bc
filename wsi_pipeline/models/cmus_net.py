"""CMUS-Net for the `glomerular-dx` task: tri-modal IgAN / MN / LN diagnosis of a renal
biopsy case (docs/models.md §2, seed 001).

A case is one light-microscopy (OM) glomerulus image, one immunofluorescence (IM) image and
a bag of transmission electron microscopy (TEM) images (the first ``max_tem`` used, bags
zero-padded). One encoder per modality, each followed by a 1x1 projection to the common
token width C; the last feature map becomes N = h*w tokens (49 at 224 px and stride 32).

- SMIL [code] (``smil``) fuses the TEM bag of a case into one token map F_TEM (N, C):
  medoid of the bag, instances farther than t times the mean pairwise distance dropped, the
  others weighted by inverse distance to the medoid.
- CMSA [code] (``CMSA``): one shared standard multi-head attention (4 heads), TEM tokens as
  queries, OM or IM tokens as keys and values, plus a residual:
  F'_m = F_m + MHA(Q = F_TEM W_q, K = F_m W_k, V = F_m W_v) W_o for m in {OM, IM}.
- Heads: a linear head per modality on mean-pooled tokens, and a fusion head
  concat[pool F_TEM, pool F'_OM, pool F'_IM] -> Linear(3C, 128) -> Dropout -> ReLU ->
  Linear(128, K). Loss (``cmus_loss``) L = CE(fusion) + 0.3 CE(OM) + 0.5 CE(IM) + 0.2 CE(TEM).

Our choices (recorded here, configurable where it matters):
- [choice] SMIL runs on the projected token maps of each instance, flattened to N*C values
  for the distances, so that F_TEM keeps its N tokens for CMSA. As in the authors' code the
  min-max normalisation (one scalar min and max over the whole bag) serves the distances
  only; F_TEM sums the raw (projected) features. Selection and weights are computed without
  gradient (constants of the step); gradients flow through the kept features.
- [choice] Ties for the medoid go to the lowest slot. When the kept non-medoid weights have
  (numerically) zero range -- a single one, or all at the same distance -- they are all 1.
  A bag of one image keeps it with weight 1.
- [code] The OM and IM heads read the CMSA outputs F'_OM, F'_IM; the TEM head reads F_TEM.
- [choice] Encoders: smp/timm encoders with random weights (the paper: ImageNet Swin-B);
  default ``tu-mobilenetv3_small_100`` at depth 5 (stride 32). Inputs of another size than
  ``image_px`` are resized (bilinear, antialiased) so every modality gives N tokens.
- [choice] A missing modality: ``om=None`` or ``im=None`` for the whole batch gives zeros in
  its slot of the fusion input and ``None`` as its logits (``cmus_loss`` skips it). The
  fusion head never saw zeros in training unless trained that way, so treat such output
  as degraded. TEM cannot be missing: every case needs at least one real TEM image.
- [choice] ``smil=False`` (the ablation "without SMIL"): F_TEM is the plain mean of the
  real TEM instances' tokens; every instance is "kept" with weight 1 and ``medoid`` is -1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .m2cf_net import DEFAULT_ENCODER, ImageNetNormalise, make_encoder

DEFAULT_CLASSES = ("MN", "IgAN", "LN")
DEFAULT_WIDTH = 256
DEFAULT_DEPTH = 5  # stride 32: 7 x 7 = 49 tokens at 224 px
FUSION_HIDDEN = 128
LOSS_WEIGHTS = (1.0, 0.3, 0.5, 0.2)  # fusion, OM, IM, TEM
SMIL_T = 1.5
SMIL_EPS = 1e-8
# Relative range below which the kept non-medoid weights count as all equal (-> all 1):
# distances that are equal on paper differ in the last bits after the sqrt.
SMIL_EQUAL_RTOL = 1e-6


def smil(features: torch.Tensor, t: float = SMIL_T,
         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse multi-instance fusion of one bag (docs/models.md §2, SMIL).

    ``features`` (T, ...) holds one feature tensor per bag slot (e.g. (T, N, C) token maps);
    ``mask`` (T,) bool marks the real instances (None: a slot is padding when its features
    are all zero). Over the n real instances, flattened to vectors f_i:
    normalise min-max with one scalar min/max over the bag, D_ij Euclidean, medoid
    c = argmin_i sum_j D_ij, d = mean_i mean_{j!=i} D_ij, keep S = {i : D_ci <= t d},
    w_i = 1 / (D_ci + 1e-8) min-max normalised over the kept non-medoid instances (all 1 if
    their range is zero), w_c = 1. Returns (fused = sum_{i in S} w_i f_i over the raw
    features, shape features.shape[1:]; kept slot indices (S,) int64, ascending; their
    weights (S,) in the features' dtype). Selection and weights carry no gradient.
    """
    fused, kept, weights, _ = _smil(features, t, mask)
    return fused, kept, weights


def _smil(features: torch.Tensor, t: float, mask: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``smil`` plus the medoid's slot index."""
    if features.ndim < 2 or features.shape[0] < 1:
        raise ValueError(f"expected a bag (T, ...) with T >= 1, got {tuple(features.shape)}")
    if t <= 0:
        raise ValueError(f"SMIL threshold t must be > 0, got {t}")
    n_slots = features.shape[0]
    flat = features.detach().reshape(n_slots, -1)
    if mask is None:
        mask = flat.ne(0).any(1)
    elif mask.shape != (n_slots,):
        raise ValueError(f"mask must be ({n_slots},), got {tuple(mask.shape)}")
    slots = mask.to(features.device).bool().nonzero().flatten()
    n = slots.numel()
    if n == 0:
        raise ValueError("SMIL needs at least one real (non-padding) instance in the bag")
    if n == 1:
        return features[slots[0]], slots, features.new_ones(1), int(slots[0])
    with torch.no_grad():
        x = flat[slots].double()
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
        dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (n, n)
        c = int(dist.sum(1).argmin())
        mean_d = dist.sum() / (n * (n - 1))  # the diagonal is 0
        keep = dist[c] <= t * mean_d
        w = 1.0 / (dist[c] + SMIL_EPS)
        others = keep.clone()
        others[c] = False
        if others.any():
            wo = w[others]
            span = wo.max() - wo.min()
            w[others] = (wo - wo.min()) / span if span > SMIL_EQUAL_RTOL * wo.max() \
                else torch.ones_like(wo)
        w[c] = 1.0
        kept = keep.nonzero().flatten()
        weights = w[kept].to(features.dtype)
    real = features[slots[kept]]
    fused = (weights.view(-1, *([1] * (features.ndim - 1))) * real).sum(0)
    return fused, slots[kept], weights, int(slots[c])


class CMSA(nn.Module):
    """Cross-modal scale attention: F'_m = F_m + MHA(Q = F_TEM W_q, K = F_m W_k,
    V = F_m W_v) W_o, standard multi-head attention (``nn.MultiheadAttention``; W_o is its
    ``out_proj``). Tokens (B, N, C) in, (B, N, C) out; TEM and modality m must have the same
    number of tokens N (the residual adds F_m to one output per TEM query)."""

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"token width {width} is not divisible by {heads} heads")
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, f_tem: torch.Tensor, f_m: torch.Tensor) -> torch.Tensor:
        if f_tem.ndim != 3 or f_m.ndim != 3 or f_tem.shape[::2] != f_m.shape[::2]:
            raise ValueError(f"expected tokens (B, N, C) of equal B and C, got "
                             f"{tuple(f_tem.shape)} and {tuple(f_m.shape)}")
        if f_tem.shape[1] != f_m.shape[1]:
            raise ValueError(f"CMSA needs as many TEM tokens as modality tokens (the residual "
                             f"adds them), got {f_tem.shape[1]} and {f_m.shape[1]}: give "
                             f"every modality the same image size")
        out, _ = self.attn(f_tem, f_m, f_m, need_weights=False)
        return f_m + out


class TokenEncoder(nn.Module):
    """ImageNet normalisation, an smp encoder (random weights) and a 1x1 projection to
    ``width``: (B, 3, H, W) in [0, 1] -> tokens (B, h*w, width), row-major over (h, w)."""

    def __init__(self, encoder_name: str, encoder_depth: int, width: int) -> None:
        super().__init__()
        self.normalise = ImageNetNormalise()
        self.encoder = make_encoder(encoder_name, encoder_depth)
        self.project = nn.Conv2d(self.encoder.out_channels[-1], width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.project(self.encoder(self.normalise(x))[-1])
        return fmap.flatten(2).transpose(1, 2)


def _class_names(classes: int | Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, int):
        if classes < 2:
            raise ValueError(f"need at least 2 classes, got {classes}")
        return tuple(f"class{k}" for k in range(classes))
    names = tuple(str(c) for c in classes)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"need at least 2 distinct class names, got {names}")
    return names


class CMUSNet(nn.Module):
    """CMUS-Net (docs/models.md §2): case-level, not patch-level. ``forward(om, im, tem,
    tem_mask)`` or ``forward(batch_dict)`` with

    - om, im: (B, 3, H, W) float in [0, 1] (either may be None: see the module docstring);
    - tem: (B, T, 3, H, W) float in [0, 1]; slots beyond ``max_tem`` are ignored;
    - tem_mask: (B, T) bool, True = real image, False = padding (None: all real). Padding
      is found by the mask only and never goes through the encoder.

    Returns a dict: ``logits`` (B, K) fusion; ``om``, ``im``, ``tem`` (B, K) per-modality
    logits (None for a missing modality); ``kept`` (B lists of int64 (S_b,) TEM slot
    indices SMIL kept), ``weights`` (their SMIL weights (S_b,)), ``medoid`` (B ints).
    ``classes`` is K (an int, as for every registry model); ``class_names`` the names.
    """

    arch = "cmus_net"
    levels: tuple[int, ...] = (0,)

    def __init__(self, encoder_name: str = DEFAULT_ENCODER, encoder_depth: int = DEFAULT_DEPTH,
                 width: int = DEFAULT_WIDTH, heads: int = 4, image_px: int = 224,
                 max_tem: int = 10, classes: int | Sequence[str] = DEFAULT_CLASSES,
                 dropout: float = 0.5, t: float = SMIL_T, smil: bool = True) -> None:
        super().__init__()
        names = _class_names(classes)
        if image_px < 1 or max_tem < 1 or not 0 <= dropout < 1 or t <= 0:
            raise ValueError(f"bad CMUS-Net arguments: image_px {image_px}, max_tem {max_tem}, "
                             f"dropout {dropout}, t {t}")
        self.arch_kwargs: dict[str, Any] = {
            "encoder_name": encoder_name, "encoder_depth": encoder_depth, "width": width,
            "heads": heads, "image_px": image_px, "max_tem": max_tem,
            "classes": list(names), "dropout": dropout, "t": t, "smil": bool(smil)}
        self.class_names = names
        self.classes = len(names)
        self.image_px, self.max_tem, self.t, self.width = image_px, max_tem, t, width
        self.smil = bool(smil)
        self.enc_om = TokenEncoder(encoder_name, encoder_depth, width)
        self.enc_im = TokenEncoder(encoder_name, encoder_depth, width)
        self.enc_tem = TokenEncoder(encoder_name, encoder_depth, width)
        self.cmsa = CMSA(width, heads)
        k = self.classes
        self.head_om, self.head_im, self.head_tem = (nn.Linear(width, k) for _ in range(3))
        self.fusion = nn.Sequential(nn.Linear(3 * width, FUSION_HIDDEN), nn.Dropout(dropout),
                                    nn.ReLU(inplace=True), nn.Linear(FUSION_HIDDEN, k))

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.image_px, self.image_px):
            return x
        return F.interpolate(x, size=(self.image_px, self.image_px), mode="bilinear",
                             align_corners=False, antialias=True)

    def _image(self, x: torch.Tensor | None, name: str, batch: int) -> torch.Tensor | None:
        if x is None:
            return None
        if x.ndim != 4 or x.shape[0] != batch or x.shape[1] != 3:
            raise ValueError(f"expected {name} ({batch}, 3, H, W), got {tuple(x.shape)}")
        return self._resize(x)

    def forward(self, om: torch.Tensor | Mapping[str, Any] | None = None,
                im: torch.Tensor | None = None, tem: torch.Tensor | None = None,
                tem_mask: torch.Tensor | None = None) -> dict[str, Any]:
        if isinstance(om, Mapping):
            batch = om
            om, im, tem, tem_mask = (batch.get(k) for k in ("om", "im", "tem", "tem_mask"))
        if tem is None or tem.ndim != 5 or tem.shape[2] != 3:
            raise ValueError(f"expected tem (B, T, 3, H, W), got "
                             f"{None if tem is None else tuple(tem.shape)}")
        b = tem.shape[0]
        tem = tem[:, :self.max_tem]
        if tem_mask is None:
            tem_mask = torch.ones(tem.shape[:2], dtype=torch.bool, device=tem.device)
        else:
            if tem_mask.ndim != 2 or tem_mask.shape[0] != b:
                raise ValueError(f"expected tem_mask ({b}, T), got {tuple(tem_mask.shape)}")
            tem_mask = tem_mask[:, :self.max_tem].to(tem.device).bool()
        if tem_mask.shape != tem.shape[:2]:
            raise ValueError(f"tem_mask {tuple(tem_mask.shape)} does not match tem slots "
                             f"{tuple(tem.shape[:2])}")
        empty = (~tem_mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"case(s) {empty} of the batch have no TEM image")
        om, im = self._image(om, "om", b), self._image(im, "im", b)

        # every real TEM image of the batch in one encoder pass, then SMIL case by case
        real = self._resize(tem[tem_mask])
        tokens = self.enc_tem(real)  # (M, N, C), M = number of real images
        f_tem, kept, weights, medoid = [], [], [], []
        start = 0
        for case in range(b):
            n_real = int(tem_mask[case].sum())
            slots = tem_mask[case].nonzero().flatten()
            bag = tokens[start:start + n_real]
            start += n_real
            if not self.smil:  # the ablation: mean of the real instances
                f_tem.append(bag.mean(0))
                kept.append(slots)
                weights.append(bag.new_ones(n_real))
                medoid.append(-1)
                continue
            fused, idx, w, c = _smil(bag, self.t, torch.ones(n_real, dtype=torch.bool))
            f_tem.append(fused)
            kept.append(slots[idx])
            weights.append(w)
            medoid.append(int(slots[c]))
        f_tem_b = torch.stack(f_tem)  # (B, N, C)

        pooled = {"tem": f_tem_b.mean(1)}
        out: dict[str, Any] = {"tem": self.head_tem(pooled["tem"])}
        for name, x, enc, head in (("om", om, self.enc_om, self.head_om),
                                   ("im", im, self.enc_im, self.head_im)):
            if x is None:
                pooled[name] = f_tem_b.new_zeros(b, self.width)
                out[name] = None
                continue
            pooled[name] = self.cmsa(f_tem_b, enc(x)).mean(1)
            out[name] = head(pooled[name])
        out["logits"] = self.fusion(torch.cat([pooled["tem"], pooled["om"], pooled["im"]], 1))
        out.update(kept=kept, weights=weights, medoid=medoid)
        return out


def cmus_loss(out: Mapping[str, Any], target: torch.Tensor,
              weights: Sequence[float] = LOSS_WEIGHTS) -> torch.Tensor:
    """L = w0 CE(fusion) + w1 CE(OM) + w2 CE(IM) + w3 CE(TEM), default weights
    (1, 0.3, 0.5, 0.2) [code]. ``out`` is ``CMUSNet``'s output, ``target`` (B,) int64 class
    indices; a modality whose logits are None (missing) adds nothing. float32 scalar."""
    if len(weights) != 4:
        raise ValueError(f"need 4 loss weights (fusion, om, im, tem), got {len(weights)}")
    loss = weights[0] * F.cross_entropy(out["logits"].float(), target)
    for w, key in zip(weights[1:], ("om", "im", "tem"), strict=True):
        if out.get(key) is not None:
            loss = loss + w * F.cross_entropy(out[key].float(), target)
    return loss
