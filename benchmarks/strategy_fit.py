"""Which strategy holds up away from its training mask ratio? RUPerNet fitted to a few real
patches at mask 0 and at --train-mask per strategy, each evaluated at several mask ratios.

    python prepare_data.py --dataset flair --root tests/data/flair/FLAIR --out data/flair-fixture
    python -m benchmarks.strategy_fit --data-dir data/flair-fixture --out runs/strategy-fit

Trains with train.py as shipped (ViT-tiny from scratch, flags below, everything else from
config.yaml), evaluates with evaluate.py on the training split itself: with a handful of
patches this measures fitting, not generalisation. A model trained at mask 0 is the same for
every strategy, so it is trained once and evaluated with each strategy's selection. Prints a
Markdown table of OA / mIoU per strategy; it asserts nothing.
"""
import json
import os
import subprocess
import sys

from rvit.cli import parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="a prepared segmentation dataset folder")
    p.add_argument("--dataset", default="flair", help="its config.yaml section")
    p.add_argument("--out", required=True, help="folder for the runs and results.json")
    p.add_argument("--strategies", default="similarity,random,coverage",
                   help="comma-separated strategies")
    p.add_argument("--eval-masks", default="0,0.6,0.75,0.85",
                   help="mask ratios the mask-0 model is evaluated at")
    p.add_argument("--train-mask", type=float, default=0.75,
                   help="the other training mask ratio; its models are evaluated at 0 and at it")
    p.add_argument("--epochs", type=int, default=60, help="training epochs")
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


def train(args, folder, strategy, mask):
    if not os.path.exists(os.path.join(folder, "last.pt")):
        call("train.py", "--dataset", args.dataset, "--data-dir", args.data_dir, "--out", folder,
             "--strategy", strategy, "--mask", mask, "--epochs", args.epochs, "--batch-size",
             args.batch_size, "--lr", args.lr, "--workers", 0, "--device", args.device)
        print(f"trained {folder}", flush=True)
    return os.path.join(folder, "last.pt")


def evaluate(args, ckpt, strategy, masks, out):
    call("evaluate.py", "--checkpoint", ckpt, "--data-dir", args.data_dir, "--split",
         args.split, "--strategy", strategy, "--mask", ",".join(f"{m:g}" for m in masks),
         "--workers", 0, "--device", args.device, "--out", out)
    with open(out) as f:
        rows = json.load(f)
    return {r["mask_ratio"]: (r["OA"], r["mIoU"]) for r in (rows if isinstance(rows, list)
                                                             else [rows])}


def main(argv=None):
    args = parse_args(argv)
    strategies = args.strategies.split(",")
    masks = [float(m) for m in args.eval_masks.split(",")]
    os.makedirs(args.out, exist_ok=True)
    cells = {}  # (trained at, evaluated at) -> {strategy: (OA, mIoU)}
    base = train(args, os.path.join(args.out, "m0"), strategies[0], 0)
    for st in strategies:
        for m, v in evaluate(args, base, st, masks, os.path.join(args.out, f"m0-{st}.json")
                             ).items():
            cells.setdefault((0.0, m), {})[st] = v
        ckpt = train(args, os.path.join(args.out, f"m{args.train_mask:g}-{st}"), st,
                     args.train_mask)
        for m, v in evaluate(args, ckpt, st, [args.train_mask, 0],
                             os.path.join(args.out, f"m{args.train_mask:g}-{st}.json")).items():
            cells.setdefault((args.train_mask, m), {})[st] = v
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump([{"train_mask": t, "eval_mask": e, **{st: list(v) for st, v in c.items()}}
                   for (t, e), c in cells.items()], f, indent=1)
    print(f"\n{args.dataset} {args.split} split, {args.epochs} epochs, batch {args.batch_size}, "
          f"lr {args.lr:g}; OA / mIoU\n")
    print("| trained at | evaluated at | " + " | ".join(strategies) + " |")
    print("|---|---|" + "---|" * len(strategies))
    for (t, e), c in cells.items():
        print(f"| mask {t:g}{'' if t == 0 else ' (same strategy)'} | {e:g} | " +
              " | ".join(f"{c[st][0]:.3f} / {c[st][1]:.3f}" for st in strategies) + " |")


if __name__ == "__main__":
    main()
