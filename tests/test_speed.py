"""Speed paths are correctness-tested here (their timings live in benchmarks/, not in tests)."""
import pytest
import torch
from torch.testing import assert_close

from conftest import run
from rvit import vit_tiny
from rvit.checkpoint import load_checkpoint
from rvit.data import H5Dataset
from rvit.masking import TokenMasker


def calibrated(model, m=0.6):
    masker = TokenMasker("dynamic", m, 16).train()
    for _ in range(5):
        model.embed(torch.randn(8, 3, 64, 64), masker)
    return masker.eval()


def padded_forward(model, x, masker):
    """The padded path written out: every block on (B, L, D) with the key mask."""
    tokens, key_mask, _, _ = model.embed(x, masker)
    for blk in model.blocks:
        tokens = blk(tokens, key_mask)
    return model.norm(tokens), key_mask


def test_packed_and_padded_attention_give_the_same_outputs():
    torch.manual_seed(0)
    model = vit_tiny(img_size=64, num_classes=7).eval()
    masker = calibrated(model)
    x = torch.cat([torch.randn(5, 3, 64, 64), torch.ones(1, 3, 64, 64)])  # one uniform image
    with torch.no_grad():
        packed = model.forward_features(x, masker)
        padded, key_mask = padded_forward(model, x, masker)
    assert key_mask is not None and not key_mask.all()  # the batch really is ragged
    assert_close(packed[key_mask], padded[key_mask], rtol=1e-5, atol=1e-5)
    assert (packed[~key_mask] == 0).all()


def test_packed_path_trains_like_the_padded_one():
    torch.manual_seed(0)
    model = vit_tiny(img_size=64, num_classes=3)
    masker = calibrated(model)
    x = torch.randn(4, 3, 64, 64)
    grads = []
    for forward in (lambda: model.forward_features(x, masker), lambda: padded_forward(
            model, x, masker)[0]):
        model.zero_grad()
        forward()[:, 0].square().sum().backward()
        grads.append(model.blocks[2].mlp.fc1.weight.grad.clone())
    assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device,dtype,tol", [("cpu", torch.float32, 1e-4),
                                              ("cuda", torch.bfloat16, 5e-2)])
def test_compiled_and_eager_outputs_agree(device, dtype, tol):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    model = vit_tiny(img_size=32, patch_size=8, num_classes=5).to(device).eval()
    masker = TokenMasker("similarity", 0.5, 8).to(device).eval()
    x = torch.randn(4, 3, 32, 32, device=device)
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        eager = model(x, select=masker).float()
        compiled = torch.compile(model)(x, select=masker).float()
    assert_close(compiled, eager, rtol=tol, atol=tol)


def test_train_compile_saves_plain_weights(ben_v1, tmp_path):
    run("train.py", "--dataset", "bigearthnet", "--data-dir", ben_v1, "--out", tmp_path,
        "--epochs", "1", "--batch-size", "2", "--img-size", "32", "--patch-size", "8",
        "--workers", "0", "--device", "cpu", "--mask", "0.5", "--compile")
    keys = list(load_checkpoint(str(tmp_path / "last.pt"))["model"])
    assert len(keys) == 152 and not any("_orig_mod" in k or "module." in k for k in keys)


def test_batched_and_preloaded_reads_equal_single_reads(ben_v1):
    lazy, pre = H5Dataset(str(ben_v1 / "train.h5")), H5Dataset(str(ben_v1 / "train.h5"),
                                                                preload=True)
    order = [4, 2, 3, 0, 6, 3]  # runs 2..4 and 6, a repeat, out of order
    for ds in (lazy, pre):
        batch = ds.__getitems__(order)
        assert [b[2] for b in batch] == order
        for (image, target, i) in batch:
            one = lazy[i]
            assert torch.equal(image, one[0]) and torch.equal(target, one[1])


def test_augment_moves_image_and_mask_together_through_the_8_symmetries():
    from rvit.data import augment
    torch.manual_seed(0)
    x = torch.randn(64, 2, 5, 5)
    mask = (x[:, 0] > 0).long()
    out, m = augment(x, mask)
    assert torch.equal(m, (out[:, 0] > 0).long())  # the mask follows its own image
    seen = set()
    for b in range(64):
        variants = [x[b].flip(dims) if dims else x[b] for dims in ((), (-1,), (-2,), (-1, -2))]
        variants += [v.transpose(-1, -2) for v in variants]
        hits = [i for i, v in enumerate(variants) if torch.equal(out[b], v)]
        assert hits, "not a symmetry of the input"
        seen.add(hits[0])
    assert len(seen) == 8
