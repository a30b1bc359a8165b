"""Which selection rule, trained how, holds up across token budgets? Models fitted per rule and
training ratio, over several seeds, each evaluated at several mask ratios, with a report.

    # the fixture study: RUPerNet on the 5 FLAIR training patches, evaluated on them (fitting)
    python prepare_data.py --dataset flair --root tests/data/flair/FLAIR --out data/flair-fixture
    python -m benchmarks.strategy_fit --data-dir data/flair-fixture --out runs/strategy-fit
    # the held-out study on AID (docs/study.md): ViT-tiny, 20 % train, tested on the other 80 %
    python -m benchmarks.strategy_fit --data-dir data/aid --dataset folder --split test \
        --rules similarity,random,kmedoids,kmedoids+merge --range-rules random,kmedoids+merge \
        --eval-masks 0,0.5,0.75,0.9 --img-size 128 --batch-size 32 --seeds 2 ...

Trains with train.py as shipped (the flags below, everything else from config.yaml) and
evaluates with evaluate.py on --split. Models: one trained at mask 0 (the same for every rule,
so it is trained once per seed and evaluated with each rule's selection), one per rule at each
--train-masks ratio, and one per --range-rules rule with --mask-range. A rule is a strategy, with
"+merge" for ToMe-style merging (e.g. "kmedoids+merge"). Every model is evaluated at every
--eval-masks ratio with its own rule. Fits and evaluations continue where an interrupted study
stopped (train.py --resume auto; an evaluation whose JSON exists is read back).

Writes OUT/report.md (the protocol, chance, a colour-histogram baseline for single-label data,
per cell OA and the task's second metric as mean +- SD over seeds, % of the mask-0 model's
full-token OA, kept share and GFLOPs; per training setting its images/s and speed-up over mask 0,
and links to each fit's curves.png), OUT/oa_vs_kept.png and OUT/results.json (every seed's
values). It asserts nothing: read differences against the spread.
"""
import json
import os
import subprocess
import sys

if not __package__:  # run as `python benchmarks/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h5py
import numpy as np

