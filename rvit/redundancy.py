"""How redundant is a dataset? Spatial and spectral redundancy, measured before any training.

    python -m rvit.redundancy --data-dir data/bigearthnet --split train --out redundancy/
    python -m rvit.redundancy --data-dir data/woody --checkpoint runs/woody-.../best.pt --out r/

Spatial: the redundancy score that the masking uses (rvit/masking.py: mean cosine similarity of
each patch to the other patches of its image), on standardised pixels and, with --checkpoint, on a
trained model's patch embeddings: its histogram over all patches, per image the share of patches
scoring above thresholds (by default the --quantiles of each space's own scores, as a score
means something else in each space), the kept share the dynamic strategy would give at each
--mask (threshold = the (1 - m)-quantile of all scores), the mean score per class, and the
information each strategy loses at each --mask (`fill_error`).
Spectral (C > 1): the band correlation matrix and the number of principal components of the
standardised bands that explain 95 % and 99 % of the variance.

Streamed over the HDF5 file (two passes; memory does not grow with its size); written to
OUT/redundancy.json and OUT/report.md (also printed), with PNGs when matplotlib / Pillow are
installed (rvit/redundancy_report.py draws the Markdown and the figures from the result).
"""
import heapq
import os

import numpy as np
import torch

from rvit.atomic import atomic_write
from rvit.checkpoint import write_json
from rvit.cli import parser, progress_bar, run_cli
from rvit.data import DeviceTransform, H5Dataset
from rvit.masking import (STRATEGIES, dynamic_floor, merge_tokens, num_keep, pixel_patches,
                          redundancy_score, restore_index, select)
from rvit.models import encoder, load_run
from rvit.redundancy_report import figures, markdown
from rvit.upernet import restore_grid

BINS = np.linspace(-1.0, 1.0, 201)  # score histogram edges: cosine similarity in [-1, 1]


class Spectral:
    """Streamed band statistics of native pixel values: sums of x and x x^T in float64."""

    def __init__(self, bands):
        self.n, self.s, self.ss = 0, np.zeros(bands), np.zeros((bands, bands))

    def add(self, images):
        """images: (B, C, H, W) any real dtype."""
        x = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1).astype(np.float64)
        self.n += x.shape[1]
        self.s += x.sum(1)
        self.ss += x @ x.T

    def result(self):
        mean = self.s / self.n
        cov = self.ss / self.n - np.outer(mean, mean)
        std = np.sqrt(np.clip(np.diag(cov), 1e-12, None))
        corr = cov / np.outer(std, std)
        eig = np.sort(np.linalg.eigvalsh(corr))[::-1].clip(min=0)
        explained = np.cumsum(eig) / eig.sum()
        return {"correlation": corr.tolist(), "explained_variance": explained.tolist(),
                "components_95": int(np.searchsorted(explained, 0.95 - 1e-9) + 1),
                "components_99": int(np.searchsorted(explained, 0.99 - 1e-9) + 1)}


def features(x, space, vit, patch):
    """(B, N, F) patches of a normalised batch: standardised pixels, or patch embeddings."""
    return pixel_patches(x, patch) if space == "pixel" else vit.patch_embed(x).float()


def batches(ds, args, tf, desc):
    """(native images numpy, model input, targets, index) per batch, with a progress bar."""
    n = min(len(ds), args.max_samples or len(ds))
    for start in progress_bar(range(0, n, args.batch_size), desc=desc):
        idx = list(range(start, min(n, start + args.batch_size)))
        images, targets, _ = ds.__getitems__(idx)
        x, y = tf(images, targets)
        yield images.numpy(), x, y, idx


def quantile_from_hist(hist, q):
    """q-quantile of the scores from their histogram (linear within a bin)."""
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    i = int(np.searchsorted(cdf, q))
    lo, hi = BINS[i], BINS[i + 1]
    before = cdf[i - 1] if i > 0 else 0.0
    frac = (q - before) / max(cdf[i] - before, 1e-12)
    return float(lo + frac * (hi - lo))


