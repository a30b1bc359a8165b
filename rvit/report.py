"""Gather evaluation records into the study's table (and plots): metric against kept share.

    python -m rvit.report runs/bigearthnet-* --out report/

Reads every `eval-*.json` below the given run folders (or the given JSON files): one record, or
a list from an `evaluate.py --mask a,b,c` sweep. Per dataset, a Markdown table: its metrics
(`metrics_of`), each also as a share of the full-token baseline (`baseline`), kept share,
encoder GFLOPs per image, FLOP reduction, images/s and the speed-up over the same trained model
and strategy at mask 0. With matplotlib (optional), a plot of each metric against kept share.
"""
import glob
import json
import os

from rvit.atomic import atomic_write
from rvit.cli import parser, run_cli
from rvit.config import DEFAULT_CONFIG, dataset_config, load_config, trained_mask
from rvit.engine import MIN_TIMED_BATCHES, MIN_TIMED_S
from rvit.figures import pyplot, save_figure
from rvit.tasks import TASKS

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
    return min(full, key=lambda r: trained_at(r) != "0", default=None)  # trained at 0 first


def trained_at(r):
    """The training mask ratio of a record's model: '0.6', or '0-0.9' for --mask-range."""
    return trained_mask(r.get("train_mask_ratio", 0), r.get("train_mask_range"))


def metrics_of(dataset, records, config=DEFAULT_CONFIG):
    """The metrics to tabulate for a dataset: its config.yaml section's, else the defaults of
    the one task its records name (records made before they named it: none)."""
    try:
        listed = dataset_config(load_config(config), dataset, config).get("metrics")
    except ValueError:
        listed = None
    tasks = {r.get("task") for r in records if r["dataset"] == dataset} & TASKS.keys()
    return listed or (list(TASKS[tasks.pop()].metrics) if len(tasks) == 1 else [])


def model_of(r):
    """The trained model a record evaluates: its checkpoint (records without one: its training
    strategy and mask ratio)."""
    return r.get("checkpoint") or f"{r.get('train_strategy')} m{trained_at(r)}"


def model_label(r):
    """'model trained at mask 0', 'model trained with similarity at mask 0.6' or '... at masks
    0-0.9' (a mask range)."""
    m, strategy = trained_at(r), r.get("train_strategy")
    at = f"masks {m}" if r.get("train_mask_range") else f"mask {m}"
    return f"model trained {f'with {strategy} ' if m != '0' and strategy else ''}at {at}"


def full_tokens(records, rec, strategy=True):
    """The record of rec's trained model at mask 0 on rec's split (and, with `strategy`, rec's
    strategy), or None."""
    return next((r for r in records if model_of(r) == model_of(rec) and r["split"] == rec["split"]
                 and r["dataset"] == rec["dataset"] and r["mask_ratio"] == 0
                 and (not strategy or r["strategy"] == rec["strategy"])), None)


def speed_up(r, full):
    """images/s over the same model and strategy's at mask 0, or why there is no ratio."""
    if full is None:
        return "n/a (no mask 0)"
    if r.get("images_per_s") is None or full.get("images_per_s") is None:
        return "n/a (untimed)"
    return f"{r['images_per_s'] / full['images_per_s']:.2f}x"


def table(records, dataset, metrics):
    """Markdown table of one dataset's records, sorted by strategy then kept share, and a note
    saying what the timing columns measure and against what."""
    rows = sorted((r for r in records if r["dataset"] == dataset),
                  key=lambda r: (r["split"], r["strategy"], trained_at(r), model_of(r),
                                 -r["kept_share"]))
    head = ["split", "strategy", "train mask", "mask", "kept share"]
    head += [f"{m} (% of full)" for m in metrics]
    head += ["GFLOPs", "FLOP reduction", "images/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        base = baseline(records, r)
        tau = f", tau {r['tau']:.4f}" if r.get("tau") is not None else ""
        cells = [r["split"], r["strategy"] + tau, trained_at(r),
                 f"{r['mask_ratio']:g}", f"{r['kept_share']:.3f}"]
        for m in metrics:
            share = f" ({100 * r[m] / base[m]:.1f}%)" if base and base.get(m) else ""
            cells.append(f"{100 * r[m]:.2f}{share}")
        rate = r.get("images_per_s")
        cells += [f"{r['gflops']:.3f}", f"{base['gflops'] / r['gflops']:.2f}x" if base else "",
                  "n/a (untimed)" if rate is None else f"{rate:.1f}",
                  speed_up(r, full_tokens(records, r))]
        lines.append("| " + " | ".join(cells) + " |")
    devices = sorted({str(r.get("device", "unknown device")) for r in rows})
    lines += ["", "% of full and FLOP reduction: against the full-token record (mask 0, from a "
              "model trained at mask 0 where there is one). images/s: evaluate.py's loop "
              "(reading, transform, model) in one process, timed from the end of its first "
              f"batch, on {'; '.join(devices)}; untimed: under {MIN_TIMED_S:g} s or "
              f"{MIN_TIMED_BATCHES} batches after the first (a split too small to time). "
              "Speed-up: against the same trained model and strategy at mask 0."]
    return "\n".join(lines)


LINES, MARKERS = ("-", "--", "-.", ":"), "osD^v"  # per trained model; colour per strategy


def plot(records, dataset, metric, path):
    """PNG of `metric` against kept share: a line per trained model (line style, marker) and
    inference strategy (colour), and each model's full-token score (its record at mask 0) as a
    grey line in the model's style; the legend beside the axes. False without matplotlib."""
    plt = pyplot("the report's plots")
    if plt is None:
        return False
    rows = [r for r in records if r["dataset"] == dataset and metric in r]
    splits = sorted({r["split"] for r in rows})
    rows = [r for r in rows if r["split"] == splits[0]]  # one split per plot: the table has all
    models = sorted({model_of(r): r for r in rows}.values(),
                    key=lambda r: (trained_at(r), str(r.get("train_strategy")), model_of(r)))
    strategies = sorted({r["strategy"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 3.6), layout="constrained")
    for i, model in enumerate(models):
        style = dict(linestyle=LINES[i % len(LINES)], marker=MARKERS[i % len(MARKERS)])
        for j, strategy in enumerate(strategies):
            pts = sorted((r["kept_share"], 100 * r[metric]) for r in rows
                         if model_of(r) == model_of(model) and r["strategy"] == strategy)
            if pts:
                ax.plot(*zip(*pts), color=f"C{j}", **style,
                        label=f"{strategy}, {model_label(model)}")
        full = full_tokens(rows, model, strategy=False)
        if full is not None:
            ax.axhline(100 * full[metric], color="grey", linewidth=1, linestyle=style["linestyle"],
                       label=f"full tokens, {model_label(model)}")
    ax.set_xlabel("kept share of patch tokens (1 = all)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{dataset}, {splits[0]} split:\n{metric} against kept share", fontsize=9)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    save_figure(fig, plt, path)
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
        metrics = metrics_of(dataset, records, args.config)
        parts.append(f"## {dataset}\n\n{table(records, dataset, metrics)}\n")
        if args.out:
            for m in metrics:
                if plot(records, dataset, m, os.path.join(args.out, f"{dataset}_{m}.png")):
                    parts.append(f"![{dataset} {m}]({dataset}_{m}.png)\n")
    text = "\n".join(parts)
    print(text)
    if args.out:
        with atomic_write(os.path.join(args.out, "report.md")) as tmp, open(tmp, "w") as f:
            f.write(text)


if __name__ == "__main__":
    run_cli("rvit.report", run, parse_args())
