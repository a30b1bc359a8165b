"""Gather evaluation records into the study's table (and plots): metric against kept share.

    python -m rvit.report runs/bigearthnet-* --out report/

Reads every `eval-*.json` below the given run folders (or the given JSON files): one object, or a
list of them from an `evaluate.py --mask a,b,c` sweep. For each dataset, split and strategy it
writes a Markdown table: the dataset's metrics (config.yaml `metrics`), each also as a share of
the full-token baseline (the record at inference mask 0, from a model trained at mask 0 where
there is one), kept share, encoder GFLOPs per image, the FLOP reduction and the measured
speed-up over the baseline. With matplotlib installed (optional, imported only here) it also
draws each metric against kept share per strategy, the baseline as a horizontal line.
"""
import glob
import json
import os

from rvit.cli import parser, run_cli
from rvit.config import DEFAULT_CONFIG, dataset_config, load_config
from rvit.figures import pyplot

RECORD_KEYS = ("dataset", "split", "strategy", "mask_ratio", "kept_share")


def load_records(paths):
    """Evaluation records from JSON files and folders (searched for eval-*.json)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "**", "eval-*.json"), recursive=True))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such run folder or JSON file")
    records = []
    for f in files:
        with open(f) as fh:
            try:
                data = json.load(fh)
            except ValueError as e:
                raise ValueError(f"{f}: not a JSON file ({e})") from e
        data = data if isinstance(data, list) else [data]
        for r in data:
            missing = [k for k in RECORD_KEYS if not isinstance(r, dict) or k not in r]
            if missing:
                raise ValueError(f"{f}: not an evaluate.py record (no {', '.join(missing)})")
        records += data
    return records


def baseline(records, rec):
    """The full-token record of rec's dataset and split, or None."""
    full = [r for r in records if r["dataset"] == rec["dataset"] and r["split"] == rec["split"]
            and r["mask_ratio"] == 0]
    full.sort(key=lambda r: r.get("train_mask_ratio", 0) != 0)  # trained at mask 0 first
    return full[0] if full else None


def metrics_of(dataset, config=DEFAULT_CONFIG):
    try:
        return dataset_config(load_config(config), dataset, config).get("metrics", [])
    except ValueError:
        return []


def table(records, dataset, metrics):
    """Markdown table of one dataset's records, sorted by strategy then kept share."""
    rows = sorted((r for r in records if r["dataset"] == dataset),
                  key=lambda r: (r["split"], r["strategy"], r.get("train_mask_ratio", 0),
                                 -r["kept_share"]))
    head = ["split", "strategy", "train mask", "mask", "kept share"]
    head += [f"{m} (% of full)" for m in metrics]
    head += ["GFLOPs", "FLOP reduction", "images/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        base = baseline(records, r)
        cells = [r["split"], r["strategy"], f"{r.get('train_mask_ratio', 0):g}",
                 f"{r['mask_ratio']:g}", f"{r['kept_share']:.3f}"]
        for m in metrics:
            share = f" ({100 * r[m] / base[m]:.1f}%)" if base and base.get(m) else ""
            cells.append(f"{100 * r[m]:.2f}{share}")
        cells.append(f"{r['gflops']:.3f}")
        cells.append(f"{base['gflops'] / r['gflops']:.2f}x" if base else "")
        cells.append(f"{r['images_per_s']:.1f}")
        cells.append(f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records, dataset, metric, path):
    """PNG of `metric` against kept share, one line per strategy and training mask ratio;
    False without matplotlib."""
    plt = pyplot("the report's plots")
    if plt is None:
        return False
    rows = [r for r in records if r["dataset"] == dataset and metric in r]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for strategy, trained in sorted({(r["strategy"], r.get("train_mask_ratio", 0)) for r in rows}):
        pts = sorted((r["kept_share"], 100 * r[metric]) for r in rows if r["strategy"] ==
                     strategy and r.get("train_mask_ratio", 0) == trained)
        ax.plot(*zip(*pts), marker="o", label=f"{strategy}, trained at mask {trained:g}")
    base = baseline(records, rows[0]) if rows else None
    if base:
        ax.axhline(100 * base[metric], color="grey", linestyle="--", label="full tokens")
    ax.set_xlabel("kept share of patch tokens")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(dataset)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = parser("Markdown table (and PNG plots) of RViT evaluation records: metrics against "
               "kept share.")
    p.add_argument("runs", nargs="+", help="run folders (searched for eval-*.json) or JSON files")
    p.add_argument("--out", default=None, help="folder for report.md and plots (default: print)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config.yaml naming each dataset's "
                                                            "metrics")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p.parse_args(argv)


def main(argv=None):
    """The report for command-line arguments `argv` (default sys.argv); errors raise."""
    run(parse_args(argv))


def run(args):
    records = load_records(args.runs)
    if not records:
        raise ValueError(f"{', '.join(args.runs)}: no evaluation records (eval-*.json) found")
    parts = []
    for dataset in sorted({r["dataset"] for r in records}):
        metrics = metrics_of(dataset, args.config)
        parts.append(f"## {dataset}\n\n{table(records, dataset, metrics)}\n")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            for m in metrics:
                if plot(records, dataset, m, os.path.join(args.out, f"{dataset}_{m}.png")):
                    parts.append(f"![{dataset} {m}]({dataset}_{m}.png)\n")
    text = "\n".join(parts)
    print(text)
    if args.out:
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    run_cli("rvit.report", run, parse_args())
