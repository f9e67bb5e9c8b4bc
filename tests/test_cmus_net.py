"""CMUS-Net (docs/models.md §2): SMIL against hand-computed bags, CMSA's roles and residual, the
model's shapes, padding and loss, and a tiny overfit on colour-coded synthetic cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_pipeline.models import ARCHITECTURES, build_model
from wsi_pipeline.models.cmus_net import CMSA, CMUSNet, cmus_loss, smil

TINY = {"encoder_name": "tu-test_efficientnet", "encoder_depth": 4, "width": 16, "image_px": 32}

# Five 2-D instances: a 3 x 4 rectangle (1,1) (4,1) (1,5) (4,5) and an outlier (16,1).
BAG = torch.tensor([[1.0, 1.0], [4.0, 1.0], [1.0, 5.0], [4.0, 5.0], [16.0, 1.0]])


def test_smil_by_hand():
    # Min-max over the bag: min 1, max 16 -> every distance is divided by 15; raw distances:
    #   rectangle sides 3 and 4, diagonals 5; outlier to p0 15, p1 12, p2 sqrt(241) = 15.524,
    #   p3 sqrt(160) = 12.649.
    # Row sums (raw): p0 3+4+5+15 = 27, p1 3+5+4+12 = 24, p2 27.524, p3 24.649, p4 55.173
    #   -> medoid c = p1.
    # d = sum of all rows / (5 * 4) = 158.346 / 20 = 7.917 (raw); t d = 11.876.
    #   D_1j = 3, 0, 5, 4, 12 -> p4 (12 > 11.876) is dropped; S = {0, 1, 2, 3}.
    # Normalised D_1j = 0.2, 1/3, 4/15 -> w = 1/D = 5, 3, 3.75 for p0, p2, p3;
    #   min-max over them: p0 (5-3)/2 = 1, p2 0, p3 0.75/2 = 0.375; the medoid 1.
    # F = 1*(1,1) + 1*(4,1) + 0*(1,5) + 0.375*(4,5) = (6.5, 3.875)
    fused, kept, w = smil(BAG)
    assert kept.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.0, 0.375]))
    torch.testing.assert_close(fused, torch.tensor([6.5, 3.875]))
    # a looser threshold keeps the outlier: t d = 2 * 7.917 = 15.83 >= 12; the weights become
    # 1/D = 5, 3, 3.75, 1.25 -> min-max over [1.25, 5]: p0 1, p2 1.75/3.75, p3 2.5/3.75, p4 0
    fused, kept, w = smil(BAG, t=2.0)
    assert kept.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 7 / 15, 2 / 3, 0.0]))
    torch.testing.assert_close(fused, BAG[:4].T @ torch.tensor([1.0, 1.0, 7 / 15, 2 / 3]))


def test_smil_ignores_padding():
    # all-zero slots are padding without a mask; with a mask, padded slots may hold anything
    padded = torch.zeros(8, 2)
    slots = [0, 2, 3, 5, 6]
    padded[slots] = BAG
    fused, kept, w = smil(padded)
    assert kept.tolist() == [0, 2, 3, 5]  # slot indices of instances 0..3
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.0, 0.375]))
    torch.testing.assert_close(fused, torch.tensor([6.5, 3.875]))
    junk = padded.clone()
    junk[[1, 4, 7]] = torch.tensor([100.0, -50.0])
    mask = torch.zeros(8, dtype=torch.bool)
    mask[slots] = True
    fused2, kept2, w2 = smil(junk, mask=mask)
    assert kept2.tolist() == [0, 2, 3, 5]
    torch.testing.assert_close(fused2, fused)
    with pytest.raises(ValueError, match="at least one real"):
        smil(torch.zeros(3, 2))


def test_smil_edge_cases():
    # a bag of one: kept with weight 1
    fused, kept, w = smil(torch.tensor([[2.0, 3.0]]))
    assert kept.tolist() == [0] and w.tolist() == [1.0]
    torch.testing.assert_close(fused, torch.tensor([2.0, 3.0]))
    # two: equal row sums -> medoid slot 0; d = D_01 so both kept; the one non-medoid weight
    # has zero range -> 1: F = f0 + f1
    fused, kept, w = smil(torch.tensor([[1.0, 2.0], [3.0, 7.0]]))
    assert kept.tolist() == [0, 1] and w.tolist() == [1.0, 1.0]
    torch.testing.assert_close(fused, torch.tensor([4.0, 9.0]))
    # all pairwise distances equal (sqrt 2 after normalising to one-hots): all kept, all 1
    fused, kept, w = smil(torch.tensor([[2.0, 1, 1], [1, 2, 1], [1, 1, 2]]))
    assert kept.tolist() == [0, 1, 2] and w.tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(fused, torch.tensor([4.0, 4.0, 4.0]))
    # identical instances (zero feature range): all distances 0, all kept with weight 1
    fused, kept, w = smil(torch.full((3, 4), 0.5))
    assert kept.tolist() == [0, 1, 2] and w.tolist() == [1.0, 1.0, 1.0]
    # token maps (T, N, C) fuse token by token; gradients reach the kept features only
    maps = BAG.view(5, 1, 2).repeat(1, 3, 1).requires_grad_()
    fused, kept, w = smil(maps)
    assert fused.shape == (3, 2)
    fused.sum().backward()
    torch.testing.assert_close(maps.grad[:, 0, 0], torch.tensor([1.0, 1.0, 0.0, 0.375, 0.0]))


def test_cmsa_roles_and_residual():
    torch.manual_seed(0)
    cmsa = CMSA(16, heads=4)
    f_tem, f_m = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    out = cmsa(f_tem, f_m)
    assert out.shape == (2, 5, 16)
    # keys/values from F_m: the attention term ignores the order of F_m's tokens; queries
    # from F_TEM: permuting them permutes the attention term
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(cmsa(f_tem, f_m[:, perm]) - f_m[:, perm], out - f_m)
    torch.testing.assert_close(cmsa(f_tem[:, perm], f_m) - f_m, (out - f_m)[:, perm])
    # zero W_o: the module returns F_m exactly
    with torch.no_grad():
        cmsa.attn.out_proj.weight.zero_()
        cmsa.attn.out_proj.bias.zero_()
    torch.testing.assert_close(cmsa(f_tem, f_m), f_m)
    with pytest.raises(ValueError, match="as many TEM tokens"):
        cmsa(torch.randn(2, 4, 16), f_m)
    with pytest.raises(ValueError, match="divisible"):
        CMSA(18, heads=4)


def _case_batch(b: int = 2, t: int = 3, px: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    om, im = torch.rand(b, 2, 3, px, px, generator=g).unbind(1)
    tem = torch.rand(b, t, 3, px, px, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, t - 1] = False
    tem[~mask] = 0
    return om, im, tem, mask


def test_forward_shapes_padding_and_registry():
    torch.manual_seed(0)
    model = build_model("cmus_net", **TINY).eval()
    assert ARCHITECTURES["cmus_net"] is CMUSNet
    assert model.classes == 3 and model.class_names == ("MN", "IgAN", "LN")
    assert model.arch == "cmus_net" and list(model.levels) == [0]
    om, im, tem, mask = _case_batch()
    with torch.no_grad():
        out = model(om, im, tem, mask)
        for key in ("logits", "om", "im", "tem"):
            assert out[key].shape == (2, 3) and torch.isfinite(out[key]).all()
        assert all(0 <= int(k.max()) < 3 for k in out["kept"])
        assert int(mask[0].sum()) >= len(out["kept"][0])
        assert out["medoid"][0] in out["kept"][0].tolist()
        # padding is found by the mask: junk in a padded slot, or extra padded slots, or
        # slots beyond max_tem change nothing
        junk = tem.clone()
        junk[0, 2] = 0.7
        torch.testing.assert_close(model(om, im, junk, mask)["logits"], out["logits"])
        wide = torch.cat([tem, torch.rand(2, 2, 3, 32, 32)], 1)
        wide_mask = torch.cat([mask, torch.zeros(2, 2, dtype=torch.bool)], 1)
        torch.testing.assert_close(model(om, im, wide, wide_mask)["logits"], out["logits"])
        short = CMUSNet(**TINY, max_tem=3).eval()
        short.load_state_dict(model.state_dict())
        torch.testing.assert_close(short(om, im, wide, torch.ones(2, 5, dtype=torch.bool))
                                   ["logits"], model(om, im, tem, torch.ones(2, 3, dtype=bool))
                                   ["logits"])
        # a dict input, and another image size (resized to image_px inside)
        as_dict = model({"om": om, "im": im, "tem": tem, "tem_mask": mask})
        torch.testing.assert_close(as_dict["logits"], out["logits"])
        big = model(F.interpolate(om, size=64), F.interpolate(im, size=64),
                    F.interpolate(tem.flatten(0, 1), size=64).view(2, 3, 3, 64, 64), mask)
        assert big["logits"].shape == (2, 3)
        # rebuilt from arch_kwargs: same structure, same weights fit
        twin = build_model("cmus_net", **model.arch_kwargs)
        twin.load_state_dict(model.state_dict())
        # a missing modality: None logits, the loss skips it
        no_im = model(om, None, tem, mask)
        assert no_im["im"] is None and no_im["logits"].shape == (2, 3)
    with pytest.raises(ValueError, match="no TEM image"):
        model(om, im, tem, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="om"):
        model(om[:1], im, tem, mask)
    with pytest.raises(ValueError, match="class"):
        CMUSNet(**{**TINY, "classes": ["MN"]})


def test_cmus_loss_is_the_weighted_sum_of_ces():
    torch.manual_seed(0)
    target = torch.tensor([0, 2, 1])
    out = {k: torch.randn(3, 3) for k in ("logits", "om", "im", "tem")}
    ce = {k: F.cross_entropy(v, target).item() for k, v in out.items()}
    expected = ce["logits"] + 0.3 * ce["om"] + 0.5 * ce["im"] + 0.2 * ce["tem"]
    assert cmus_loss(out, target).item() == pytest.approx(expected, abs=1e-6)
    # by hand for one case: logits (0, 0, ln 2) -> p = (1/4, 1/4, 1/2); target 2 -> ln 2
    one = {k: torch.tensor([[0.0, 0.0, math.log(2)]]) for k in out}
    assert cmus_loss(one, torch.tensor([2])).item() == pytest.approx(2.0 * math.log(2))
    out["im"] = None
    expected -= 0.5 * ce["im"]
    assert cmus_loss(out, target).item() == pytest.approx(expected, abs=1e-6)
    assert cmus_loss(out, target, (1.0, 0.0, 0.0, 0.0)).item() == pytest.approx(ce["logits"])


def test_overfits_three_colour_coded_classes():
    # class k: every image of the case (OM, IM, each TEM image) is dark grey noise with
    # colour channel k raised by 0.6; two cases per class, bags of 2 or 3 TEM images
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    px = 32
    y = torch.arange(3).repeat_interleave(2)
    om, im = (0.15 + 0.1 * torch.rand(6, 2, 3, px, px, generator=g)).unbind(1)
    tem = 0.15 + 0.1 * torch.rand(6, 3, 3, px, px, generator=g)
    for i, k in enumerate(y.tolist()):
        om[i, k] += 0.6
        im[i, k] += 0.6
        tem[i, :, k] += 0.6
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[::2, 2] = False
    tem[~mask] = 0
    model = CMUSNet(**TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        model.train()
        loss = cmus_loss(model(om, im, tem, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        out = model(om, im, tem, mask)
    assert (out["logits"].argmax(1) == y).all()
    assert losses[-1] < 0.5 * losses[0]


def test_checkpoint_round_trip(tmp_path):
    from wsi_pipeline.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = CMUSNet(**TINY).eval()
    meta = {"task": "glomerular-dx", "classes": list(model.class_names), "mpp": 0.5,
            "tile_px": 512}
    path = save_checkpoint(tmp_path / "cmus", model, meta, weights_dtype="float32")
    loaded, sidecar = load_checkpoint(path, task="glomerular-dx")
    assert sidecar["architecture"] == "cmus_net" and sidecar["classes"] == ["MN", "IgAN", "LN"]
    om, im, tem, mask = _case_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(om, im, tem, mask)["logits"],
                                   model(om, im, tem, mask)["logits"])
