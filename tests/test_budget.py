"""One model for every token budget: k-medoids selection, token merging, proportional
attention and mixed-ratio training."""
import json

import pytest
import torch
from torch.testing import assert_close

from rvit import vit_tiny
from rvit.masking import Selection, TokenMasker, keep_kmedoids, merge_tokens, restore_index


def objective(d, kept):
    """Sum over patches of the squared distance to their nearest kept patch."""
    return d[:, kept].min(1).sum()


@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_keep_kmedoids_is_the_greedy_build_step_by_step(k):
    """Each step keeps what it kept before plus the patch that lowers the objective most: the
    objective after every step equals the best a brute force over all candidates finds (equal
    objectives can tie between candidates, so objectives are compared, not indices)."""
    z = torch.randn(3, 24, 10, generator=torch.Generator().manual_seed(k))
    d = ((z[:, :, None].double() - z[:, None].double()) ** 2).sum(-1).numpy()  # (B, N, N)
    before = [[] for _ in range(3)]
    for t in range(1, k + 1):  # greedy: the first t of k are what k = t keeps
        ids = keep_kmedoids(z, t).tolist()
        for b in range(3):
            assert set(before[b]) < set(ids[b]) and len(ids[b]) == t
            best = min(objective(d[b], before[b] + [c]) for c in range(24) if c not in before[b])
            assert objective(d[b], ids[b]) == pytest.approx(best, rel=1e-6)
        before = ids


def test_kmedoids_is_a_strategy_of_the_masker_and_deterministic():
    z = torch.randn(2, 16, 8)
    masker = TokenMasker("kmedoids", 0.75, 16).eval()
    first = masker(z, None).ids_keep
    assert first.shape == (2, 4) and torch.equal(first, masker(z, None).ids_keep)
    assert torch.equal(first, keep_kmedoids(z, 4))


def test_merge_averages_each_kept_token_with_the_tokens_merged_into_it():
    torch.manual_seed(0)
    tokens, z = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    keep = Selection(torch.tensor([[0, 3, 9, 12], [1, 2, 5, 15]]))
    keep = keep._replace(src=restore_index(keep, 16, z))
    merged = merge_tokens(tokens, keep)
    u = torch.nn.functional.normalize(z, dim=-1)
    for b in range(2):
        ids = keep.ids_keep[b].tolist()
        group = {j: [j] for j in ids}
        for n in range(16):
            if n not in ids:  # its most cosine-similar kept patch
                group[ids[int((u[b, ids] @ u[b, n]).argmax())]].append(n)
        for slot, j in enumerate(ids):
            assert_close(merged[b, slot], tokens[b, group[j]].mean(0))
        assert keep.sizes()[b].tolist() == [len(group[j]) for j in ids]