from rvit.atomic import atomic_write
from rvit.checkpoint import load_checkpoint, write_json
from rvit.cli import parser
from rvit.curves import epoch_records
from rvit.data import read_meta
from rvit.figures import pyplot, save_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="a prepared dataset folder")
    p.add_argument("--dataset", default="flair", help="its config.yaml section")
    p.add_argument("--out", required=True, help="folder for the runs, report.md, results.json")
    p.add_argument("--rules", default="similarity,random,kmedoids",
                   help="comma-separated strategies, each optionally with +merge")
    p.add_argument("--range-rules", default=None,
                   help="rules of the mixed-ratio models (default: --rules)")
    p.add_argument("--train-masks", default="0.75",
                   help="comma-separated fixed training mask ratios (besides 0); '' for none")
    p.add_argument("--mask-range", type=float, nargs=2, default=[0.0, 0.9],
                   metavar=("LO", "HI"), help="the mixed-ratio models' training range")
    p.add_argument("--no-range", action="store_true", help="train no mixed-ratio models")
    p.add_argument("--eval-masks", default="0,0.6,0.75,0.85,0.9",
                   help="mask ratios every model is evaluated at")
    p.add_argument("--seeds", type=int, default=3, help="fits per model (seeds 0 .. N-1)")
    p.add_argument("--img-size", type=int, default=224, help="training and evaluation side, px")
    p.add_argument("--patch-size", type=int, default=16, help="patch side, px")
    p.add_argument("--epochs", type=int, default=40, help="training epochs")
    p.add_argument("--batch-size", type=int, default=2, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up epochs (default: config.yaml's)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="single-label data: train.py's --label-smoothing")
    p.add_argument("--split", default="train", help="split to evaluate on")
    p.add_argument("--device", default="cpu", help="cuda or cpu")
    args = p.parse_args(argv)
    # the children run from the repository root; this process reads the same files
    args.data_dir, args.out = os.path.abspath(args.data_dir), os.path.abspath(args.out)
    return args


def call(script, *args):
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{script} failed:\n{proc.stderr[-2000:]}")


def rule_flags(rule):
    """'kmedoids+merge' -> ['--strategy', 'kmedoids', '--merge']."""
    strategy, _, merge = rule.partition("+")
    return ["--strategy", strategy] + (["--merge"] if merge == "merge" else ["--no-merge"])


def train(args, folder, rule, seed, mask_flags):
    """Fit one model, or finish an interrupted fit (--resume auto); returns its checkpoint. A
    complete fit is not started again."""
    ckpt = os.path.join(folder, "last.pt")
    if os.path.exists(ckpt) and load_checkpoint(ckpt)["epoch"] >= args.epochs:
        return ckpt
    extra = [] if args.warmup_epochs is None else ["--warmup-epochs", args.warmup_epochs]
    if args.label_smoothing:
        extra += ["--label-smoothing", args.label_smoothing]
    call("train.py", "--dataset", args.dataset, "--data-dir", args.data_dir, "--out", folder,
         *rule_flags(rule), *mask_flags, "--seed", seed, "--img-size", args.img_size,
         "--patch-size", args.patch_size, "--epochs", args.epochs, "--batch-size",
         args.batch_size, "--lr", args.lr, *extra, "--workers", 0, "--device", args.device,
         "--resume", "auto")
    print(f"trained {folder}", flush=True)
    return ckpt


def evaluate(args, ckpt, rule, masks, out):
    """{mask ratio: evaluate.py's record} of a checkpoint with a rule's selection. A record file
    newer than the checkpoint and holding every ratio is read back (a study continued after an
    interruption); any other is made again."""
    if not fresh(out, ckpt, masks):
        call("evaluate.py", "--checkpoint", ckpt, "--data-dir", args.data_dir, "--split",
             args.split, *rule_flags(rule), "--mask", ",".join(f"{m:g}" for m in masks),
             "--batch-size", 64, "--workers", 0, "--device", args.device, "--out", out)
    with open(out) as f:
        rows = json.load(f)
    return {r["mask_ratio"]: r for r in (rows if isinstance(rows, list) else [rows])}


def fresh(out, ckpt, masks):
    """Whether evaluation records `out` were made from `ckpt` as it is, at every ratio."""
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(ckpt):
        return False
    with open(out) as f:
        rows = json.load(f)
    return set(masks) <= {r["mask_ratio"] for r in (rows if isinstance(rows, list) else [rows])}


def models(args, rules):
    """(label, rule it is trained with or None for mask 0, training mask flags, folder tag)."""
    out = [("mask 0", None, ["--mask", 0], "m0")]
    for m in (float(v) for v in args.train_masks.split(",") if v):
        out += [(f"mask {m:g}", r, ["--mask", m], f"m{m:g}-{r}") for r in rules]
    if not args.no_range:
        lo, hi = args.mask_range
        out += [(f"m ~ U[{lo:g}, {hi:g}]", r, ["--mask", 0, "--mask-range", lo, hi],
                 f"range{lo:g}-{hi:g}-{r}")
                for r in (args.range_rules.split(",") if args.range_rules else rules)]
    return out


def train_rate(folder):
    """Median training images/s over a fit's epochs (log.jsonl)."""
    records = epoch_records(os.path.join(folder, "log.jsonl"))
    return float(np.median([r["images_per_s"] for r in records]))


def main(argv=None):
    args = parse_args(argv)
    rules = args.rules.split(",")
    masks = [float(m) for m in args.eval_masks.split(",")]
    os.makedirs(args.out, exist_ok=True)
    cells, fits = {}, {}  # (trained label, rule) -> {mask: [record per seed]}; -> [folders]
    for label, trained_rule, flags, tag in models(args, rules):
        for seed in range(args.seeds):
            folder = os.path.join(args.out, f"{tag}-s{seed}")
            ckpt = train(args, folder, trained_rule or rules[0], seed, flags)
            fits.setdefault((label, trained_rule), []).append(folder)
            for rule in [trained_rule] if trained_rule else rules:
                got = evaluate(args, ckpt, rule, masks, f"{folder}-eval-{rule}.json")
                for m, record in got.items():
                    cells.setdefault((label, rule), {}).setdefault(m, []).append(record)
    write_json([{"trained": t, "rule": r, "eval_mask": m, "per_seed": v}
                for (t, r), c in cells.items() for m, v in c.items()],
               os.path.join(args.out, "results.json"))
    meta = read_meta(os.path.join(args.data_dir, f"{args.split}.h5"))
    task, classes = meta["task"], meta["classes"]
    baseline = colour_baseline(args) if task == "multiclass" else None
    figure = oa_figure(args, cells, 1 / len(classes) if task == "multiclass" else None,
                       METRICS[task][0])
    report = markdown(args, cells, fits, masks, task, len(classes), baseline, figure)
    with atomic_write(os.path.join(args.out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(report)
    print(report)


def colour_histograms(path, value_range, bins=32):
    """(N, 3 * bins) per-band histograms over `value_range` of a split's first three bands, each
    band's summing to 1, and (N,) class indices: what a model that sees colours alone has."""
    with h5py.File(path) as f:
        images, labels = f["images"], f["labels"][:].argmax(1)
        feats = np.stack([np.concatenate([np.histogram(img[c], bins, value_range)[0] / img[c].size
                                          for c in range(min(3, img.shape[0]))])
                          for img in images])
    return feats, labels


def value_range(path):
    """(lowest, highest + 1) pixel value of a split, read in blocks: the histograms' range."""
    lo, hi = np.inf, -np.inf
    with h5py.File(path) as f:
        images = f["images"]
        for start in range(0, len(images), 256):
            block = images[start:start + 256]
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return lo, hi + 1


def colour_baseline(args):
    """Test OA of scikit-learn's logistic regression on colour histograms, trained on the train
    split: the trivial baseline a ViT must beat to have learnt scenes rather than colours. None
    without scikit-learn (requirements-bench.txt)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        print("the colour-histogram baseline needs scikit-learn; skipped", flush=True)
        return None
    train = os.path.join(args.data_dir, "train.h5")
    bins = value_range(train)  # the train split's: the same bins for both splits
    x, y = colour_histograms(train, bins)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    x, y = colour_histograms(os.path.join(args.data_dir, f"{args.split}.h5"), bins)
    return float((clf.predict(x) == y).mean())


def sd(values):
    """Sample standard deviation (n - 1 in the denominator) over seeds; 0 for one seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def stat(records, key, scale=1.0):
    """(mean, SD) over seeds of one field of evaluate.py's records."""
    values = [scale * r[key] for r in records]
    return float(np.mean(values)), sd(values)


# the score each cell is read by, and the second metric beside it, per task
METRICS = {"multiclass": ("OA", "F1_macro"), "segmentation": ("OA", "mIoU"),
           "multilabel": ("mAP_macro", "F1_macro")}


def full_token_score(cells, metric):
    """The mask-0 model's `metric` with every token (its cells come first), or None when mask 0
    was not evaluated."""
    first = next(iter(cells.values()))
    return stat(first[0.0], metric)[0] if 0.0 in first else None


def oa_figure(args, cells, chance, metric="OA"):
    """OUT/oa_vs_kept.png: `metric` (%, OA for single-label data) against the kept share of
    patch tokens, a line per trained model and rule with a band of +- 1 SD over seeds, the
    mask-0 model's full-token score as a grey line and chance dotted (single-label data).
    Returns the file name, or None without matplotlib."""
    plt = pyplot("oa_vs_kept.png")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for (trained, rule), c in cells.items():
        ms = sorted(c, reverse=True)  # rising kept share
        kept = [stat(c[m], "kept_share")[0] for m in ms]
        mean, sd = np.array([stat(c[m], metric, 100) for m in ms]).T
        line, = ax.plot(kept, mean, marker="o", markersize=3, label=f"{trained}, {rule}",
                        linestyle="--" if trained == "mask 0" else "-")
        ax.fill_between(kept, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    full = full_token_score(cells, metric)
    if full is not None:
        ax.axhline(100 * full, color="grey", linewidth=1,
                   label=f"mask-0 model, all tokens ({100 * full:.1f})")
    if chance is not None:
        ax.axhline(100 * chance, color="black", linestyle=":", linewidth=1,
                   label=f"chance ({100 * chance:.1f})")
    ax.set_xlabel("kept share of patch tokens")
    ax.set_ylabel(f"{metric} on the {args.split} split (%)")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside right upper")
    save_figure(fig, plt, os.path.join(args.out, "oa_vs_kept.png"), dpi=120)
    return "oa_vs_kept.png"


def markdown(args, cells, fits, masks, task, num_classes, baseline, figure):
    """report.md: the protocol, chance and baseline, the evaluation table, the training table."""
    first, second = METRICS[task]
    full = full_token_score(cells, first)
    lines = [f"# Selection rules across token budgets: {args.dataset}, {args.split} split", "",
             f"`{args.data_dir}`, {args.img_size} px, patch {args.patch_size}, {args.epochs} "
             f"epochs, batch {args.batch_size}, lr {args.lr:g}, seeds 0-{args.seeds - 1}; "
             "mean +- SD over seeds." + (f" Chance: {100 / num_classes:.1f} % OA."
                                         if task == "multiclass" else "")]
    if baseline is not None:
        lines.append(f"Colour-histogram baseline (logistic regression on per-band histograms "
                     f"of the train split): {100 * baseline:.1f} % OA.")
    if figure:
        lines += ["", f"![{first} against kept share]({figure})"]
    lines += ["", f"| trained at | rule | eval mask | {first} (%) | {second} (%) | "
              f"% of full-token {first} "
              "| kept share | GFLOPs |", "|---|---|---|---|---|---|---|---|"]
    for (trained, rule), c in cells.items():
        for m in masks:
            oa, oa_sd = stat(c[m], first, 100)
            s2, s2_sd = stat(c[m], second, 100)
            share = f"{oa / full:.1f}" if full else "n/a"  # oa in %, full a fraction
            lines.append(f"| {trained} | {rule} | {m:g} | {oa:.1f} +- {oa_sd:.1f} | {s2:.1f} +- "
                         f"{s2_sd:.1f} | {share} | {stat(c[m], 'kept_share')[0]:.3f} | "
                         f"{stat(c[m], 'gflops')[0]:.3f} |")
    base = np.mean([train_rate(f) for f in fits[("mask 0", None)]])
    lines += ["", "| trained at | rule | training img/s | speed-up over mask 0 | curves |",
              "|---|---|---|---|---|"]
    for (trained, rule), folders in fits.items():
        rates = [train_rate(f) for f in folders]
        links = " ".join(f"[s{i}]({os.path.basename(f)}/curves.png)"
                         for i, f in enumerate(folders))
        lines.append(f"| {trained} | {rule or 'any'} | {np.mean(rates):.1f} +- "
                     f"{sd(rates):.1f} | {np.mean(rates) / base:.2f}x | {links} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
