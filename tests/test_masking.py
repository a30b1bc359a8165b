"""Token selection: rounding, per-sample choice, positions, scores, and each strategy's rules."""
import pytest
import torch
from torch.testing import assert_close

from rvit import vit_tiny
from rvit.masking import (TokenMasker, keep_below, keep_coverage, keep_lowest, num_keep,
                          pixel_patches, redundancy_score)


@pytest.mark.parametrize("n,m,k", [(196, 0.6, 78), (196, 0.75, 49), (196, 0.0, 196),
                                   (10, 0.25, 8), (10, 0.35, 7), (196, 0.999, 1), (1, 0.9, 1)])
def test_num_keep_rounds_half_up_and_keeps_one(n, m, k):
    assert num_keep(n, m) == k


@pytest.mark.parametrize("m", [1.0, -0.1, 1.5])
def test_num_keep_rejects_ratio_outside_unit_interval(m):
    with pytest.raises(ValueError, match="mask ratio"):
        num_keep(196, m)


def brute_force_scores(z):
    u = torch.nn.functional.normalize(z.double(), dim=-1)
    sim = u @ u.transpose(1, 2)
    n = z.shape[1]
    off = ~torch.eye(n, dtype=torch.bool)
    mean = (sim * off).sum(-1) / (n - 1)
    mx = sim.masked_fill(~off, -2).amax(-1)
    return mean, mx


def test_linear_score_equals_pairwise_mean_and_max():
    z = torch.randn(3, 50, 16)
    mean, mx = brute_force_scores(z)
    assert_close(redundancy_score(z, "mean").double(), mean, rtol=1e-5, atol=1e-5)
    assert_close(redundancy_score(z, "max").double(), mx, rtol=1e-5, atol=1e-5)


def test_keep_lowest_breaks_ties_by_index_and_sorts():
    score = torch.tensor([[0.5, 0.1, 0.5, 0.5, 0.1, 0.9]])
    assert keep_lowest(score, 3).tolist() == [[0, 1, 4]]
    assert keep_lowest(torch.zeros(1, 6), 2).tolist() == [[0, 1]]


def redundant_image(distinct=(0, 5, 10, 15), size=64, p=16, seed=0):
    """A 4 x 4 grid of patches: one texture repeated, random noise at the `distinct` patches."""
    g = torch.Generator().manual_seed(seed)
    tile = torch.rand(3, p, p, generator=g)
    img = tile.repeat(1, size // p, size // p)
    for i in distinct:
        r, c = divmod(i, size // p)
        img[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = torch.rand(3, p, p, generator=g) * 4 - 2
    return img


@pytest.mark.parametrize("space", ["embedding", "pixel"])
def test_identical_patches_are_dropped_first(space):
    torch.manual_seed(0)
    model = vit_tiny(img_size=64, num_classes=2)
    distinct = [[0, 5, 10, 15], [1, 2, 3, 12]]
    x = torch.stack([redundant_image(d, seed=i) for i, d in enumerate(distinct)])
    masker = TokenMasker("similarity", 0.75, 16, score_space=space).eval()  # K = 4 of 16
    _, keep, _ = model.embed(x, masker)
    assert keep.ids_keep.tolist() == distinct  # per sample: each keeps its own distinct patches


def test_class_token_kept_and_kept_tokens_keep_their_positions():
    torch.manual_seed(0)
    model = vit_tiny(img_size=64, num_classes=2)
    x = torch.randn(4, 3, 64, 64)
    tokens, keep, _ = model.embed(x, TokenMasker("similarity", 0.5).eval())
    ids = keep.ids_keep
    assert tokens.shape == (4, 1 + 8, 192) and keep.valid is None
    assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, 0]).expand(4, -1, -1)[:, 0])
    full = model.patch_embed(x) + model.pos_embed[:, 1:]
    for b in range(4):
        assert_close(tokens[b, 1:], full[b, ids[b]])


def test_selection_is_per_sample_and_independent_of_the_batch():
    torch.manual_seed(0)
    model = vit_tiny(img_size=64, num_classes=2)
    x = torch.randn(5, 3, 64, 64)
    masker = TokenMasker("similarity", 0.6).eval()
    together = model.embed(x, masker)[1].ids_keep
    alone = torch.cat([model.embed(x[i:i + 1], masker)[1].ids_keep for i in range(5)])
    assert torch.equal(together, alone)
    assert len({tuple(r) for r in together.tolist()}) > 1


def test_pixel_patches_follow_patch_embed_order():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    p = pixel_patches(x, 4)
    assert p.shape == (1, 4, 2 * 16)
    # patch 1 is the top-right 4 x 4 block; its first entry is band 0 at pixel (0, 4)
    xs = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
    assert_close(p[0, 1, 0], xs[0, 0, 0, 4])
    assert_close(p[0, 2, 16], xs[0, 1, 4, 0])


def calibrated_dynamic(model, m=0.6, batches=60, seed=0):
    torch.manual_seed(seed)
    masker = TokenMasker("dynamic", m, momentum=0.9).train()
    for _ in range(batches):
        model.embed(torch.randn(8, 3, 64, 64), masker)
    return masker.eval()


def test_dynamic_threshold_gives_about_the_asked_share_and_is_stored():
    torch.manual_seed(0)
    model = vit_tiny(img_size=64, num_classes=2)
    masker = calibrated_dynamic(model)
    assert "tau" in masker.state_dict() and torch.isfinite(masker.tau)
    num_kept = model.embed(torch.randn(64, 3, 64, 64), masker)[1].num_kept
    share = num_kept.float().mean() / 16
    assert abs(share - 0.4) < 0.1
    assert num_kept.min() >= 1 and num_kept.max() > num_kept.min()


