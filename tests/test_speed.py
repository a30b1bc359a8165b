"""Speed paths are correctness-tested here (their timings live in benchmarks/, not in tests)."""
import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import run
from rvit import packing
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
    tokens, keep, _ = model.embed(x, masker)
    key_mask = torch.nn.functional.pad(keep.valid, (1, 0), value=True)  # class token is real
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


def reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k):
    """torch's varlen_attn contract written out: (T, heads, d) packed, one SDPA per sequence."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    assert max_q == max_k and max_q >= int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    assert int(cu_seq_q[-1]) == q.shape[0]
    out = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)))
           for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist())]
    return torch.cat([o.transpose(0, 1) for o in out])  # (T, heads, d)


def test_varlen_layout_gives_the_padded_outputs_and_gradients(monkeypatch):
    """The CUDA path's packing (cu_seqlens, head layout), run here with a reference kernel."""
    torch.manual_seed(0)
    model = vit_tiny(img_size=64, num_classes=3)
    masker = calibrated(model)
    # float64: this gradient is ill-conditioned enough that fp32 roundings differ by ~1 %
    model.double()
    x = torch.cat([torch.randn(3, 3, 64, 64), torch.ones(1, 3, 64, 64)]).double()
    results = []
    for varlen in (False, True):
        if varlen:
            monkeypatch.setattr(packing, "load_varlen", lambda: reference_varlen_attn)
            monkeypatch.setattr(packing, "use_varlen", lambda t: True)
        model.zero_grad()
        out = model.forward_features(x, masker)
        out[:, 0].square().sum().backward()
        results.append((out.detach(), model.blocks[2].attn.qkv.weight.grad.clone()))
    assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    assert_close(results[1][1], results[0][1], rtol=1e-8, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or packing.load_varlen() is None,
                    reason="needs a CUDA GPU and torch.nn.attention.varlen")
