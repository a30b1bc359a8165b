"""ViT: timm's state-dict contract, parity with timm's logits, and the pretrained loader."""
import numpy as np
import pytest
import torch
from torch.testing import assert_close

from rvit import vit_tiny
from rvit.checkpoint import adapt_input_conv, load_pretrained, resize_pos_embed
from rvit.masking import STRATEGIES, TokenMasker

D, HIDDEN, DEPTH = 192, 768, 12
# timm VisionTransformer('vit_tiny_patch16_224', num_classes=19): names and shapes
TIMM_TINY_KEYS = {
    "cls_token": (1, 1, D), "pos_embed": (1, 197, D),
    "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,),
    "norm.weight": (D,), "norm.bias": (D,), "head.weight": (19, D), "head.bias": (19,),
}
for _i in range(DEPTH):
    TIMM_TINY_KEYS.update({
        f"blocks.{_i}.norm1.weight": (D,), f"blocks.{_i}.norm1.bias": (D,),
        f"blocks.{_i}.attn.qkv.weight": (3 * D, D), f"blocks.{_i}.attn.qkv.bias": (3 * D,),
        f"blocks.{_i}.attn.proj.weight": (D, D), f"blocks.{_i}.attn.proj.bias": (D,),
        f"blocks.{_i}.norm2.weight": (D,), f"blocks.{_i}.norm2.bias": (D,),
        f"blocks.{_i}.mlp.fc1.weight": (HIDDEN, D), f"blocks.{_i}.mlp.fc1.bias": (HIDDEN,),
        f"blocks.{_i}.mlp.fc2.weight": (D, HIDDEN), f"blocks.{_i}.mlp.fc2.bias": (D,),
    })


def test_state_dict_matches_timm_names_and_shapes():
    sd = vit_tiny(num_classes=19).state_dict()
    assert len(sd) == 152
    assert {k: tuple(v.shape) for k, v in sd.items()} == TIMM_TINY_KEYS
    assert sum(v.numel() for v in sd.values()) == 5_528_083


def test_layernorm_eps_and_exact_gelu():
    m = vit_tiny(num_classes=0)
    assert m.norm.eps == 1e-6 and m.blocks[0].norm1.eps == 1e-6
    assert m.blocks[0].mlp.act.approximate == "none"


@pytest.mark.parametrize("kwargs", [dict(), dict(img_size=128, in_chans=12)])
def test_logits_match_timm(kwargs):
    timm = pytest.importorskip("timm", reason="timm is a test-only reference, not in CI")
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=19,
                            **kwargs).eval()
    ours = vit_tiny(num_classes=19, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, kwargs.get("in_chans", 3), kwargs.get("img_size", 224),
                    kwargs.get("img_size", 224))
    with torch.no_grad():
        assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_pos_embed_resize_matches_timm():
    pytest.importorskip("timm", reason="timm is a test-only reference, not in CI")
    from timm.layers import resample_abs_pos_embed
    pe = torch.randn(1, 197, D)
    assert_close(resize_pos_embed(pe, (8, 8)),
                 resample_abs_pos_embed(pe, (8, 8), num_prefix_tokens=1), rtol=1e-5, atol=1e-5)


def plain_forward(m, x):
    """The ViT written out with no masking code at all, for the mask-0 identity check."""
    t = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), m.patch_embed(x)], 1) + m.pos_embed
    for blk in m.blocks:
        t = t + blk.attn(blk.norm1(t))
        t = t + blk.mlp(blk.norm2(t))
    return m.head(m.norm(t)[:, 0])


