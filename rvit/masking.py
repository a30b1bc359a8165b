"""Redundancy-aware token selection: which patch tokens of each image a ViT keeps, and where
each dropped one goes when it is merged (or, in RUPerNet, filled back onto the grid).

After "Hide and Seek: Investigating Redundancy in Earth Observation Imagery" (Papazafeiropoulos
et al., arXiv 2603.13524). The paper's exact selection rules are not public; the rules below are
RViT's own. Per-sample selection by argsort then `gather` follows MAE (He et al. 2022); cosine
similarity as a normalised dot product under `no_grad` follows ToMe (Bolya et al. 2023).

Notation: N patch tokens z_i (the output of `patch_embed`, before `pos_embed`), mask ratio m,
K = max(1, round((1 - m) * N)) kept tokens, rounding half up. The class token is never scored and
always kept (the ViT prepends it after selection).

Redundancy score r_i of patch i: its mean cosine similarity to every other patch of the same image,
r_i = (u_i . s - 1) / (N - 1) with u_i = z_i / |z_i| and s = sum_j u_j: O(N D), no N x N matrix.
A patch like all the others (sea, forest) scores near 1 and is dropped first.

Strategies:
    similarity: keep the K patches with the lowest r_i (ties by index), at training and evaluation.
    dynamic: keep patch i iff r_i < tau, and at least max(1, ceil(0.02 N)) patches. tau tracks the
        (1 - m)-quantile of r over training batches as an EMA (momentum 0.99) and is frozen at
        evaluation, so the mean kept share is about 1 - m while uniform scenes keep fewer tokens.
        Variable K is padded to the batch's largest K, with `valid` marking real tokens.
    random: uniform per sample; at evaluation the noise of sample i comes from a generator seeded
        with i, so scores are repeatable.
    coverage: greedy k-center (farthest-point) selection on the cosine distance 1 - u_i . u_j:
        keep the most typical patch (highest r_i), then K - 1 times the patch least similar to
        every patch kept so far. Every region of a scene keeps a token, however large or small
        it is, so a dropped patch always has a similar kept one (what RUPerNet's `nearest` fill
        relies on). O(K N D) per image, one (B, N) update per step, no N x N matrix. RViT's own
        rule, not the study's.
    kmedoids: greedy k-medoids (PAM's BUILD step) on squared Euclidean distance in the score
        space: keep the medoid, then K - 1 times the patch that most lowers the summed distance
        of all patches to their nearest kept patch. It targets what a dropped patch loses (the
        fill error of rvit/redundancy.py), where coverage targets the worst case. O(K N^2).

Merging (`merge=True`, any strategy): instead of discarding the dropped tokens, each is averaged
(with its positional embedding) into the kept token it is most cosine-similar to, weighted by
size, as ToMe does (Bolya et al. 2023); the assignment is RUPerNet's `nearest` fill's. With
`prop_attn`, log(size) is added to the attention logits of each merged key (ToMe's
proportional attention), so a token that stands for many patches weighs as much as they would.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

STRATEGIES = ("similarity", "dynamic", "random", "coverage", "kmedoids")
SCORE_SPACES = ("embedding", "pixel")
SCORE_REDUCES = ("mean", "max")


def num_keep(num_patches: int, mask_ratio: float) -> int:
    """K = max(1, round((1 - m) * N)), rounding half up. Raises ValueError unless 0 <= m < 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    return max(1, math.floor((1.0 - mask_ratio) * num_patches + 0.5))


