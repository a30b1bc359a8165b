"""OUT/curves.png: a training run's curves, drawn from its log.jsonl after every epoch, so
whether a fit converged is something to look at. Needs matplotlib (requirements-figures.txt);
without it nothing is drawn and nothing else changes."""
import json
import os

from rvit.figures import pyplot, save_figure


def epoch_records(log_path):
    """The epoch lines of a log.jsonl, in order (event lines such as resumes are skipped)."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "event" not in r]


def draw_curves(out, main_metric):
    """Write OUT/curves.png from OUT/log.jsonl: training loss, validation `main_metric` (%),
    kept share of patch tokens (mean, and the min-max range over images) and training images/s,
    each per epoch. Returns the path, or None when matplotlib is missing or no epoch is logged.
    """
    plt = pyplot()  # quietly: every epoch would say so
    records = epoch_records(os.path.join(out, "log.jsonl"))
    if plt is None or not records:
        return None
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.16, top=0.8, wspace=0.25)
    panels = [("training loss", [r["loss"] for r in records]),
              (f"validation {main_metric} (%)", [100 * r["val"][main_metric] for r in records]),
              ("kept share of patch tokens", [r["kept_share"] for r in records]),
              ("training images / s", [r["images_per_s"] for r in records])]
    for ax, (title, values) in zip(axes, panels):
        ax.plot(epochs, values, marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[2].fill_between(epochs, [r["kept_share_min"] for r in records],
                         [r["kept_share_max"] for r in records], alpha=0.2, label="min-max")
    axes[2].set_ylim(0, 1.05)
    axes[2].legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(out)), fontsize=10)
    return save_figure(fig, plt, os.path.join(out, "curves.png"))