def test_mask_zero_is_bit_identical_to_plain_vit():
    torch.manual_seed(0)
    m = vit_tiny(num_classes=5, img_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():  # at mask 0 no strategy is consulted: one is enough
        out, keep = m(x, select=TokenMasker("similarity", 0.0))
        assert keep is None and torch.equal(out, plain_forward(m, x))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_runs_the_blocks_on_exactly_the_tokens_it_keeps(strategy):
    """The masked forward equals the plain ViT written out on the kept tokens alone (each
    image on its own, so a ragged dynamic batch needs no padding here)."""
    torch.manual_seed(0)
    m = vit_tiny(num_classes=5, img_size=64).eval()
    x = torch.randn(4, 3, 64, 64)
    masker = TokenMasker(strategy, 0.5)
    with torch.no_grad():
        if strategy == "dynamic":  # calibrate the threshold on a few training batches
            for _ in range(3):
                m.embed(torch.randn(8, 3, 64, 64), masker.train())
        out, keep = m(x, select=masker.eval())
        ids, valid = keep.ids_keep, keep.valid
        assert ids.shape[1] < 16
        for b in range(4):
            kept = ids[b] if valid is None else ids[b][valid[b]]
            t = (m.patch_embed(x[b:b + 1]) + m.pos_embed[:, 1:])[:, kept]
            t = torch.cat([m.cls_token + m.pos_embed[:, :1], t], 1)
            for blk in m.blocks:
                t = t + blk.attn(blk.norm1(t))
                t = t + blk.mlp(blk.norm2(t))
            assert_close(out[b], m.head(m.norm(t)[:, 0])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_bf16_autocast_close_to_fp32_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    m = vit_tiny(num_classes=19).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    masker = TokenMasker("similarity", 0.6).cuda()
    with torch.no_grad():
        ref, _ = m(x, select=masker)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = m(x, select=masker)[0].float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_load_pretrained_adapts_bands_grid_and_head(tmp_path):
    torch.manual_seed(0)
    src = vit_tiny(num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save({"model": src.state_dict()}, path)  # DeiT-style wrapping
    dst = vit_tiny(num_classes=19, in_chans=12, img_size=128)
    head_before = dst.head.weight.clone()
    notes = load_pretrained(dst, str(path))
    assert any("12 bands" in n for n in notes) and any("head dropped" in n for n in notes)
    w = src.patch_embed.proj.weight
    assert_close(dst.patch_embed.proj.weight, w.repeat(1, 4, 1, 1) * (3 / 12))
    assert dst.pos_embed.shape == (1, 65, D)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # cls slot kept
    assert torch.equal(dst.head.weight, head_before)
    assert torch.equal(dst.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)


def test_adapt_input_conv_one_band_sums_rgb():
    w = torch.randn(4, 3, 2, 2)
    assert_close(adapt_input_conv(w, 1), w.sum(1, keepdim=True))


def test_resize_pos_embed_same_grid_is_identity_and_rejects_non_square():
    pe = torch.randn(1, 197, 8)
    assert_close(resize_pos_embed(pe, (14, 14)), pe)
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1, 11, 8), (4, 4))


def to_google_npz(sd, path, heads):
    """Write a timm state dict in Google's big_vision .npz layout (the format's own shapes)."""
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(DEPTH):
        b, o = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = b + "MultiHeadDotProductAttention_1/"
        q, k, v = sd[o + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[o + "attn.qkv.bias"].chunk(3)
        for n, wt, bs in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            w[att + n + "/kernel"] = wt.T.reshape(D, heads, D // heads)
            w[att + n + "/bias"] = bs.reshape(heads, D // heads)
        w[att + "out/kernel"] = sd[o + "attn.proj.weight"].T.reshape(heads, D // heads, D)
        w[att + "out/bias"] = sd[o + "attn.proj.bias"]
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[b + ln + "/scale"] = sd[o + name + ".weight"]
            w[b + ln + "/bias"] = sd[o + name + ".bias"]
        for j in (0, 1):
            w[b + f"MlpBlock_3/Dense_{j}/kernel"] = sd[o + f"mlp.fc{j + 1}.weight"].T
            w[b + f"MlpBlock_3/Dense_{j}/bias"] = sd[o + f"mlp.fc{j + 1}.bias"]
    np.savez(path, **{k: v.detach().numpy() for k, v in w.items()})


def test_load_google_npz(tmp_path):
    torch.manual_seed(1)
    src = vit_tiny(num_classes=19)
    to_google_npz(src.state_dict(), tmp_path / "vit.npz", heads=3)
    dst = vit_tiny(num_classes=19)
    assert load_pretrained(dst, str(tmp_path / "vit.npz")) == []
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close(dst(x), src(x))


def test_load_safetensors(tmp_path, monkeypatch):
    st = pytest.importorskip("safetensors.torch")
    src = vit_tiny(num_classes=19)
    st.save_file(src.state_dict(), str(tmp_path / "vit.safetensors"))
    dst = vit_tiny(num_classes=19)
    load_pretrained(dst, str(tmp_path / "vit.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(),
                                                 src.state_dict().values()))
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_pretrained(dst, str(tmp_path / "vit.safetensors"))


def test_load_pretrained_rejects_other_patch_size(tmp_path):
    torch.save(vit_tiny(patch_size=8, img_size=64).state_dict(), tmp_path / "p8.pth")
    with pytest.raises(ValueError, match="patch size"):
        load_pretrained(vit_tiny(), str(tmp_path / "p8.pth"))


def test_logits_match_a_fixture_made_with_timm():
    """timm parity without timm: outputs timm computed once (tests/data/timm/make_fixture.py)."""
    from pathlib import Path
    from rvit.vit import VisionTransformer
    fx = torch.load(Path(__file__).parent / "data" / "timm" / "vit_depth2.pt", weights_only=True)
    m = VisionTransformer(**fx["args"]).eval()
    m.load_state_dict(fx["state_dict"], strict=True)
    with torch.no_grad():
        assert_close(m.forward_features(fx["input"]), fx["features"], rtol=1e-5, atol=1e-5)
        assert_close(m(fx["input"]), fx["logits"], rtol=1e-5, atol=1e-5)
