"""Command-line flags (the one list of them) and the per-dataset defaults of config.yaml.

A flag left out on the command line takes the dataset's value in config.yaml, else the file's
`defaults`. Unknown YAML keys, unknown datasets and out-of-range values are errors that name the
file, key or flag.
"""
import argparse
import os

import torch
import yaml

from rvit.cli import parser
from rvit.masking import SCORE_REDUCES, SCORE_SPACES, STRATEGIES, TokenMasker, num_keep
from rvit.upernet import FILLS
from rvit.preemption import DEFAULT_SIGNALS, EXIT_PREEMPTED, signal_names
from rvit.vit import MODELS

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "config.yaml")
TRAIN_KEYS = {"model", "img_size", "patch_size", "mask", "mask_range", "merge", "prop_attn",
              "strategy", "score_space", "score_reduce", "epochs", "batch_size", "lr",
              "weight_decay", "warmup_epochs", "workers", "seed", "fill", "decoder_channels",
              "aux", "out_indices"}
DATASET_KEYS = TRAIN_KEYS | {"main_metric", "metrics"}  # the HDF5 file says the task


def load_config(path) -> dict:
    """Parse and check config.yaml. Raises FileNotFoundError or ValueError naming file and key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    for key in cfg:
        if key not in ("defaults", "datasets"):
            raise ValueError(f"{path}: unknown key {key!r} (expected 'defaults', 'datasets')")
    for key in cfg.get("defaults", {}):
        if key not in TRAIN_KEYS:
            raise ValueError(f"{path}: unknown key 'defaults.{key}'")
    for name, section in cfg.get("datasets", {}).items():
        for key in section:
            if key not in DATASET_KEYS:
                raise ValueError(f"{path}: unknown key 'datasets.{name}.{key}'")
    return cfg


def dataset_config(cfg, dataset, path="config.yaml") -> dict:
    """`defaults` overlaid with the dataset's section. Raises ValueError for an unknown dataset."""
    datasets = cfg.get("datasets", {})
    if dataset not in datasets:
        raise ValueError(f"{path}: unknown dataset {dataset!r}; known: {sorted(datasets)}")
    return {**cfg.get("defaults", {}), **datasets[dataset]}


def resume_mode(text):
    """argparse type of --resume's optional value: only 'auto'."""
    if text != "auto":
        raise argparse.ArgumentTypeError(f"expected 'auto' or no value, got {text!r}")
    return text