@torch.no_grad()
def redundancy_score(z, reduce: str = "mean"):
    """Per-patch redundancy: cosine similarity to the other patches of the same image.

    Args:
        z: (B, N, F) patch features (embeddings, or flattened pixels), any float dtype.
        reduce: "mean" (mean similarity to every other patch, O(N F)) or "max" (highest
            similarity to any other patch, O(N^2 F)).

    Returns:
        (B, N) float32 scores in [-1, 1]; zeros when N == 1.
    """
    B, N, _ = z.shape
    if N == 1:
        return z.new_zeros(B, 1, dtype=torch.float32)
    u = F.normalize(z.float(), dim=-1)
    if reduce == "mean":
        s = u.sum(dim=1, keepdim=True)  # (B, 1, F)
        return ((u * s).sum(-1) - 1.0) / (N - 1)
    if reduce == "max":
        sim = u @ u.transpose(1, 2)  # (B, N, N)
        sim.diagonal(dim1=1, dim2=2).fill_(-float("inf"))
        return sim.amax(dim=-1)
    raise ValueError(f"unknown score reduce {reduce!r}; choose from {SCORE_REDUCES}")


@torch.no_grad()
def pixel_patches(x, patch_size: int):
    """Flattened patches of a per-image, per-band standardised image, for pixel-space scores.

    Args:
        x: (B, C, H, W) float image, H and W multiples of `patch_size`.

    Returns:
        (B, N, C * p * p) float32, patches in the row-major order of `PatchEmbed`.
    """
    x = x.float()
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    B, C, H, W = x.shape
    p = patch_size
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


@torch.no_grad()
def keep_lowest(score, k: int):
    """Indices of the k lowest scores per row, ties broken by index, sorted ascending.

    score: (B, N) float. Returns (B, k) int64.
    """
    order = torch.argsort(score, dim=1, stable=True)
    return order[:, :k].sort(dim=1).values


@torch.no_grad()
def keep_coverage(z, k: int):
    """Greedy k-center (farthest-point) selection on cosine distance, per sample (the module
    docstring's `coverage`; Gonzalez's 1985 greedy 2-approximation), ties by index.

    Args:
        z: (B, N, F) patch features (embeddings, or flattened standardised pixels), any float.
        k: patches to keep, 1 <= k <= N.

    Returns:
        (B, k) int64 kept indices, ascending.
    """
    B, N, _ = z.shape
    u = F.normalize(z.float(), dim=-1)
    rows = torch.arange(B, device=z.device)
    ids = torch.empty(B, k, dtype=torch.long, device=z.device)
    ids[:, 0] = redundancy_score(u).argmax(dim=1)
    # nearest[b, i]: highest similarity of patch i to a kept patch; kept patches are set to +inf
    # so they are never chosen again
    nearest = torch.full((B, N), -float("inf"), device=z.device)
    for t in range(k):
        if t > 0:
            ids[:, t] = nearest.argmin(dim=1)
        new = u[rows, ids[:, t]]  # (B, F)
        nearest = torch.maximum(nearest, (u @ new[:, :, None])[..., 0])
        nearest[rows, ids[:, t]] = float("inf")
    return ids.sort(dim=1).values


@torch.no_grad()
def keep_kmedoids(z, k: int):
    """Greedy k-medoids (the BUILD step of PAM, Kaufman & Rousseeuw 1990) on squared Euclidean
    distance, per sample (the module docstring's `kmedoids`), ties by index.

    Args:
        z: (B, N, F) patch features (embeddings, or flattened standardised pixels), any float.
        k: patches to keep, 1 <= k <= N.

    Returns:
        (B, k) int64 kept indices, ascending. O(N^2 F) for the distances, then O(k N^2).
    """
    B, N, _ = z.shape
    z = z.float()
    sq = (z * z).sum(-1)  # (B, N)
    dist = (sq[:, :, None] + sq[:, None, :] - 2 * z @ z.transpose(1, 2)).clamp_min_(0)  # (B, N, N)
    rows = torch.arange(B, device=z.device)
    ids = torch.empty(B, k, dtype=torch.long, device=z.device)
    ids[:, 0] = dist.sum(2).argmin(1)
    nearest = dist[rows, ids[:, 0]]  # (B, N): each patch's distance to its nearest kept patch
    taken = torch.zeros(B, N, dtype=torch.bool, device=z.device)
    taken[rows, ids[:, 0]] = True
    for t in range(1, k):
        # gain[b, c]: how much keeping c lowers sum_i nearest[b, i]
        gain = (nearest[:, None, :] - dist).clamp_min_(0).sum(-1).masked_fill_(taken, -1.0)
        ids[:, t] = gain.argmax(1)
        taken[rows, ids[:, t]] = True
        nearest = torch.minimum(nearest, dist[rows, ids[:, t]])
    return ids.sort(dim=1).values