def test_cuda_varlen_attention_matches_padded_attention():
    if not packing.use_varlen(torch.zeros(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("varlen_attn (FlashAttention) needs an Ampere or newer GPU")
    torch.manual_seed(0)
    model = vit_tiny(img_size=64, num_classes=3).eval()
    masker = calibrated(model).cuda()
    model.cuda()
    x = torch.cat([torch.randn(7, 3, 64, 64), torch.ones(1, 3, 64, 64)]).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model.forward_features(x, masker).float()  # varlen_attn
        padded, key_mask = padded_forward(model, x, masker)
    assert not key_mask.all()
    assert_close(packed[key_mask], padded.float()[key_mask], rtol=5e-2, atol=5e-2)


def test_segmentation_encoder_runs_packed_like_the_classifier():
    """RUPerNet's last tapped map at kept positions = the ViT's own packed tokens."""
    from rvit.upernet import RUPerNet
    torch.manual_seed(0)
    model = RUPerNet(vit_tiny(img_size=64, num_classes=0), 4).eval()
    masker = calibrated(model.backbone)
    x = torch.cat([torch.randn(3, 3, 64, 64), torch.ones(1, 3, 64, 64)])
    with torch.no_grad():
        grid = model.encode(x, masker)[0][-1].flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = model.backbone.forward_features(x, masker)
        keep = masker(model.backbone.patch_embed(x), x)
        ids, valid = keep.ids_keep, keep.valid
    assert valid is not None and not valid.all()
    for b in range(x.shape[0]):
        kept = ids[b][valid[b]]
        assert_close(grid[b, kept], tokens[b, 1:1 + len(kept)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,dtype,tol", [
    ("cpu", torch.float32, 1e-4),
    pytest.param("cuda", torch.bfloat16, 5e-2, marks=pytest.mark.cuda)])
def test_compiled_and_eager_outputs_agree(device, dtype, tol):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    model = vit_tiny(img_size=32, patch_size=8, num_classes=5).to(device).eval()
    masker = TokenMasker("similarity", 0.5, 8).to(device).eval()
    x = torch.randn(4, 3, 32, 32, device=device)
    compiled, select = torch.compile(model), torch.compiler.disable(masker)  # as train.py
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        for m in (0.5, 0.3, 0.7):  # a ratio per step, as --mask-range sets it
            masker.mask_ratio = m
            eager, keep = model(x, select=masker)
            out, compiled_keep = compiled(x, select=select)
            assert_close(out.float(), eager.float(), rtol=tol, atol=tol)
            assert torch.equal(compiled_keep.ids_keep, keep.ids_keep)


def test_train_compile_saves_plain_weights(ben_v1, tmp_path):
    run("train.py", "--dataset", "bigearthnet", "--data-dir", ben_v1, "--out", tmp_path,
        "--epochs", "1", "--batch-size", "2", "--img-size", "32", "--patch-size", "8",
        "--workers", "0", "--device", "cpu", "--mask", "0.5", "--compile")
    keys = list(load_checkpoint(str(tmp_path / "last.pt"))["model"])
    assert len(keys) == 152 and not any("_orig_mod" in k or "module." in k for k in keys)


def test_batched_and_preloaded_reads_equal_single_reads(ben_v1):
    lazy, pre = H5Dataset(str(ben_v1 / "train.h5")), H5Dataset(str(ben_v1 / "train.h5"),
                                                                preload=True)
    with h5py.File(ben_v1 / "train.h5") as f:
        images, labels = f["images"][:], f["labels"][:]
    order = [4, 2, 3, 0, 6, 3]  # runs 2..4 and 6, a repeat, out of order
    for ds in (lazy, pre):
        x, y, index = ds.__getitems__(order)
        assert index.tolist() == order and x.dtype == torch.uint16
        assert np.array_equal(x.numpy(), images[order])
        assert np.array_equal(y.numpy(), labels[order])


def test_batch_reads_of_other_layouts_fall_back_to_read_direct(tmp_path):
    """Compressed, differently chunked or big-endian files read the same through read_direct."""
    from rvit.h5_writer import SplitWriter
    rng = np.random.default_rng(0)
    images = rng.integers(0, 2**16, (5, 2, 6, 6), dtype=np.uint16)
    labels = rng.integers(0, 2, (5, 3), dtype=np.uint8)
    w = SplitWriter(str(tmp_path / "plain.h5"), "labels")
    for i in range(5):
        w.append(images[i], labels[i], f"s{i}")
    w.finish({"dataset": "toy", "task": "multilabel", "bands": ["a", "b"], "classes": list("xyz"),
              "mean": [0, 0], "std": [1, 1], "source": "test"}, (2, 6, 6), np.uint16, (3,))
    for name, kw in (("gzip", {"compression": "gzip", "chunks": (1, 2, 6, 6)}),
                     ("chunk2", {"chunks": (2, 2, 6, 6)}), ("be", {"dtype": ">u2"})):
        with h5py.File(tmp_path / "plain.h5") as src, h5py.File(tmp_path / f"{name}.h5", "w") as f:
            for k, v in src.attrs.items():
                f.attrs[k] = v
            f.create_dataset("labels", data=labels)  # contiguous: no chunks at all
            f.create_dataset("names", data=src["names"][:])
            f.create_dataset("images", data=images.astype(kw.pop("dtype", "<u2")), **kw)
    for name in ("plain", "gzip", "chunk2", "be"):
        ds = H5Dataset(str(tmp_path / f"{name}.h5"))
        ds._datasets()
        assert ds._raw == ([True, True] if name == "plain" else [False, False]), name
        x, y, _ = ds.__getitems__([3, 1, 4])
        assert np.array_equal(x.numpy().astype(np.uint16), images[[3, 1, 4]]), name
        assert np.array_equal(y.numpy(), labels[[3, 1, 4]]), name


def test_worker_batches_arrive_in_shared_memory_in_the_sampler_order(ben_v1):
    from rvit.data import train_loader
    ds = H5Dataset(str(ben_v1 / "train.h5"))
    orders = []
    for workers in (0, 2):
        loader = train_loader(ds, 3, workers, seed=5, device=torch.device("cpu"))
        loader.sampler.set_epoch(1)
        batches = list(loader)
        orders.append([i for _, _, idx in batches for i in idx.tolist()])
        assert orders[-1] == list(loader.sampler)[:len(orders[-1])]
        for x, y, idx in batches:
            assert torch.equal(x, lazy_read(ds, idx)) and x.is_shared() == (workers > 0)
    assert orders[0] == orders[1] and len(orders[0]) == 6  # 7 samples, batch 3, tail dropped


def lazy_read(ds, idx):
    return torch.stack([ds[i][0] for i in idx.tolist()])


def symmetries(image):
    """The 8 symmetries of a square (C, S, S) image: 4 flips, each also transposed."""
    flips = [image.flip(dims) if dims else image for dims in ((), (-1,), (-2,), (-1, -2))]
    return flips + [v.transpose(-1, -2) for v in flips]


def test_augment_moves_image_and_mask_together_through_the_8_symmetries():
    from rvit.data import augment
    torch.manual_seed(0)
    x = torch.randn(64, 2, 5, 5)
    mask = (x[:, 0] > 0).long()
    out, m = augment(x, mask)
    assert torch.equal(m, (out[:, 0] > 0).long())  # the mask follows its own image
    seen = set()
    for b in range(64):
        hits = [i for i, v in enumerate(symmetries(x[b])) if torch.equal(out[b], v)]
        assert hits, "not a symmetry of the input"
        seen.add(hits[0])
    assert len(seen) == 8


def test_classification_augments_before_the_resize_to_the_same_images():
    """Augmenting at the native size (cheaper) gives a symmetry of the resized image."""
    from rvit.data import DeviceTransform
    torch.manual_seed(0)
    images = torch.randint(0, 10000, (16, 4, 12, 12), dtype=torch.int32)
    labels = torch.zeros(16, 3, dtype=torch.uint8)
    tf = DeviceTransform([5000.0] * 4, [2000.0] * 4, 20, torch.device("cpu"))
    plain, _ = tf(images, labels)
    out, _ = tf(images, labels, train=True)
    seen = set()
    for b in range(16):
        hits = [i for i, v in enumerate(symmetries(plain[b]))
                if torch.allclose(out[b], v, atol=1e-4)]
        assert hits, f"sample {b} is not a symmetry of its resized image"
        seen.add(hits[0])
    assert len(seen) > 1  # it did augment


def test_throughput_benchmark_runs_and_prints_its_table():
    """The benchmark's plumbing (tiny sizes); its figures are read, never asserted."""
    out = run("-m", "benchmarks.throughput", "--batch-size", "2", "--img-size", "32",
              "--steps", "1", "--warmup", "1", "--masks", "0,0.5", "--strategies",
              "dynamic", "--mode", "train").stdout
    rows = [line for line in out.splitlines() if line.startswith("| train | rvit |")]
    assert len(rows) == 2 and "| dynamic | 0.5 |" in rows[-1]
    assert out.splitlines()[-1] == rows[-1]  # the table comes last


def test_loader_benchmark_runs_on_a_real_split(ben_v1):
    out = run("-m", "benchmarks.loader", "--data-dir", ben_v1, "--workers", "0",
              "--batch-size", "2", "--batches", "2", "--img-size", "32").stdout
    assert "| loader, 0 workers |" in out and "| end-to-end / on-device |" in out


@pytest.mark.parametrize("script", ["throughput", "loader"])
def test_benchmarks_run_as_scripts_too(script):
    out = run(os.path.join("benchmarks", f"{script}.py"), "--help").stdout
    assert out.startswith("usage:") and "--batch-size" in out


def test_recycled_batch_memory_is_never_memory_a_caller_still_holds(ben_v1):
    ds = H5Dataset(str(ben_v1 / "train.h5"))
    first = ds.__getitems__([0, 1])[0]
    address, kept, want = first.data_ptr(), first[1], first[1].clone()  # a view outlives it
    del first
    for start in range(2, 6):  # more batches of the same shape than the recycler holds
        ds.__getitems__([start, start + 1])
    assert torch.equal(kept, want)
    del kept
    assert ds.__getitems__([4, 5])[0].data_ptr() == address  # released: recycled


def test_worker_ring_reuses_released_slots_and_never_held_ones(ben_v1):
    from rvit.data import train_loader
    ds = H5Dataset(str(ben_v1 / "train.h5"))
    with h5py.File(ben_v1 / "train.h5") as f:
        images = f["images"][:]
    loader = train_loader(ds, 1, 1, seed=2, device=torch.device("cpu"))
    ring = loader.dataset.buffers.ring
    for epoch in range(3):  # consumed and dropped at once: slots go round
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            assert np.array_equal(batch[0].numpy(), images[batch[2].numpy()])
        del batch
    assert ring.busy.sum() == 0  # every batch released
    loader.sampler.set_epoch(3)
    held = list(loader)  # 7 batches kept: more than the ring's 4 slots
    assert all(np.array_equal(x.numpy(), images[idx.numpy()]) for x, _, idx in held)
    assert ring.busy[..., 0].all()  # every image slot held; the rest came from fresh memory
    del held
    assert ring.busy.sum() == 0
