"""RUPerNet: shapes, grid restoration, gradients, and parity with mmsegmentation's UPerHead."""
import sys
import types

import pytest
import torch
from torch.testing import assert_close

from rvit import vit_tiny
from rvit.masking import Selection, TokenMasker, restore_index
from rvit.upernet import (FCNHead, Feature2Pyramid, RUPerNet, UPerHead, restore_grid,
                          segmentation_loss)


def model(img_size=64, patch_size=16, fill="nearest", classes=4, aux=False):
    torch.manual_seed(0)
    bb = vit_tiny(num_classes=0, img_size=img_size, patch_size=patch_size)
    return RUPerNet(bb, classes, decoder_channels=32, fill=fill, aux=aux)


@pytest.mark.parametrize("img_size,patch_size", [(64, 16), (96, 16), (64, 8), (112, 16)])
@pytest.mark.parametrize("strategy", ["similarity", "dynamic"])
def test_output_has_the_input_size(img_size, patch_size, strategy):
    m = model(img_size, patch_size).train()
    masker = TokenMasker(strategy, 0.6, patch_size).train()
    out, _ = m(torch.randn(2, 3, img_size, img_size), select=masker)
    assert out.shape == (2, 4, img_size, img_size)


def test_each_fill_puts_its_feature_at_the_dropped_positions():
    """At mask 0.5 the kept positions of every map are the same for every fill; a dropped one
    holds zeros, the learned mask token, or the feature of its most similar kept patch."""
    x = torch.randn(2, 3, 64, 64)
    maps = {}
    for fill in ("nearest", "mask_token", "zeros"):
        m = model(fill=fill).eval()
        if fill == "mask_token":
            torch.nn.init.normal_(m.mask_token)
            mask_token = m.mask_token.detach()
        masker = TokenMasker("similarity", 0.5)
        with torch.no_grad():
            feats, keep = m.encode(x, masker)
            maps[fill] = [f.flatten(2) for f in feats]  # (B, D, N) per block
            z = m.backbone.patch_embed(x)
        ids = keep.ids_keep
    u = torch.nn.functional.normalize(z, dim=-1)
    for b in range(2):
        kept = ids[b].tolist()
        dropped = [n for n in range(16) if n not in kept]
        for i in range(4):
            assert_close(maps["zeros"][i][b][:, kept], maps["nearest"][i][b][:, kept])
            assert_close(maps["mask_token"][i][b][:, kept], maps["nearest"][i][b][:, kept])
            assert (maps["zeros"][i][b][:, dropped] == 0).all()
            token = mask_token[:, None].expand(-1, len(dropped))
            assert_close(maps["mask_token"][i][b][:, dropped], token)
            for n in dropped:
                j = kept[int((u[b, kept] @ u[b, n]).argmax())]
                assert torch.equal(maps["nearest"][i][b][:, n], maps["nearest"][i][b][:, j])


def test_nearest_fill_copies_the_most_similar_kept_patch():
    torch.manual_seed(0)
    z = torch.randn(2, 16, 8)
    ids = torch.tensor([[0, 3, 9, 12], [1, 2, 5, 15]])
    src = restore_index(Selection(ids), 16, z)
    kept = torch.randn(2, 4, 8)
    grid = restore_grid(kept, src)
    u = torch.nn.functional.normalize(z, dim=-1)
    for b in range(2):
        for n in range(16):
            if n in ids[b]:
                expect = (ids[b] == n).nonzero().item()  # its own slot
            else:
                expect = (u[b, ids[b]] @ u[b, n]).argmax().item()
            assert torch.equal(grid[b, n], kept[b, expect])


def test_mask_token_and_zeros_fill_dropped_positions_and_skip_padding():
    ids = torch.tensor([[2, 7, 0], [4, 1, 6]])
    valid = torch.tensor([[True, True, False], [True, True, True]])  # slot 2 of row 0 is padding
    src = restore_index(Selection(ids, valid), 8)
    kept = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    grid = restore_grid(kept, src, torch.full((2,), -1.0))
    assert torch.equal(grid[0, 0], torch.tensor([-1.0, -1.0]))  # padding points at 0: not kept
    assert torch.equal(grid[0, 2], kept[0, 0]) and torch.equal(grid[0, 7], kept[0, 1])
    assert torch.equal(grid[1, 6], kept[1, 2])
    assert (grid[1, [0, 2, 3, 5, 7]] == -1).all()