@torch.no_grad()
def analyse(args):
    """(result, dataset, transform): the two passes over --split, summarised."""
    ds = H5Dataset(os.path.join(args.data_dir, f"{args.split}.h5"))
    meta, vit, spaces = ds.meta, None, ["pixel"]
    if args.checkpoint:
        ckpt, model = load_run(args.checkpoint)
        vit = encoder(model)
        args.img_size, args.patch_size = ckpt["config"]["img_size"], ckpt["config"]["patch_size"]
        spaces.append("embedding")
    if args.img_size % args.patch_size:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of --patch-size "
                         f"{args.patch_size}")
    if not all(0 < q < 1 for q in args.quantiles):
        raise ValueError(f"--quantiles {args.quantiles}: each must be in (0, 1)")
    tf = DeviceTransform(meta["mean"], meta["std"], args.img_size, torch.device("cpu"))
    N = (args.img_size // args.patch_size) ** 2
    seg, classes = meta["task"] == "segmentation", meta["classes"]
    hist = {s: np.zeros(len(BINS) - 1) for s in spaces}
    class_sum = {s: np.zeros(len(classes)) for s in spaces}
    class_n = np.zeros(len(classes))
    spectral = Spectral(len(meta["bands"]))
    extremes = {s: {"most": [], "least": []} for s in spaces}  # see track_extremes
    count = 0
    for images, x, y, idx in batches(ds, args, tf, "pass 1"):
        spectral.add(images)
        for s in spaces:
            r = redundancy_score(features(x, s, vit, args.patch_size)).numpy()  # (B, N)
            hist[s] += np.histogram(r.clip(-1, 1), BINS)[0]
            sums, counts = per_class(r, y, seg, len(classes), args.patch_size)
            class_sum[s] += sums
            track_extremes(extremes[s], r.mean(1), idx, args.num_examples)
        class_n += counts
        count += len(idx)
    if count == 0:
        raise ValueError(f"{ds.path}: no samples")
    result = {"dataset": meta["dataset"], "split": args.split, "num_samples": count,
              "img_size": args.img_size, "patch_size": args.patch_size, "num_patches": N,
              "spatial": {}}
    taus = {s: {m: quantile_from_hist(hist[s], 1 - m) for m in args.mask} for s in spaces}
    # (quantile or None, score) per space: a fixed score means something else in each space
    thresholds = {s: [(None, t) for t in args.thresholds] if args.thresholds else
                  [(q, quantile_from_hist(hist[s], q)) for q in args.quantiles] for s in spaces}
    second = second_pass(ds, args, tf, vit, spaces, taus, thresholds, N)
    centers = (BINS[:-1] + BINS[1:]) / 2
    for s in spaces:
        result["spatial"][s] = {
            "histogram": {"edges": BINS.tolist(), "counts": hist[s].astype(int).tolist()},
            "mean_score": float((hist[s] * centers).sum() / hist[s].sum()), **second[s],
            "per_class_mean_score": {c: (float(class_sum[s][i] / class_n[i]) if class_n[i]
                                         else None) for i, c in enumerate(classes)}}
    if len(meta["bands"]) > 1:
        result["spectral"] = {"bands": meta["bands"], **spectral.result()}
    result["examples"] = {s: distinct_extremes(e) for s, e in extremes.items()}
    return result, ds, tf


def distinct_extremes(extremes):
    """{"most": indices, "least": indices}, most extreme first; an image among the most
    redundant is left out of the least (a split smaller than twice --num-examples)."""
    most = [i for _, i in extremes["most"]]
    return {"most": most, "least": [i for _, i in extremes["least"] if i not in most]}


def per_class(r, y, seg, num_classes, patch):
    """Sum of scores and counts per class: images with the label (multi-label), or patches
    whose commonest pixel class it is (segmentation)."""
    y = y.numpy()
    if not seg:
        mean = r.mean(1)  # (B,) image redundancy
        return (y * mean[:, None]).sum(0), y.sum(0)
    B, H, W = y.shape
    tiles = y.reshape(B, H // patch, patch, W // patch, patch).transpose(0, 1, 3, 2, 4)
    tiles = tiles.reshape(B * r.shape[1], -1)  # (B N, patch^2)
    counts = np.stack([(tiles == c).sum(1) for c in range(num_classes)], 1)  # ignored: none
    major, has = counts.argmax(1), counts.max(1) > 0
    sums = np.bincount(major[has], weights=r.reshape(-1)[has], minlength=num_classes)
    return sums, np.bincount(major[has], minlength=num_classes)


def track_extremes(extremes, means, idx, k):
    """Keep the k images of highest ("most") and of lowest ("least") mean score so far as
    (key, index) pairs, most extreme first; the key is the score, or minus it for "least"."""
    for name, sign in (("most", 1), ("least", -1)):
        pairs = [(sign * m, i) for m, i in zip(means.tolist(), idx)]
        extremes[name] = heapq.nlargest(k, extremes[name] + pairs)


def spread(values):
    """{"mean", "min", "max"} of a list of per-image values, as floats."""
    return {"mean": float(np.mean(values)), "min": float(np.min(values)),
            "max": float(np.max(values))}


def second_pass(ds, args, tf, vit, spaces, taus, thresholds, N):
    """Per space, over the images: the share of each image's patches scoring above each
    threshold ("share_above"), the kept share of the dynamic rule at each mask ratio's
    threshold ("dynamic_kept_share") and every rule's fill error (`fill_error`)."""
    floor = dynamic_floor(N)
    shares = {s: {m: [] for m in args.mask} for s in spaces}
    above = {s: [[] for _ in thresholds[s]] for s in spaces}
    rules = [st + merge for st in STRATEGIES for merge in ("", "+merge")]
    errors = {s: {rule: {m: [] for m in args.mask} for rule in rules} for s in spaces}
    for _, x, _, idx in batches(ds, args, tf, "pass 2"):
        for s in spaces:
            feats = features(x, s, vit, args.patch_size)
            r = redundancy_score(feats)
            for j, (_, t) in enumerate(thresholds[s]):
                above[s][j] += (r > t).float().mean(1).tolist()
            for m in args.mask:
                k = (r < taus[s][m]).sum(1).clamp_min(floor) if m > 0 else torch.full(
                    (r.shape[0],), N)
                shares[s][m] += (k.float() / N).tolist()
                for st in STRATEGIES:
                    plain, merged = strategy_error(feats, r, st, m, taus[s][m], idx[0])
                    errors[s][st][m] += plain.tolist()
                    errors[s][st + "+merge"][m] += merged.tolist()
    out = {}
    for s in spaces:
        out[s] = {"share_above": [{"quantile": q, "threshold": t, **spread(v)}
                                  for (q, t), v in zip(thresholds[s], above[s])],
                  "dynamic_kept_share": {f"{m:g}": {"tau": taus[s][m], **spread(v),
                                                    "std": float(np.std(v)),
                                                    "similarity_share": num_keep(N, m) / N}
                                         for m, v in shares[s].items()},
                  "fill_error": {rule: {f"{m:g}": float(np.mean(v)) for m, v in by_mask.items()}
                                 for rule, by_mask in errors[s].items()}}
    return out


def strategy_error(feats, r, strategy, m, tau, seed, draws=5):
    """(2, B) fill errors of one strategy at mask ratio m, without and with merging (one
    assignment for both), selecting on `feats` exactly as the masker does
    (`rvit.masking.select`); random: the mean of `draws` seeded draws."""
    B, N, _ = feats.shape
    if m == 0:
        return torch.zeros(2, B)
    g, errors = torch.Generator().manual_seed(int(seed)), []
    for _ in range(draws if strategy == "random" else 1):
        noise = torch.rand(B, N, generator=g) if strategy == "random" else None
        keep = select(strategy, feats, m, r, tau, noise)
        src = restore_index(keep, N, feats)
        errors.append(torch.stack([fill_error(feats, keep, src=src),
                                   fill_error(feats, keep, merge=True, src=src)]))
    return torch.stack(errors).mean(0)


def fill_error(feats, keep, merge=False, src=None):
    """How much of an image a selection loses: replace each dropped patch by its most
    cosine-similar kept patch (RUPerNet's `nearest` fill) - with `merge`, replace every patch by
    the mean of the patches merged with it, as ToMe-style merging keeps them - and take the
    squared error summed over the image's patches, over the image's patch energy
    sum_i |z_i|^2. 0: nothing lost; 1: as much as filling every patch with zeros.

    Args:
        feats: (B, N, F) float patches (standardised pixels, or patch embeddings).
        keep: `rvit.masking.Selection`, as from the masker.
        merge: the dropped patches were merged into the kept ones (rvit.masking.merge_tokens).
        src: (B, N) the assignment `restore_index(keep, N, feats)`, when already computed.

    Returns:
        (B,) float32.
    """
    src = restore_index(keep, feats.shape[1], feats) if src is None else src
    if merge:
        kept = merge_tokens(feats, keep._replace(src=src))  # (B, K, F) means of each group
    else:
        kept = torch.gather(feats, 1, keep.ids_keep[..., None].expand(-1, -1, feats.shape[-1]))
    err = (feats - restore_grid(kept, src)).pow(2).sum((1, 2))
    return (err / feats.pow(2).sum((1, 2)).clamp_min(1e-12)).float()


def parse_args(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder of prepare_data.py's HDF5 files")
    p.add_argument("--split", default="train", help="split file name without .h5")
    p.add_argument("--out", required=True, help="folder for redundancy.json and the PNGs")
    p.add_argument("--checkpoint", help="also score in this trained model's embedding space "
                                        "(its image and patch size are used)")
    p.add_argument("--max-samples", type=int, default=None, help="read at most this many images")
    p.add_argument("--img-size", type=int, default=224, help="images are resized to this side "
                                                             "(pixels), as for training")
    p.add_argument("--patch-size", type=int, default=16, help="patch side in pixels")
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.9, 0.95, 0.99],
                   help="report the share of each image's patches scoring above these "
                        "quantiles of all scores, per score space")
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="instead of --quantiles: these scores, the same in every space")
    p.add_argument("--mask", type=float, nargs="+", default=[0.25, 0.5, 0.65, 0.75, 0.85],
                   help="mask ratios at which to report the dynamic strategy's kept share and "
                        "every strategy's fill error")
    p.add_argument("--show-mask", type=float, default=0.65,
                   help="mask ratio of the example grid (the poster's 'mask top 65%%')")
    p.add_argument("--num-examples", type=int, default=4,
                   help="most and least redundant images shown")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p.parse_args(argv)


def main(argv=None):
    """The report for command-line arguments `argv` (default sys.argv); errors raise."""
    run(parse_args(argv))


def run(args):
    result, ds, tf = analyse(args)
    result["figures"] = figures(result, ds, tf, args)  # rvit/redundancy_report.py
    path, md = os.path.join(args.out, "redundancy.json"), os.path.join(args.out, "report.md")
    write_json(result, path)
    text = markdown(result)
    with atomic_write(md) as tmp, open(tmp, "w") as f:
        f.write(text)
    print(text)
    print("wrote " + ", ".join([path, md, *result["figures"]]))


if __name__ == "__main__":
    run_cli("rvit.redundancy", run, parse_args())
