"""Evaluate an RViT checkpoint on one split, at one or several mask ratios and a strategy.

    python evaluate.py --checkpoint runs/bigearthnet-similarity-m0.6/best.pt --split test
    python evaluate.py --checkpoint ... --mask 0,0.25,0.5,0.6,0.75,0.85 --strategy similarity
    torchrun --nproc_per_node=2 evaluate.py --checkpoint ... --device cpu   # sharded, exact

Prints the dataset's metrics and writes them, with the realised kept share, images/s, device and
commit, as one JSON object. Under torchrun every sample is counted exactly once.
"""
import os
import re

from rvit import distributed
from rvit.checkpoint import provenance, write_json
from rvit.cli import parser, run_cli
from rvit.config import (add_examples_args, add_masking_args, add_runtime_args, check,
                         device_and_amp, mask_list, masker_from_args, masking_from_run,
                         trained_mask)
from rvit.data import DeviceTransform, H5Dataset, eval_loader
from rvit.engine import calibrate_dynamic, evaluate, rate_text
from rvit.models import load_run
from rvit.tasks import report_metrics


def parse_args(argv=None):
    p = parser("Evaluate an RViT checkpoint on one split, at one or several mask ratios. "
               "Masking flags left out take the checkpoint's values.")
    p.add_argument("--checkpoint", required=True, help="RUN/best.pt or RUN/last.pt")
    p.add_argument("--data-dir", default=None,
                   help="folder with SPLIT.h5 (default data/DATASET; paths stored in a "
                        "checkpoint are never used)")
    p.add_argument("--split", default="test", help="split file name without .h5")
    p.add_argument("--out", default=None,
                   help="JSON file for the results: one object, or a list of one per mask "
                        "ratio for a sweep (default: beside the checkpoint)")
    add_examples_args(p, "samples")
    add_masking_args(p, mask_list)
    add_runtime_args(p)
    return p.parse_args(argv)


def make_masker(args, m, ckpt, model, data_dir, transform, device):
    """TokenMasker for ratio m; a dynamic threshold comes from the checkpoint when it was trained
    at m, else it is calibrated on the train split. Returns (masker, where tau came from)."""
    cfg = ckpt["config"]
    masker = masker_from_args(args, m, cfg["patch_size"]).to(device)
    if args.strategy != "dynamic" or m == 0:
        return masker, None
    if cfg["strategy"] == "dynamic" and cfg["mask"] == m:
        masker.load_state_dict(ckpt["masker"])
        return masker, "checkpoint"
    train = H5Dataset(os.path.join(data_dir, "train.h5"), cfg["dataset"])
    loader = eval_loader(train, args.batch_size or cfg["batch_size"], 0, device)
    return masker, f"train split, {calibrate_dynamic(model, masker, loader, transform)} batches"


def main(args):
    ckpt, model = load_run(args.checkpoint)
    cfg, meta = ckpt["config"], ckpt["meta"]
    # the names the table prints, checked before any data is read (an older run may hold any)
    metrics = report_metrics(meta["task"], cfg.get("metrics"), where=f"{args.checkpoint}: "
                             f"config (from {cfg.get('config')}) datasets.{cfg.get('dataset')}.")[1]
    masking_from_run(args, cfg, as_list=True)
    check(args)
    device_name, amp = device_and_amp(args)
    rank, world, device = distributed.setup(device_name)
    dataset = cfg["dataset"]
    if not re.fullmatch(r"[a-z0-9_]+", str(dataset)):  # it becomes part of a path below
        raise ValueError(f"{args.checkpoint}: odd dataset name {dataset!r}")
    data_dir = args.data_dir or os.path.join("data", dataset)
    ds = H5Dataset(os.path.join(data_dir, f"{args.split}.h5"), cfg["dataset"], args.preload)
    for key in ("bands", "classes"):
        if ds.meta[key] != meta[key]:
            raise ValueError(f"{ds.path}: {key} {ds.meta[key]} differ from the checkpoint's "
                             f"{meta[key]} ({args.checkpoint})")
    model.to(device)
    loader = eval_loader(ds, args.batch_size or cfg["batch_size"],
                         cfg["workers"] if args.workers is None else args.workers, device)
    transform = DeviceTransform(meta["mean"], meta["std"], cfg["img_size"], device)
    rows = []
    for m in args.mask:
        masker, tau_source = make_masker(args, m, ckpt, model, data_dir, transform, device)
        examples = args.save_examples
        if examples and len(args.mask) > 1:
            examples = os.path.join(examples, f"m{m:g}")
        result = evaluate(model, masker, loader, transform, meta, amp, desc=f"{args.split} m{m:g}",
                          examples_dir=examples, num_examples=args.num_examples)
        rows.append({"dataset": cfg["dataset"], "task": meta["task"], "split": args.split,
                     "checkpoint": args.checkpoint, "mask_ratio": m,
                     "train_mask_ratio": cfg["mask"],
                     "train_mask_range": cfg.get("mask_range"), "merge": args.merge,
                     "prop_attn": args.prop_attn, "strategy": args.strategy,
                     "train_strategy": cfg["strategy"], "tau_source": tau_source,
                     "tau": float(masker.tau) if tau_source else None, "amp": amp,
                     "world_size": world, **result, **provenance(device)})
        if rank == 0:
            print_table(rows[-1], metrics, meta["classes"])
    if rank == 0:
        tag = f"m{args.mask[0]:g}" if len(args.mask) == 1 else "sweep"
        out = args.out or os.path.join(os.path.dirname(args.checkpoint),
                                       f"eval-{args.split}-{args.strategy}-{tag}.json")
        write_json(rows[0] if len(rows) == 1 else rows, out)
        print(f"wrote {out}")
    distributed.cleanup()


def print_table(record, metrics, classes):
    """The record's metrics in %, `metrics` first; per class F1 and IoU when the record holds
    them, and for multiclass data the confusion matrix."""
    tau = f", tau {record['tau']:.4f} from the {record['tau_source']}" if record["tau_source"] \
        else ""
    trained = trained_mask(record["train_mask_ratio"], record.get("train_mask_range"))
    merge = "+merge" if record.get("merge") else ""
    print(f"{record['dataset']} {record['split']}: {record['num_samples']} samples, "
          f"mask {record['mask_ratio']:g} ({record['strategy']}{merge}{tau}; model trained at "
          f"mask {trained}), "
          f"kept share {record['kept_share']:.3f}, {record['gflops']:.3f} GFLOPs/image, "
          f"{rate_text(record['images_per_s'])}")
    extra = [k for k in record if k.startswith(("mAP", "F1", "mIoU", "OA", "jaccard"))
             and k not in metrics and isinstance(record[k], float)]
    for key in list(metrics) + extra:
        print(f"  {key:<18} {100 * record[key]:7.2f}")
    per_class = [k for k in ("F1_per_class", "IoU_per_class") if k in record]
    if per_class:
        print(f"  {'per class':<30}" + "".join(f"{k.split('_')[0]:>8}" for k in per_class))
        for i, name in enumerate(classes):
            print(f"  {name[:30]:<30}" + "".join(f"{100 * record[k][i]:8.2f}" for k in per_class))
    if record["task"] == "multiclass":  # images, not pixels: a matrix worth reading
        print("  confusion matrix: rows reference, columns predicted, classes in the order above")
        for name, row in zip(classes, record["confusion_matrix"]):
            print(f"  {name[:30]:<30}" + "".join(f"{v:>6}" for v in row))


if __name__ == "__main__":
    run_cli("evaluate.py", main, parse_args())
