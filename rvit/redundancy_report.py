"""The redundancy report's Markdown and figures, drawn from the result of rvit/redundancy.py:
score histograms, the band correlation matrix, the fill error of every rule against the kept
share (matplotlib), and the most and least redundant images with their dropped patches greyed
(matplotlib, else Pillow). Each figure is optional and says what it needs when it is missing.
"""
import os

import numpy as np

from rvit.figures import grey_dropped, panel_grid, pyplot, save_figure, to_rgb
from rvit.masking import STRATEGIES, keep_lowest, num_keep, pixel_patches, redundancy_score


def markdown(result):
    lines = [f"# Redundancy of {result['dataset']} ({result['split']}, "
             f"{result['num_samples']} images, {result['num_patches']} patches of "
             f"{result['patch_size']} px at {result['img_size']} px)", ""]
    for s, sp in result["spatial"].items():
        given = sp["share_above"] and sp["share_above"][0]["quantile"] is None
        lines += [f"## Spatial, {s} space: mean score {sp['mean_score']:.3f}", "",
                  "| threshold: " + ("--thresholds" if given else
                                     f"quantile of all {s}-space scores")
                  + " | score | share of an image's patches above it: mean | min | max |",
                  "|---|---|---|---|---|"]
        lines += [f"| {'given' if a['quantile'] is None else format(a['quantile'], 'g')} | "
                  f"{a['threshold']:.3f} | {a['mean']:.3f} | {a['min']:.3f} | {a['max']:.3f} |"
                  for a in sp["share_above"]]
        lines += ["", "| mask | dynamic kept share: mean | min | max | similarity keeps |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m} | {v['mean']:.3f} | {v['min']:.3f} | {v['max']:.3f} | "
                  f"{v['similarity_share']:.3f} |" for m, v in sp["dynamic_kept_share"].items()]
        rules = list(sp["fill_error"])
        lines += ["", "Information lost (fill error: dropped patches replaced by their most "
                  "similar kept patch, or with +merge every patch by the mean of its merged "
                  "group; squared error over patch energy; lower keeps more):", "",
                  "| mask | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
        lines += [f"| {m} | " + " | ".join(f"{sp['fill_error'][r][m]:.3f}" for r in rules)
                  + " |" for m in sp["dynamic_kept_share"]]
        ranked = sorted(((v, c) for c, v in sp["per_class_mean_score"].items() if v is not None),
                        reverse=True)
        lines += ["", "| class (most redundant first) | mean score |", "|---|---|"]
        lines += [f"| {c} | {v:.3f} |" for v, c in ranked]
        lines.append("")
    if "spectral" in result:
        sp = result["spectral"]
        lines += [f"## Spectral: {len(sp['bands'])} bands; {sp['components_95']} principal "
                  f"components explain 95 % of the variance, {sp['components_99']} explain 99 %",
                  ""]
    return "\n".join(lines)


def figures(result, ds, tf, args):
    """The PNGs of the module docstring, written to --out; returns their paths."""
    written = []
    plt = pyplot("the histogram, fill error and correlation plots")
    if plt is not None:
        written.append(score_histogram(plt, result, args.out))
        written.append(fill_error_plot(plt, result, args.out))
        if "spectral" in result:
            written.append(correlation_plot(plt, result["spectral"], args.out))
    written += example_grid(result, ds, tf, args)
    return written


def score_histogram(plt, result, out):
    """A histogram per score space, each over the range its scores span (the bins hold
    [-1, 1]; the scores of one space fill a small part of it)."""
    spaces = result["spatial"]
    fig, axes = plt.subplots(1, len(spaces), figsize=(4.6 * len(spaces), 3.2), squeeze=False,
                             layout="constrained")
    for ax, (s, sp) in zip(axes[0], spaces.items()):
        edges, counts = np.array(sp["histogram"]["edges"]), np.array(sp["histogram"]["counts"])
        ax.stairs(counts / counts.sum(), edges, fill=True, alpha=0.8)
        used = np.flatnonzero(counts)
        lo, hi = edges[used[0]], edges[used[-1] + 1]
        ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.axvline(sp["mean_score"], color="k", linestyle="--", linewidth=1,
                   label=f"mean {sp['mean_score']:.3f}")
        ax.set_title(f"{result['dataset']} {result['split']}, {s} space: "
                     f"{result['num_samples']} images,\n{result['num_patches']} patches each",
                     fontsize=9)
        ax.set_xlabel("redundancy score: mean cosine similarity\nto the image's other patches "
                      "(-1 to 1)", fontsize=9)
        ax.set_ylabel(f"share of patches per {edges[1] - edges[0]:.2g} bin", fontsize=9)
        ax.legend(fontsize=8, frameon=False)
    return save_figure(fig, plt, os.path.join(out, "score_histogram.png"))


def correlation_plot(plt, spectral, out):
    """The band correlation matrix, with the components the variance needs in the title."""
    bands = spectral["bands"]
    fig, ax = plt.subplots(figsize=(5, 4.4), layout="constrained")
    im = ax.imshow(np.array(spectral["correlation"]), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(bands)), bands, rotation=90, fontsize=8)
    ax.set_yticks(range(len(bands)), bands, fontsize=8)
    fig.colorbar(im, label="Pearson correlation of standardised bands")
    ax.set_title(f"{spectral['components_95']} principal components explain 95 % of the "
                 f"variance,\n{spectral['components_99']} explain 99 %", fontsize=9)
    return save_figure(fig, plt, os.path.join(out, "band_correlation.png"))