@torch.no_grad()
def keep_below(score, tau: float, min_keep: int):
    """Patches with score < tau (at least the `min_keep` lowest), padded to the longest row.

    Args:
        score: (B, N) float. tau: threshold, a float or 0-d tensor.
        min_keep: floor on the kept patches per row.

    Returns:
        ids_keep (B, K_max) int64, kept indices ascending then padding;
        valid (B, K_max) bool, False at padding.
    """
    B, N = score.shape
    lowest = torch.argsort(score, dim=1, stable=True)[:, :min_keep]  # the floor, ties by index
    keep = (score < tau).scatter(1, lowest, True)
    idx = torch.arange(N, device=score.device).expand(B, N)
    # kept patches first, in index order, then dropped ones: one sort gives both
    ids = torch.argsort(torch.where(keep, idx, idx + N), dim=1)
    k_max = int(keep.sum(dim=1).max())
    ids_keep = ids[:, :k_max]
    return ids_keep, torch.gather(keep, 1, ids_keep)


def dynamic_floor(num_patches: int) -> int:
    """The fewest patches the dynamic strategy keeps of an image: max(1, ceil(0.02 N))."""
    return max(1, math.ceil(0.02 * num_patches))


class Selection(NamedTuple):
    """The patch tokens a strategy keeps of each image, and how dropped ones are merged.

    ids_keep: (B, K) int64 kept patch indices, ascending (then padding, for a ragged batch).
    valid: (B, K) bool, False at padding; None when every image keeps K.
    src: (B, N) int64, with merging: the kept slot each patch is merged into (a kept patch
        its own; a dropped one its most cosine-similar kept patch's); None: dropped ones go.
    prop_attn: with merging, add log(size) to the attention logits of merged keys (ToMe's
        proportional attention).
    """
    ids_keep: torch.Tensor
    valid: Optional[torch.Tensor] = None
    src: Optional[torch.Tensor] = None
    prop_attn: bool = False

    @classmethod
    def full(cls, batch: int, num_patches: int, device=None):
        """Every patch of every image kept: what a pass whose hook kept all tokens (returned
        None) kept."""
        return cls(torch.arange(num_patches, device=device).expand(batch, num_patches))

    @property
    def num_kept(self):
        """(B,) int64 patch tokens kept per image."""
        if self.valid is None:
            return self.ids_keep.new_full((self.ids_keep.shape[0],), self.ids_keep.shape[1])
        return self.valid.sum(1)

    def sizes(self):
        """(B, K) float32 patches merged into each kept token (0 at padding; 1 unmerged)."""
        if self.src is None:
            ones = torch.ones(self.ids_keep.shape, device=self.ids_keep.device)
            return ones if self.valid is None else ones * self.valid
        size = torch.zeros(self.ids_keep.shape, device=self.src.device)
        return size.scatter_add_(1, self.src, torch.ones(self.src.shape, device=self.src.device))


def merge_tokens(tokens, keep):
    """ToMe's size-weighted average (Bolya et al., ICLR 2023): each kept token becomes the mean
    of itself and the dropped tokens merged into it, every patch weighing 1.

    tokens: (B, N, D) patch tokens with positions; keep: `Selection` with `src`.
    Returns (B, K, D); zeros at padding.
    """
    B, N, D = tokens.shape
    sums = tokens.new_zeros(B, keep.ids_keep.shape[1], D).scatter_add(
        1, keep.src[..., None].expand(-1, -1, D), tokens)  # (B, K, D)
    return sums / keep.sizes().clamp_min(1)[..., None].to(sums.dtype)