def mask_list(text):
    """'0,0.5,0.75' -> [0.0, 0.5, 0.75] (argparse type of evaluate.py's --mask)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ratios: {text!r}")


def add_masking_args(p, mask_type=float):
    p.add_argument("--mask", type=mask_type, default=None,
                   help="mask ratio m in [0, 1): share of patch tokens dropped per image; 0 "
                        "runs the plain ViT" + (" (several, comma-separated: one row each)"
                                                if mask_type is mask_list else ""))
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="which tokens to drop: similarity (the most redundant), dynamic "
                        "(those above a learned redundancy threshold), random, coverage "
                        "(keep one token of every region: greedy k-center), kmedoids (keep "
                        "the tokens that best represent all others: greedy k-medoids)")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                   help="average each dropped token into its most similar kept token (ToMe) "
                        "instead of discarding it")
    p.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="with --merge: add log(size) to the attention logits of merged "
                        "tokens (ToMe's proportional attention)")
    p.add_argument("--score-space", choices=SCORE_SPACES, default=None,
                   help="redundancy scored on patch embeddings or on standardised pixels")
    p.add_argument("--score-reduce", choices=SCORE_REDUCES, default=None,
                   help="redundancy = mean or max cosine similarity to the image's other patches")


def add_examples_args(p, what):
    """--save-examples DIR and --num-examples: PNGs of the first `what` (samples, tiles)."""
    p.add_argument("--save-examples", default=None, metavar="DIR",
                   help=f"write PNGs of the first {what} (image, kept tokens, prediction, "
                        "reference if any) to DIR; needs matplotlib (or Pillow: plainer)")
    p.add_argument("--num-examples", type=int, default=4, help="how many with --save-examples")


def add_runtime_args(p, loader=True):
    """Batch size, device, precision and --debug; with `loader`, --workers and --preload."""
    p.add_argument("--batch-size", type=int, default=None, help="images per step per process")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None,
                   help="autocast precision; default bf16 on CUDA, none on CPU")
    if loader:
        p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
        p.add_argument("--preload", action="store_true",
                       help="read each split into memory once (when it fits), not from disk")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def train_parser():
    p = parser("Train a redundancy-aware ViT (RViT). Flags left out take the dataset's "
               "defaults from config.yaml.")
    p.epilog = (f"Exit status: 0 trained (or nothing left to train); 1 an error, named in one "
                f"line; 2 a bad flag; {EXIT_PREEMPTED} (EX_TEMPFAIL) stopped by a signal of "
                "--preempt-signals after writing OUT/last.pt: continue with --resume auto.")
    p.add_argument("--dataset", required=True, help="dataset name, a section of config.yaml")
    p.add_argument("--data-dir", default=None,
                   help="folder with train.h5 / val.h5 from prepare_data.py (default data/DATASET)")
    p.add_argument("--out", default=None,
                   help="run folder for config.yaml, log.jsonl, last.pt, best.pt "
                        "(default runs/DATASET-STRATEGY-mMASK)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="per-dataset defaults (YAML)")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="ViT size")
    p.add_argument("--img-size", type=int, default=None, help="input side in pixels (resized)")
    p.add_argument("--patch-size", type=int, default=None, help="patch side in pixels")
    add_masking_args(p)
    p.add_argument("--mask-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="draw each training batch's mask ratio from U[LO, HI) (alike on every "
                        "process): one model for every ratio; --mask is the validation ratio")
    seg = p.add_argument_group("segmentation (RUPerNet)")
    seg.add_argument("--fill", choices=FILLS, default=None,
                     help="dropped grid positions take the feature of the most similar kept "
                          "patch (nearest), a learned mask token, or zeros; with --merge every "
                          "position takes the token it was merged into")
    seg.add_argument("--decoder-channels", type=int, default=None, help="UPerHead width")
    seg.add_argument("--aux", action=argparse.BooleanOptionalAction, default=None,
                     help="auxiliary FCN head on the stride-16 map (loss weight 0.4)")
    seg.add_argument("--out-indices", type=int, nargs=4, default=None,
                     help="the four ViT blocks (0-based) that feed the pyramid")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="single-label (multiclass) data only: share of each target spread "
                        "evenly over all classes in the cross-entropy, in [0, 1)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up length in epochs, then cosine decay to 0")
    p.add_argument("--seed", type=int, default=None, help="seed for weights, order, masks")
    p.add_argument("--pretrained", default=None,
                   help="local timm/DeiT/Google ViT weights (.pth .pt .bin .npz .safetensors)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training (checkpoints hold the plain "
                        "module's weights)")
    run = p.add_argument_group("run folder and cluster jobs")
    run.add_argument("--resume", nargs="?", const=True, default=False, type=resume_mode,
                     metavar="auto",
                     help="continue from OUT/last.pt (it must exist) at the batch after the "
                          "one it was saved at; '--resume auto' also starts fresh in an empty "
                          "OUT: one command line for a job and its restarts (torchrun "
                          "--max-restarts, a requeue)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run OUT holds: its config.yaml, log.jsonl, last.pt, "
                          "best.pt and curves.png are removed (other files stay); without "
                          "--resume or this, train.py refuses a folder that holds a run")
    run.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                     help="draw OUT/curves.png (loss, validation metric, kept share, images/s "
                          "per epoch) after every epoch; needs matplotlib, about a second a run")
    run.add_argument("--checkpoint-every", type=int, default=500,
                     help="also write OUT/last.pt every this many batches within an epoch "
                          "(0: only at epoch ends)")
    run.add_argument("--preempt-signals", type=signal_names, default=DEFAULT_SIGNALS,
                     help="signals on which every process finishes its step, OUT/last.pt is "
                          f"written at that batch and train.py exits {EXIT_PREEMPTED}: "
                          "comma-separated names, or 'none' (default %(default)s)")
    add_runtime_args(p)
    return p


def resolve(args, cfg_path) -> argparse.Namespace:
    """Fill flags left as None from config.yaml and check ranges. Raises ValueError."""
    ds = dataset_config(load_config(cfg_path), args.dataset, cfg_path)
    for key, value in ds.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    check(args)
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    args.out = args.out or os.path.join("runs", f"{args.dataset}-{args.strategy}-{run_tag(args)}")
    return args


def trained_mask(mask, mask_range=None):
    """A model's training mask ratio as text: '0.6', or '0-0.9' for a --mask-range."""
    return f"{mask_range[0]:g}-{mask_range[1]:g}" if mask_range else f"{mask:g}"