def fill_error_plot(plt, result, out):
    """Fill error against kept share, a panel per score space: a colour per strategy, solid
    without merging, dotted with it; the dynamic strategy at its mean realised kept share."""
    spaces = result["spatial"]
    fig, axes = plt.subplots(1, len(spaces), figsize=(3.6 * len(spaces) + 2.6, 3.4),
                             layout="constrained", sharey=True, squeeze=False)
    for ax, (space, sp) in zip(axes[0], spaces.items()):
        masks = list(sp["dynamic_kept_share"])
        for i, st in enumerate(STRATEGIES):
            kept = [sp["dynamic_kept_share"][m]["mean" if st == "dynamic" else
                                                "similarity_share"] for m in masks]
            for rule, style in ((st, "-"), (st + "+merge", ":")):
                ax.plot(kept, [sp["fill_error"][rule][m] for m in masks], style, marker="o",
                        markersize=3, color=f"C{i}")
        ax.set_title(f"information lost: {result['dataset']} {result['split']}, {space} space",
                     fontsize=9)
        ax.set_xlabel("kept share of patch tokens (1 = all)")
    axes[0][0].set_ylabel("fill error (0: nothing lost;\n1: as much as all zeros)")
    line = plt.matplotlib.lines.Line2D
    handles = [line([], [], color=f"C{i}", marker="o", markersize=3, label=st)
               for i, st in enumerate(STRATEGIES)]
    handles += [line([], [], color="k", linestyle="-", label="dropped: most similar kept one"),
                line([], [], color="k", linestyle=":", label="+merge: its group's mean")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return save_figure(fig, plt, os.path.join(out, "fill_error.png"))


def example_grid(result, ds, tf, args):
    """The most (top row) and least (bottom row) redundant images in pixel space, the patches
    similarity would drop at --show-mask greyed, each titled with its mean score."""
    rows, titles, N = [], [], result["num_patches"]
    for name in ("most", "least"):
        tiles, names = [], []
        for i in result["examples"]["pixel"][name]:
            image, target, _ = ds[i]
            x, _ = tf(image[None], target[None])
            r = redundancy_score(pixel_patches(x, args.patch_size))
            kept = keep_lowest(r, num_keep(N, args.show_mask))[0].numpy()
            tiles.append(grey_dropped(to_rgb(x[0], list(ds.meta["bands"])), kept,
                                      args.patch_size))
            names.append(f"#{i}: mean score {float(r.mean()):.3f}")
        rows.append(tiles)
        titles.append(names)
    path = os.path.join(args.out, f"examples_mask{args.show_mask:g}.png")
    title = (f"{result['dataset']} {result['split']}: the most and the least redundant images "
             f"(pixel space)\nsimilarity at mask {args.show_mask:g}: each image's "
             f"{N - num_keep(N, args.show_mask)} of {N} most redundant patches greyed")
    return [path] if panel_grid(path, rows, titles, title,
                                ["most redundant", "least redundant"]) else []