@torch.no_grad()
def restore_index(keep, num_patches: int, z=None):
    """For each of the N grid positions, the kept-token slot whose feature goes there.

    Kept positions take their own slot. A dropped position takes, with `z` given ("nearest"
    fill), the slot of the kept patch whose embedding is most cosine-similar to its own; without
    `z`, slot K, i.e. a fill vector appended after the K kept tokens ("mask_token", "zeros").
    Computed once per batch and reused at every tapped block.

    Args:
        keep: `Selection` (ids_keep (B, K) int64, valid (B, K) bool or None).
        num_patches: N. z: (B, N, D) patch embeddings, or None.

    Returns:
        (B, N) int64 slots in [0, K].
    """
    ids_keep, valid = keep.ids_keep, keep.valid
    B, K = ids_keep.shape
    if valid is None:
        valid = torch.ones_like(ids_keep, dtype=torch.bool)
    if z is None:
        src = ids_keep.new_full((B, num_patches), K)
    else:
        u = F.normalize(z.float(), dim=-1)
        u_kept = torch.gather(u, 1, ids_keep[..., None].expand(-1, -1, u.shape[-1]))  # (B, K, D)
        sim = (u @ u_kept.transpose(1, 2)).masked_fill(~valid[:, None, :], -float("inf"))
        src = sim.argmax(dim=-1)  # (B, N)
    # kept positions point at their own slot; padding scatters into a spare column N
    target = torch.where(valid, ids_keep, torch.full_like(ids_keep, num_patches))
    slots = torch.arange(K, device=ids_keep.device).expand(B, K)
    src = torch.cat([src, src.new_zeros(B, 1)], dim=1).scatter(1, target, slots)
    return src[:, :num_patches]


@torch.no_grad()
def select(strategy, feats, mask_ratio, score=None, tau=None, noise=None):
    """The one dispatch from a strategy's name to its rule (used by `TokenMasker` and by the
    redundancy report, so both select exactly alike).

    Args:
        strategy: one of STRATEGIES.
        feats: (B, N, F) float features compared (patch embeddings or standardised pixels).
        mask_ratio: m in (0, 1); K = num_keep(N, m) for the fixed-count strategies.
        score: (B, N) redundancy scores of `feats` (similarity, dynamic), computed with the
            mean reduce when None.
        tau: dynamic threshold (float or 0-d tensor). noise: (B, N) random ranks (random).

    Returns:
        `Selection`.
    """
    N = feats.shape[1]
    k = num_keep(N, mask_ratio)
    if strategy == "random":
        return Selection(keep_lowest(noise, k))
    if strategy == "coverage":
        return Selection(keep_coverage(feats, k))
    if strategy == "kmedoids":
        return Selection(keep_kmedoids(feats, k))
    score = redundancy_score(feats) if score is None else score
    if strategy == "similarity":
        return Selection(keep_lowest(score, k))
    if strategy == "dynamic":
        return Selection(*keep_below(score, tau, dynamic_floor(N)))
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


@torch.no_grad()
def random_noise(batch: int, num_patches: int, device, index=None):
    """(B, N) uniform noise: the global RNG, or one generator seeded per sample index (B,)."""
    if index is None:
        return torch.rand(batch, num_patches, device=device)
    rows = []
    for i in index.tolist():
        g = torch.Generator().manual_seed(int(i))
        rows.append(torch.rand(num_patches, generator=g))
    return torch.stack(rows).to(device)