def test_merging_nothing_with_proportional_attention_is_the_plain_vit():
    """Every patch kept, each its own group (size 1, log-size bias 0): the merge and the float
    attention mask run and must leave the plain ViT's output; at mask 0 (no selection at all)
    the masker with merging is the plain ViT bit for bit."""
    torch.manual_seed(0)
    m = vit_tiny(num_classes=3, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    ids = torch.arange(16).expand(2, 16)
    every = Selection(ids, src=ids, prop_attn=True)
    with torch.no_grad():
        plain = m(x)
        assert_close(m(x, select=lambda z, x_: every)[0], plain, rtol=1e-5, atol=1e-5)
        merging = TokenMasker("kmedoids", 0.0, merge=True, prop_attn=True)
        out, keep = m(x, select=merging)
        assert keep is None and torch.equal(out, plain)


def duplicated_image(kinds=(0, 1, 2), p=16, grid=4, seed=0):
    """Patches that are exact copies of a few textures: 2 x 2 blocks of one texture each."""
    g = torch.Generator().manual_seed(seed)
    textures = torch.randn(len(kinds) + 1, 3, p, p, generator=g)
    img = torch.empty(3, grid * p, grid * p)
    for i in range(grid * grid):
        r, c = divmod(i, grid)
        kind = (r // 2) * 2 + c // 2  # four 2 x 2 blocks
        img[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = textures[kind]
    return img[None]


@pytest.mark.parametrize("strategy", ["kmedoids", "coverage"])
def test_proportional_attention_on_merged_copies_equals_attention_over_all_copies(strategy):
    """ToMe's property: a token merged from s identical tokens, with log(s) added to its logits,
    is attended to exactly as the s copies were. With positions zeroed, copies stay identical
    through every block, so the merged ViT's output equals the full one's; without
    proportional attention it does not."""
    torch.manual_seed(0)
    m = vit_tiny(num_classes=3, img_size=64).eval()
    with torch.no_grad():
        m.pos_embed.zero_()
        x = duplicated_image()
        full = m(x)
        masker = TokenMasker(strategy, 0.75, merge=True, prop_attn=True)  # K = 4 kinds of 4
        out, keep = m(x, select=masker)
        assert_close(out, full, rtol=1e-4, atol=1e-5)
        assert sorted(keep.sizes()[0].tolist()) == [4, 4, 4, 4]
        no_prop, _ = m(x, select=TokenMasker(strategy, 0.75, merge=True))
        assert not torch.allclose(no_prop, full, rtol=1e-4, atol=1e-5)


def test_merged_ragged_batch_runs_packed_like_each_image_alone():
    torch.manual_seed(0)
    m = vit_tiny(num_classes=3, img_size=64).eval()
    masker = TokenMasker("dynamic", 0.6, 16, momentum=0.5, merge=True, prop_attn=True)
    with torch.no_grad():
        for _ in range(5):
            m.embed(torch.randn(8, 3, 64, 64), masker.train())
        masker.eval()
        x = torch.cat([torch.randn(3, 3, 64, 64), duplicated_image()])
        batch, keep = m(x, select=masker)
        assert keep.valid is not None and not keep.valid.all()  # really ragged
        alone = torch.cat([m(x[i:i + 1], select=masker)[0] for i in range(4)])
    assert_close(batch, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fill", ["nearest", "zeros"])
def test_rupernet_restores_merged_tokens_through_the_merge_assignment(fill):
    from rvit.upernet import RUPerNet
    torch.manual_seed(0)
    model = RUPerNet(vit_tiny(img_size=64, num_classes=0), 4, out_indices=(1, 3, 5, 11),
                     decoder_channels=16, fill=fill).eval()
    x = torch.randn(2, 3, 64, 64)
    masker = TokenMasker("random", 0.5, merge=True)
    with torch.no_grad():
        feats, keep = model.encode(x, masker)
        maps = [f.flatten(2) for f in feats]  # (B, D, N)
    src, ids = keep.src, keep.ids_keep
    for f in maps:
        for b in range(2):
            for n in range(16):  # every position holds the token it was merged into
                assert torch.equal(f[b, :, n], f[b, :, ids[b, src[b, n]]])


def test_merged_fill_error_is_each_patch_against_its_group_mean_and_never_above_unmerged(
        ben_v1):
    """With merging every patch is represented by the mean of its group, which minimises the
    group's squared error: the error can only fall, for every rule and image."""
    import h5py
    from rvit.masking import num_keep, pixel_patches, select
    from rvit.redundancy import fill_error
    with h5py.File(ben_v1 / "train.h5") as f:
        x = torch.from_numpy(f["images"][:].astype("float32"))
    feats = pixel_patches(x, 8)  # (7, 225, 768) standardised pixels
    for strategy in ("similarity", "kmedoids", "random"):
        keep = select(strategy, feats, 0.75, noise=torch.rand(7, 225))
        merged, plain = fill_error(feats, keep, merge=True), fill_error(feats, keep)
        assert (merged <= plain + 1e-6).all() and (merged < plain).any()
    src = restore_index(keep, 225, feats)
    b = 0
    want = sum(((feats[b, src[b] == j] - feats[b, src[b] == j].mean(0)) ** 2).sum()
               for j in range(num_keep(225, 0.75)))
    assert merged[b].item() == pytest.approx((want / (feats[b] ** 2).sum()).item(), rel=1e-4)


def test_mask_ratio_per_step_depends_on_seed_and_step_only():
    from rvit.engine import mask_ratio_at
    draws = [mask_ratio_at(step, (0.0, 0.9), 3) for step in range(200)]
    assert draws == [mask_ratio_at(step, (0.0, 0.9), 3) for step in range(200)]
    assert 0.0 <= min(draws) < 0.1 and 0.8 < max(draws) < 0.9
    assert draws != [mask_ratio_at(step, (0.0, 0.9), 4) for step in range(200)]


class StopAfterCall:
    """Stands in for rvit.preemption.Preemption in train.py: `requested()` reports a SIGTERM
    from its `calls`-th call on (in one process, one call after each batch but an epoch's last,
    and one after each epoch but the last), and installs no signal handler."""
    calls = 0

    def __init__(self, signals):
        self.asked, self.name = 0, "SIGTERM"

    def requested(self):
        self.asked += 1
        return 0 < self.calls <= self.asked


def test_mixed_ratio_training_resumes_exactly_and_evaluates_at_any_ratio(ben_v1, tmp_path,
                                                                         monkeypatch):
    """A run preempted inside an epoch under --mask-range and resumed with the same flags ends
    with the weights of an uninterrupted one: the step count, and with it each step's ratio,
    carries over. train.main runs in this process, so the stop falls at a known batch."""
    import train
    from conftest import CPU, run
    from rvit.checkpoint import load_checkpoint
    from rvit.config import train_parser
    from rvit.preemption import EXIT_PREEMPTED
    monkeypatch.setattr(train, "Preemption", StopAfterCall)
    flags = ["--dataset", "bigearthnet", "--data-dir", ben_v1, "--img-size", "32",
             "--patch-size", "8", "--batch-size", "2", "--strategy", "kmedoids", "--merge",
             "--mask-range", "0", "0.9", "--seed", "2", "--epochs", "2", *CPU]

    def train_to(out, *extra):
        train.main(train_parser().parse_args([*map(str, flags), "--out", str(out), *extra]))

    train_to(tmp_path / "straight")
    # 7 samples, batch 2: 3 steps an epoch; calls 1, 2 after epoch 1's first two batches, 3
    # after epoch 1, 4 after epoch 2's first batch: the stop
    monkeypatch.setattr(StopAfterCall, "calls", 4)
    with pytest.raises(SystemExit) as stopped:
        train_to(tmp_path / "resumed")
    assert stopped.value.code == EXIT_PREEMPTED
    at = load_checkpoint(str(tmp_path / "resumed" / "last.pt"))
    assert (at["epoch"], at["step_in_epoch"], at["global_step"]) == (1, 1, 4)
    monkeypatch.setattr(StopAfterCall, "calls", 0)
    train_to(tmp_path / "resumed", "--resume")
    a = load_checkpoint(str(tmp_path / "straight" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "resumed" / "last.pt"))
    assert a["config"]["mask_range"] == [0.0, 0.9] and a["config"]["merge"]
    assert a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len((tmp_path / "straight" / "log.jsonl").read_text().splitlines()) == 2
    events = [json.loads(line) for line in open(tmp_path / "resumed" / "log.jsonl")]
    assert [e.get("event", e["epoch"]) for e in events] == [1, "preempted", "resume", 2]
    run("evaluate.py", "--checkpoint", tmp_path / "straight" / "last.pt", "--data-dir", ben_v1,
        "--mask", "0,0.5,0.9", "--out", tmp_path / "sweep.json", *CPU)
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["train_mask_range"] for r in rows] == [[0.0, 0.9]] * 3
    assert [r["strategy"] for r in rows] == ["kmedoids"] * 3 and all(r["merge"] for r in rows)
    assert rows[0]["kept_share"] == 1.0 and rows[2]["kept_share"] < 0.2


@pytest.mark.parametrize("flags,message", [
    (["--strategy", "dynamic", "--mask-range", "0", "0.9"], "--mask-range with --strategy"),
    (["--mask-range", "0.5", "0.5"], "need 0 <= LO < HI < 1"),
    (["--prop-attn"], "needs --merge"),
    (["--seed", "-1", "--mask-range", "0", "0.9", "--img-size", "32", "--patch-size", "8",
      "--batch-size", "2", "--epochs", "1"], "--seed must be non-negative, got -1"),
])
def test_budget_flag_errors_are_one_line(ben_v1, tmp_path, flags, message):
    from conftest import CPU, run
    proc = run("train.py", "--dataset", "bigearthnet", "--data-dir", ben_v1, "--out", tmp_path,
               *flags, *CPU, check=False)
    assert proc.returncode == 1 and message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