def run_tag(args):
    """'m0.6', 'm0-0.9' for a mask range, with '-merge' when merging: a run folder's suffix."""
    return f"m{trained_mask(args.mask, args.mask_range)}" + ("-merge" if args.merge else "")


def masking_from_run(args, cfg, as_list=False):
    """Fill the masking flags left out with a run's own (`cfg`, its resolved config; a key it
    lacks is False); with `as_list`, --mask becomes a one-element list, as a sweep's is."""
    for key in ("mask", "strategy", "score_space", "score_reduce", "merge", "prop_attn"):
        if getattr(args, key) is None:
            value = cfg.get(key, False)
            setattr(args, key, [value] if key == "mask" and as_list else value)


def masker_from_args(args, mask_ratio, patch_size, reduce=None):
    """The `TokenMasker` the resolved masking flags describe, at `mask_ratio`; `reduce`
    averages its dynamic threshold over processes (see `TokenMasker`)."""
    return TokenMasker(args.strategy, mask_ratio, patch_size, args.score_space,
                       args.score_reduce, merge=args.merge, prop_attn=args.prop_attn,
                       reduce=reduce)


def device_and_amp(args):
    """(device name, autocast precision) from --device / --amp and their defaults: cuda when
    available, else cpu; bf16 on CUDA, none (fp32) elsewhere."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, args.amp or ("bf16" if device == "cuda" else "none")


def check(args):
    """Range checks shared by train.py and evaluate.py; ValueError names the flag."""
    for m in args.mask if isinstance(args.mask, list) else [args.mask]:
        try:
            num_keep(1, m)
        except ValueError as e:
            raise ValueError(f"--mask {m}: {e}") from e
    if args.prop_attn and not args.merge:
        raise ValueError("--prop-attn weighs merged tokens: it needs --merge")
    if args.merge and getattr(args, "fill", None) == "mask_token":
        raise ValueError("--merge puts every grid position back from the token it was merged "
                         "into: --fill mask_token would never be used (use nearest)")
    if getattr(args, "mask_range", None):
        lo, hi = args.mask_range
        if not 0 <= lo < hi < 1:
            raise ValueError(f"--mask-range {lo:g} {hi:g}: need 0 <= LO < HI < 1")
    if getattr(args, "mask_range", None) and args.strategy == "dynamic":
        raise ValueError("--mask-range with --strategy dynamic: the dynamic threshold is "
                         "learned for one ratio; use similarity, random, coverage or kmedoids")
    for flag in ("batch_size", "epochs", "img_size", "patch_size"):
        value = getattr(args, flag, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if getattr(args, "seed", None) is not None and args.seed < 0:  # numpy's generators need it
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    if not 0 <= getattr(args, "label_smoothing", 0.0) < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if getattr(args, "img_size", None) and args.img_size % args.patch_size:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of "
                         f"--patch-size {args.patch_size}")