def test_gradients_reach_the_backbone_and_mask_token():
    m = model(fill="mask_token", aux=True).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    y[0, :8] = 255
    out, _ = m(x, select=TokenMasker("similarity", 0.5).train())
    assert isinstance(out, tuple)
    segmentation_loss(out, y, ignore_index=255).backward()
    assert m.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert m.mask_token.grad.abs().sum() > 0


def test_backbone_keeps_timm_keys_and_bad_arguments_fail():
    m = model()
    keys = [k[len("backbone."):] for k in m.state_dict() if k.startswith("backbone.")]
    assert keys == list(vit_tiny(num_classes=0, img_size=64).state_dict())
    with pytest.raises(ValueError, match="fill"):
        model(fill="copy")
    with pytest.raises(ValueError, match="out_indices"):
        RUPerNet(vit_tiny(num_classes=0), 4, out_indices=(3, 5, 12, 11))


def load_mmseg():
    """mmsegmentation as a test-only reference; its package imports mmcv's compiled ops, which
    mmcv-lite lacks and UPerHead never uses, so they are stubbed for the import alone."""
    pytest.importorskip("mmcv", reason="mmsegmentation (with mmcv-lite) is a test-only reference")
    try:
        import mmcv.ops  # noqa: F401
    except Exception:
        class Stub(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return type(name, (), {})
        sys.modules["mmcv.ops"] = Stub("mmcv.ops")
    return pytest.importorskip("mmseg.models", reason="mmsegmentation is a test-only reference")


def test_uperhead_neck_and_fcn_match_mmsegmentation():
    mm = load_mmseg()
    torch.manual_seed(0)
    D, ch, k = 48, 32, 5
    bn = dict(type="BN")
    ref_head = mm.decode_heads.UPerHead(in_channels=[D] * 4, in_index=[0, 1, 2, 3],
                                        channels=ch, num_classes=k, pool_scales=(1, 2, 3, 6),
                                        dropout_ratio=0.1, norm_cfg=bn, align_corners=False)
    ref_neck = mm.necks.Feature2Pyramid(D, rescales=[4, 2, 1, 0.5], norm_cfg=bn)
    ref_aux = mm.decode_heads.FCNHead(in_channels=D, in_index=2, channels=ch, num_convs=1,
                                      concat_input=False, dropout_ratio=0.1, num_classes=k,
                                      norm_cfg=bn)
    ours = [UPerHead([D] * 4, ch, k), Feature2Pyramid(D), FCNHead(D, ch, k)]
    for mine, ref in zip(ours, (ref_head, ref_neck, ref_aux)):
        for mod in ref.modules():  # non-trivial BN statistics, so eval mode is really compared
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
        ref_sd = {k2: v for k2, v in ref.state_dict().items() if not k2.startswith("loss")}
        mine.load_state_dict(ref_sd, strict=True)
        mine.eval()
        ref.eval()
    feats = [torch.randn(2, D, 8, 8) for _ in range(4)]
    with torch.no_grad():
        pyr_ref, pyr = ref_neck(feats), ours[1](feats)
        for a, b in zip(pyr, pyr_ref):
            assert_close(a, b)
        assert_close(ours[0](pyr), ref_head(list(pyr_ref)), rtol=1e-5, atol=1e-5)
        assert_close(ours[2](pyr[2]), ref_aux(list(pyr_ref)), rtol=1e-5, atol=1e-5)


def test_weight_decay_skips_positions_class_token_and_1d_parameters_of_both_models():
    from train import param_groups
    for m in (vit_tiny(num_classes=3, img_size=32), model(fill="mask_token")):
        decay, no_decay = param_groups(m, 0.05)
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
        skipped = {id(p) for p in no_decay["params"]}
        for name, p in m.named_parameters():
            token = name.split(".")[-1] in ("pos_embed", "cls_token")
            assert (id(p) in skipped) == (token or p.dim() < 2), name