def test_dynamic_keeps_fewer_tokens_of_a_uniform_scene():
    torch.manual_seed(0)
    model = vit_tiny(img_size=64, num_classes=2)
    masker = calibrated_dynamic(model)
    uniform = redundant_image(distinct=(3,))[None]
    keep = model.embed(uniform, masker)[1]
    assert keep.num_kept.item() == 1  # the one distinct patch; the floor is ceil(0.02 * 16) = 1


def test_dynamic_eval_does_not_depend_on_batch_composition():
    torch.manual_seed(0)
    model = vit_tiny(img_size=64, num_classes=3).eval()
    masker = calibrated_dynamic(model)
    x = torch.cat([torch.randn(3, 3, 64, 64), redundant_image()[None]])
    with torch.no_grad():
        batch, keep = model(x, select=masker)
        assert keep.num_kept.unique().numel() > 1  # really padded
        alone = torch.cat([model(x[i:i + 1], select=masker)[0] for i in range(4)])
    assert_close(batch, alone, rtol=1e-5, atol=1e-5)


def test_dynamic_eval_without_calibration_is_an_error():
    masker = TokenMasker("dynamic", 0.5).eval()
    with pytest.raises(RuntimeError, match="never calibrated"):
        masker(torch.randn(1, 16, 8), torch.randn(1, 3, 64, 64))


def test_keep_below_pads_and_floors():
    score = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.9, 0.9, 0.8, 0.95]])
    ids, valid = keep_below(score, 0.5, min_keep=1)
    assert ids[0].tolist() == [0, 2] and valid[0].tolist() == [True, True]
    assert ids[1, 0].item() == 2 and valid[1].tolist() == [True, False]


def test_random_eval_noise_is_seeded_by_sample_index():
    masker = TokenMasker("random", 0.5).eval()
    z, x = torch.randn(3, 16, 8), torch.randn(3, 3, 64, 64)
    a = masker(z, x, index=torch.tensor([7, 8, 9])).ids_keep
    b = masker(z[1:], x[1:], index=torch.tensor([8, 9])).ids_keep
    assert torch.equal(a[1:], b)
    masker.train()
    c = masker(z, x).ids_keep
    d = masker(z, x).ids_keep
    assert not torch.equal(c, d)


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="unknown strategy"):
        TokenMasker("smart", 0.5)


def three_regions(p=8, grid=10, seed=0):
    """(1, 3, grid * p, grid * p): 60 % of the patches one texture (a field), 30 % another
    (forest), 10 % a third (road), each patch its region's texture plus faint noise."""
    g = torch.Generator().manual_seed(seed)
    textures = torch.rand(3, 3, p, p, generator=g) * 4 - 2
    region = torch.zeros(grid * grid, dtype=torch.long)
    region[60:90], region[90:] = 1, 2
    region = region[torch.randperm(grid * grid, generator=g)]
    img = torch.empty(3, grid * p, grid * p)
    for i, r in enumerate(region.tolist()):
        row, col = divmod(i, grid)
        img[:, row * p:(row + 1) * p, col * p:(col + 1) * p] = \
            textures[r] + 0.05 * torch.randn(3, p, p, generator=g)
    return img[None], region


def test_coverage_keeps_every_region_where_similarity_drops_the_largest():
    x, region = three_regions()
    kept = {}
    for strategy in ("similarity", "coverage"):
        masker = TokenMasker(strategy, 0.9, 8, score_space="pixel").eval()  # K = 10 of 100
        ids = masker(torch.zeros(1, 100, 4), x).ids_keep
        assert ids.shape == (1, 10) and torch.equal(ids, ids.sort(dim=1).values)
        kept[strategy] = set(region[ids[0]].tolist())
    assert kept["coverage"] == {0, 1, 2}
    assert 0 not in kept["similarity"]  # the largest region is the most "redundant"


def brute_force_k_center(z, k):
    """Greedy k-center written out with the full N x N similarity matrix, for one image."""
    u = torch.nn.functional.normalize(z.double(), dim=-1)
    sim = u @ u.T
    n = len(u)
    kept = [int(((sim.sum(1) - 1) / (n - 1)).argmax())]
    while len(kept) < k:
        nearest = sim[:, kept].max(dim=1).values
        nearest[kept] = float("inf")
        kept.append(int(nearest.argmin()))
    return sorted(kept)


@pytest.mark.parametrize("k", [1, 2, 7, 30])
def test_keep_coverage_equals_the_brute_force_greedy_per_sample(k):
    z = torch.randn(4, 30, 12, generator=torch.Generator().manual_seed(k))
    ids = keep_coverage(z, k)
    assert ids.tolist() == [brute_force_k_center(z[b], k) for b in range(4)]


def test_coverage_with_each_fill_of_rupernet():
    from rvit.upernet import RUPerNet
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for fill in ("nearest", "mask_token", "zeros"):
        model = RUPerNet(vit_tiny(img_size=64, num_classes=0), 4, out_indices=(1, 3, 5, 7),
                         decoder_channels=16, fill=fill).eval()
        out, _ = model(x, select=TokenMasker("coverage", 0.75, 16).eval())
        assert out.shape == (2, 4, 64, 64) and torch.isfinite(out).all()