class TokenMasker(nn.Module):
    """Chooses the kept patch tokens of each image; pass it as the ViT's `select` hook.

    Args:
        strategy: one of STRATEGIES.
        mask_ratio: m in [0, 1); K = N (m = 0, or m below 1 / (2N) for a fixed-count strategy)
            keeps every token and runs the plain ViT. The training loop may set it per step.
        patch_size: p in pixels, for pixel-space scores.
        score_space: "embedding" (patch embeddings) or "pixel" (standardised pixels).
        score_reduce: "mean" or "max", see `redundancy_score`.
        momentum: EMA momentum of the dynamic threshold.
        merge: average the dropped tokens into the kept ones (see the module docstring).
        prop_attn: with merge, proportional attention.
        reduce: averages a 0-d tensor over data-parallel processes (the dynamic threshold's
            batch quantile), so every process keeps the same tau; None: this process alone.

    Buffers:
        tau: () float32, the dynamic threshold (NaN until the first training batch).

    Raises:
        ValueError: on an unknown strategy, score space or reduce, or m outside [0, 1).
    """

    def __init__(self, strategy="similarity", mask_ratio=0.0, patch_size=16,
                 score_space="embedding", score_reduce="mean", momentum=0.99, merge=False,
                 prop_attn=False, reduce=None):
        super().__init__()
        for name, value, choices in (("strategy", strategy, STRATEGIES),
                                     ("score space", score_space, SCORE_SPACES),
                                     ("score reduce", score_reduce, SCORE_REDUCES)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose from {choices}")
        num_keep(1, mask_ratio)  # validates the range
        self.strategy, self.mask_ratio, self.patch_size = strategy, mask_ratio, patch_size
        self.score_space, self.score_reduce, self.momentum = score_space, score_reduce, momentum
        if prop_attn and not merge:
            raise ValueError("proportional attention needs merging (prop_attn with merge)")
        self.merge, self.prop_attn = merge, prop_attn
        self.reduce = reduce if reduce is not None else (lambda t: t)
        self.register_buffer("tau", torch.tensor(float("nan")))

    def features(self, z, x):
        """(B, N, F) what selection compares: patch embeddings, or standardised pixels."""
        return z if self.score_space == "embedding" else pixel_patches(x, self.patch_size)

    def score(self, z, x):
        return redundancy_score(self.features(z, x), self.score_reduce)

    @torch.no_grad()
    def update_tau(self, score):
        """EMA of the (1 - m)-quantile of this batch's scores (averaged by `reduce`)."""
        q = self.reduce(torch.quantile(score.flatten(), 1.0 - self.mask_ratio))
        tau = q if torch.isnan(self.tau) else self.momentum * self.tau + (1 - self.momentum) * q
        self.tau.copy_(tau)

    @torch.no_grad()
    def forward(self, z, x, index=None):
        """z: (B, N, D) patch embeddings; x: (B, C, H, W) image; index: (B,) sample indices
        (random strategy at evaluation: seeds each sample's noise), or None.

        Returns:
            None when every token is kept (plain ViT), else a `Selection`.

        Raises:
            RuntimeError: dynamic strategy at evaluation with a threshold never calibrated.
        """
        N = z.shape[1]
        if self.mask_ratio == 0 or (self.strategy != "dynamic"
                                    and num_keep(N, self.mask_ratio) == N):
            return None
        feats = z if self.strategy == "random" else self.features(z, x)
        score = noise = None
        if self.strategy in ("similarity", "dynamic"):  # the others compare patches directly
            score = redundancy_score(feats, self.score_reduce)
        if self.strategy == "random":  # at evaluation, seeded per sample: repeatable scores
            noise = random_noise(*z.shape[:2], z.device, None if self.training else index)
        if self.strategy == "dynamic" and self.training:
            self.update_tau(score)
        elif self.strategy == "dynamic" and torch.isnan(self.tau):
            raise RuntimeError("dynamic strategy: the threshold tau was never calibrated "
                               "(train with --strategy dynamic first)")
        keep = select(self.strategy, feats, self.mask_ratio, score, self.tau, noise)
        if self.merge:  # each patch's slot: the same assignment as RUPerNet's nearest fill
            keep = keep._replace(src=restore_index(keep, N, z), prop_attn=self.prop_attn)
        return keep
