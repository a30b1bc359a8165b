"""Which selection rule, trained how, holds up across token budgets? RUPerNet fitted to a few real
patches per rule and training ratio, over several seeds, each evaluated at several mask ratios.

    python prepare_data.py --dataset flair --root tests/data/flair/FLAIR --out data/flair-fixture
    python -m benchmarks.strategy_fit --data-dir data/flair-fixture --out runs/strategy-fit

Trains with train.py as shipped (ViT-tiny from scratch, the flags below, everything else from
config.yaml) and evaluates with evaluate.py on the training split itself: with a handful of
patches this measures fitting, not generalisation. Models: one trained at mask 0 (the same for
every rule, so it is trained once per seed and evaluated with each rule's selection), one per
rule at each --train-masks ratio, and one per rule with --mask-range. A rule is a strategy,
with "+merge" for ToMe-style merging (e.g. "kmedoids+merge"). Every model is evaluated at every
--eval-masks ratio with its own rule. Prints a Markdown table of OA (mean +- standard deviation
over --seeds, and the mIoU mean) per trained model and rule; results.json holds every seed's
values. It asserts nothing: read differences against the spread.
"""
import json
import os
import subprocess
import sys

if not __package__:  # run as `python benchmarks/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from rvit.checkpoint import write_json
from rvit.cli import parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="a prepared segmentation dataset folder")
    p.add_argument("--dataset", default="flair", help="its config.yaml section")
    p.add_argument("--out", required=True, help="folder for the runs and results.json")
    p.add_argument("--rules", default="similarity,random,kmedoids",
                   help="comma-separated strategies, each optionally with +merge")
    p.add_argument("--train-masks", default="0.75",
                   help="comma-separated fixed training mask ratios (besides 0); '' for none")
    p.add_argument("--mask-range", type=float, nargs=2, default=[0.0, 0.9],
                   metavar=("LO", "HI"), help="the mixed-ratio models' training range")
    p.add_argument("--no-range", action="store_true", help="train no mixed-ratio models")
    p.add_argument("--eval-masks", default="0,0.6,0.75,0.85,0.9",
                   help="mask ratios every model is evaluated at")
    p.add_argument("--seeds", type=int, default=3, help="fits per model (seeds 0 .. N-1)")
    p.add_argument("--img-size", type=int, default=224, help="training and evaluation side, px")
    p.add_argument("--epochs", type=int, default=40, help="training epochs")
    p.add_argument("--batch-size", type=int, default=2, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--split", default="train", help="split to evaluate on")
    p.add_argument("--device", default="cpu", help="cuda or cpu")
    return p.parse_args(argv)


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
    """Fit one model, or finish an interrupted fit (--resume auto: a complete one returns at
    once); returns its checkpoint."""
    call("train.py", "--dataset", args.dataset, "--data-dir", args.data_dir, "--out", folder,
         *rule_flags(rule), *mask_flags, "--seed", seed, "--img-size", args.img_size,
         "--epochs", args.epochs, "--batch-size", args.batch_size, "--lr", args.lr,
         "--workers", 0, "--device", args.device, "--resume", "auto")
    print(f"trained {folder}", flush=True)
    return os.path.join(folder, "last.pt")


def evaluate(args, ckpt, rule, masks, out):
    """{mask ratio: (OA, mIoU)} of a checkpoint with a rule's selection."""
    call("evaluate.py", "--checkpoint", ckpt, "--data-dir", args.data_dir, "--split",
         args.split, *rule_flags(rule), "--mask", ",".join(f"{m:g}" for m in masks),
         "--workers", 0, "--device", args.device, "--out", out)
    with open(out) as f:
        rows = json.load(f)
    return {r["mask_ratio"]: (r["OA"], r["mIoU"]) for r in (rows if isinstance(rows, list)
                                                             else [rows])}


def models(args, rules):
    """(label, rule it is trained with or None for mask 0, training mask flags, folder tag)."""
    out = [("mask 0", None, ["--mask", 0], "m0")]
    for m in (float(v) for v in args.train_masks.split(",") if v):
        out += [(f"mask {m:g}", r, ["--mask", m], f"m{m:g}-{r}") for r in rules]
    if not args.no_range:
        lo, hi = args.mask_range
        out += [(f"m ~ U[{lo:g}, {hi:g}]", r, ["--mask", 0, "--mask-range", lo, hi],
                 f"range{lo:g}-{hi:g}-{r}") for r in rules]
    return out


def main(argv=None):
    args = parse_args(argv)
    rules = args.rules.split(",")
    masks = [float(m) for m in args.eval_masks.split(",")]
    os.makedirs(args.out, exist_ok=True)
    cells = {}  # (trained label, rule) -> {mask: [(OA, mIoU) per seed]}
    for label, trained_rule, flags, tag in models(args, rules):
        for seed in range(args.seeds):
            folder = os.path.join(args.out, f"{tag}-s{seed}")
            ckpt = train(args, folder, trained_rule or rules[0], seed, flags)
            for rule in [trained_rule] if trained_rule else rules:
                got = evaluate(args, ckpt, rule, masks, f"{folder}-eval-{rule}.json")
                for m, v in got.items():
                    cells.setdefault((label, rule), {}).setdefault(m, []).append(v)
    write_json([{"trained": t, "rule": r, "eval_mask": m, "OA_mIoU_per_seed": v}
                for (t, r), c in cells.items() for m, v in c.items()],
               os.path.join(args.out, "results.json"))
    print(table(args, cells, masks))


def table(args, cells, masks):
    """Markdown: OA mean +- SD over seeds, and the mIoU mean, per model and evaluation ratio."""
    lines = [f"\n{args.dataset} {args.split} split, {args.img_size} px, {args.epochs} epochs, "
             f"batch {args.batch_size}, lr {args.lr:g}, seeds 0-{args.seeds - 1}; "
             "OA mean +- SD (mIoU mean)\n",
             "| trained at | rule | " + " | ".join(f"at {m:g}" for m in masks) + " | spread |",
             "|---|---|" + "---|" * (len(masks) + 1)]
    for (trained, rule), c in cells.items():
        means = [np.mean([oa for oa, _ in c[m]]) for m in masks]
        row = [f"{mean:.3f} +- {np.std([oa for oa, _ in c[m]]):.3f} "
               f"({np.mean([iou for _, iou in c[m]]):.3f})" for mean, m in zip(means, masks)]
        lines.append(f"| {trained} | {rule} | " + " | ".join(row) +
                     f" | {max(means) - min(means):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
