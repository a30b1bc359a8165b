"""Train a redundancy-aware ViT (RViT) on one dataset prepared by prepare_data.py.

    python train.py --dataset bigearthnet --mask 0.6 --strategy similarity
    torchrun --nproc_per_node=4 train.py --dataset bigearthnet --mask 0.6

Writes RUN/config.yaml (resolved flags, versions, commit, device), RUN/log.jsonl (one line per
epoch), RUN/last.pt (every epoch) and RUN/best.pt (best validation score of the dataset's main
metric); `--resume` continues from RUN/last.pt, `--resume auto` also starts an empty RUN (one
command for a cluster job and its restarts). A RUN holding a run is never reused without
`--resume` or `--overwrite`. On SIGTERM / SIGUSR1 every rank finishes its step, last.pt is written
there and the exit status is 75 (rvit/preemption.py). AdamW with linear warm-up and cosine
decay, AMP (bf16 by default on CUDA), DDP under torchrun.
"""
import math
import os
import random
import sys

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from rvit import distributed, run_folder
from rvit.atomic import atomic_write
from rvit.checkpoint import atomic_save, load_checkpoint, load_pretrained, provenance
from rvit.cli import run_cli
from rvit.config import device_and_amp, masker_from_args, resolve, run_tag, train_parser
from rvit.data import DeviceTransform, H5Dataset, eval_loader, read_meta, train_loader
from rvit.engine import (NonFiniteLoss, evaluate, mask_ratio_at, peak_memory_mb, rate_text,
                         train_one_epoch)
from rvit.models import build_model, encoder
from rvit.preemption import EXIT_PREEMPTED, Preempted, Preemption
from rvit.tasks import criterion, report_metrics


def lr_lambda(warmup_steps, total_steps):
    """Multiplier of the peak lr at a step: linear warm-up, then cosine decay to 0."""
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def param_groups(model, weight_decay):
    """No weight decay on 1-d parameters (biases, norms, a mask token) nor on the names of the
    model's `no_weight_decay()` (positions and class token, timm's convention)."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def rng_state():
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# flags a resume must keep: they decide what the remaining steps do (which tokens are dropped,
# the optimiser, the learning-rate schedule); a longer --epochs only extends the run
RESUME_FLAGS = ("mask", "mask_range", "strategy", "score_space", "score_reduce", "merge",
                "prop_attn", "lr", "weight_decay", "warmup_epochs")


def flag_text(key, value):
    """A flag as a command line spells it: '--mask 0.5', '--mask-range 0 0.9', '--no-merge'."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    values = ["none"] if value is None else value if isinstance(value, (list, tuple)) else [value]
    return " ".join([flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in values)])


def changed_flags(ckpt, args):
    """The flags of RESUME_FLAGS (and --fill, for segmentation) on which `args` differ from the
    run that wrote `ckpt`: (as trained, as given), in command-line spelling. A key the
    checkpoint's config lacks (a run older than the flag) is not compared."""
    cfg = ckpt.get("config", {})
    keys = RESUME_FLAGS + (("fill",) if ckpt["meta"].get("task") == "segmentation" else ())
    return [(flag_text(k, cfg[k]), flag_text(k, getattr(args, k)))
            for k in keys if k in cfg and cfg[k] != getattr(args, k)]


def check_resume_flags(ckpt, args, path):
    """A resume continues the run with its own masking, optimiser and schedule (RESUME_FLAGS):
    read from the checkpoint alone, so it is checked before any data is.

    Raises:
        ValueError: one line naming the file and each differing flag, as trained and as given.
    """
    changed = changed_flags(ckpt, args)
    if changed:
        raise ValueError(f"{path}: trained with {' '.join(old for old, _ in changed)}, not "
                         f"{' '.join(new for _, new in changed)} (a resume keeps the run's "
                         "flags; a longer --epochs is allowed)")


def this_job(ckpt, args):
    """Whether `ckpt` was written by this torchrun job (its rendezvous id) with these flags.
    torchrun reruns an --overwrite command after a failure: such a last.pt is the replacement
    to continue; any other is the run --overwrite was asked to replace, left there because the
    failed attempt died before removing it."""
    job = run_folder.job_id()
    return bool(job) and ckpt.get("torchrun_id") == job and not changed_flags(ckpt, args)


def check_resume(ckpt, args, meta, path):
    """A checkpoint must match the run it continues: dataset, task, bands and classes, and the
    flags that give the weights their shapes.

    Raises:
        ValueError: naming the file and what differs.
    """
    cfg = ckpt.get("config", {})
    if cfg.get("dataset") != args.dataset:
        raise ValueError(f"{path}: trained on {cfg.get('dataset')!r}, not {args.dataset!r}")
    if ckpt["meta"].get("task") != meta["task"]:
        raise ValueError(f"{path}: a {ckpt['meta'].get('task')} run, not {meta['task']}")
    for key in ("bands", "classes"):
        if ckpt["meta"][key] != meta[key]:
            raise ValueError(f"{path}: {key} differ from {args.data_dir}'s")
    shaped = ("model", "img_size", "patch_size") + (
        ("decoder_channels", "aux", "out_indices") if meta["task"] == "segmentation" else ())
    for key in shaped:
        if key in cfg and cfg[key] != getattr(args, key):
            raise ValueError(f"{path}: trained with --{key.replace('_', '-')} {cfg[key]}, "
                             f"not {getattr(args, key)}")


def agree_on_start(global_step, path):
    """Every rank must start at the same step: ranks on nodes that see different files in OUT
    would otherwise train apart, then hang. Raises ValueError on every rank."""
    t = torch.tensor(global_step)
    low, high = distributed.all_reduce(t.clone(), "min"), distributed.all_reduce(t.clone(), "max")
    if low != high:
        raise ValueError(f"{path}: the processes found different checkpoints (steps {int(low)} "
                         f"to {int(high)}); --out must be a folder every node sees")


def main(args):
    resolve(args, args.config)
    # every rank reads the folder before rank 0 writes to it (agree_on_start orders the two)
    action = run_folder.plan(args.out, args.resume, args.overwrite)
    device_name, amp = device_and_amp(args)
    rank, world, device = distributed.setup(device_name)
    preemption = Preemption(args.preempt_signals)
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    ckpt = load_checkpoint(last_path) if action in ("continue", "restart") else None
    if action == "restart" and not this_job(ckpt, args):
        action, ckpt = "replace", None
    agree_on_start(-1 if ckpt is None else ckpt["global_step"], last_path)
    if ckpt is not None:  # after agreeing: every rank holds the same checkpoint, so all fail
        check_resume_flags(ckpt, args, last_path)
    # config.yaml's metric names against the task in the file's attributes, before any data is
    # read; a section without metrics (such as `folder`) reports the task's defaults
    task = read_meta(os.path.join(args.data_dir, "train.h5"), args.dataset)["task"]
    args.main_metric, args.metrics = report_metrics(
        task, getattr(args, "metrics", None), getattr(args, "main_metric", None),
        f"{args.config}: datasets.{args.dataset}.")
    torch.manual_seed(args.seed)  # same initial weights on every rank
    train_ds = H5Dataset(os.path.join(args.data_dir, "train.h5"), args.dataset, args.preload)
    val_ds = H5Dataset(os.path.join(args.data_dir, "val.h5"), args.dataset, args.preload)
    meta = {k: train_ds.meta[k] for k in ("dataset", "task", "bands", "classes", "mean", "std")}
    meta["ignore_index"] = train_ds.meta.get("ignore_index")
    meta["tile_size"] = train_ds.meta["image_shape"][-1]  # predict.py tiles scenes by it
    if ckpt is not None:
        check_resume(ckpt, args, meta, last_path)
    if ckpt is not None and ckpt["epoch"] >= args.epochs:  # a requeue after the run ended
        distributed.print0(f"{args.out}: the run is complete (epoch {ckpt['epoch']}/"
                           f"{args.epochs}); nothing to train")
        distributed.cleanup()
        return
    loss_fn = criterion(meta, args.label_smoothing)
    if len(val_ds) == 0:  # best.pt is chosen on it; a few own images can leave it empty
        raise ValueError(f"{val_ds.path}: no samples; validation needs at least one (more "
                         "images, a larger --val-fraction, or val rows in the manifest)")
    if len(train_ds) < args.batch_size * world:
        raise ValueError(f"{train_ds.path}: {len(train_ds)} samples, fewer than one batch of "
                         f"{args.batch_size} x {world} processes (lower --batch-size)")
    if meta["task"] == "segmentation" and args.batch_size < 2:
        raise ValueError("--batch-size must be at least 2 for segmentation: the decoder's "
                         "BatchNorm needs more than one value per channel")
    model_without_ddp = build_model(vars(args), meta)
    if args.pretrained and ckpt is None:
        for note in load_pretrained(encoder(model_without_ddp), args.pretrained):
            distributed.print0(f"pretrained: {note}")
    model_without_ddp.to(device)
    masker = masker_from_args(args, args.mask, args.patch_size, distributed.mean)
    masker.to(device)
    loader = train_loader(train_ds, args.batch_size, args.workers, args.seed, device)
    val = eval_loader(val_ds, args.batch_size, args.workers, device)
    transform = DeviceTransform(meta["mean"], meta["std"], args.img_size, device)
    opt = torch.optim.AdamW(param_groups(model_without_ddp, args.weight_decay), lr=args.lr,
                            fused=device.type == "cuda")
    steps = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(int(args.warmup_epochs * steps), args.epochs * steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    start_epoch, skip, best = 0, 0, -math.inf
    if ckpt is not None:
        model_without_ddp.load_state_dict(ckpt["model"])
        masker.load_state_dict(ckpt["masker"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        start_epoch, skip, best = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["best"]
        distributed.print0(f"resumed from {last_path} at epoch {start_epoch + 1}, "
                           f"batch {skip + 1}")
    else:
        torch.manual_seed(args.seed + rank)  # masks and augmentation differ across ranks
    if world > 1 and device.type == "cuda":  # BatchNorm statistics over the global batch
        model_without_ddp = nn.SyncBatchNorm.convert_sync_batchnorm(model_without_ddp)
    # MAE's pair: `model` is what training calls (compiled and / or DDP-wrapped),
    # `model_without_ddp` the plain module that checkpoints save and validation runs
    model, select = model_without_ddp, masker
    if args.compile:
        model = torch.compile(model_without_ddp)
        # selection runs eagerly: the loops of coverage and k-medoids would unroll into the
        # graph, and a ratio that changes per step (--mask-range) would recompile it
        select = torch.compiler.disable(masker)
    if world > 1:
        # in segmentation, blocks after the last tapped one get no gradient, nor does a mask
        # token at a step that drops no token (mask 0, a ratio below 1 / 2N, a --mask-range
        # draw, a batch the dynamic strategy keeps whole). Which steps those are depends on the
        # data, so DDP looks for unused parameters at every step (one walk of the autograd
        # graph) rather than the model adding a zero term for DDP's sake
        seg = meta["task"] == "segmentation"
        unused = seg and (max(args.out_indices) < len(encoder(model_without_ddp).blocks) - 1
                          or getattr(model_without_ddp, "mask_token", None) is not None)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=unused)
    info = provenance(device)
    config = dict(vars(args))
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if action == "replace" and (removed := run_folder.clear(args.out)):
            print(f"--overwrite: removed {', '.join(removed)} of the run in {args.out}",
                  flush=True)
        with atomic_write(os.path.join(args.out, "config.yaml")) as tmp, open(tmp, "w") as f:
            yaml.safe_dump({**config, "amp": amp, "world_size": world, **info}, f, sort_keys=False)
        print(f"RViT {args.model} on {args.dataset}: {len(train_ds)} train / {len(val_ds)} val, "
              f"mask {run_tag(args)[1:]} ({args.strategy}), {info['device']}, "
              f"torch {info['torch']}, commit {info['commit']}, {world} process(es), amp {amp}",
              flush=True)
        if ckpt is not None:
            run_folder.log_event(args.out, "resume", start_epoch + 1, skip,
                                 global_step=ckpt["global_step"], world_size=world, **info)

    def save(epoch, step_in_epoch, is_best=False):
        """last.pt (and best.pt) with everything a resume needs; rank 0 writes, all gather RNG."""
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, rng_state())
        if rank == 0:
            ckpt = {"model": model_without_ddp.state_dict(), "masker": masker.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch,
                    "step_in_epoch": step_in_epoch, "global_step": epoch * steps + step_in_epoch,
                    "best": best, "config": config, "meta": meta, "rng": rngs,
                    "torchrun_id": run_folder.job_id(), **info}
            atomic_save(ckpt, last_path)
            if is_best:
                atomic_save(ckpt, best_path)

    stop_at = None  # (epoch, batches done) where every rank agreed to stop on a signal
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        first = skip if epoch == start_epoch else 0  # a mid-epoch resume skips done batches
        loader.sampler.start = first * args.batch_size
        ratio_at = None if args.mask_range is None else (  # --mask-range: m per step
            lambda step: mask_ratio_at(epoch * steps + step, args.mask_range, args.seed))
        try:
            stats = train_one_epoch(model, model_without_ddp, masker, select, loader, transform,
                                    opt, sched, scaler, amp, epoch, loss_fn, first,
                                    args.checkpoint_every, lambda step: save(epoch, step),
                                    preemption.requested, ratio_at)
        except NonFiniteLoss as e:
            note = f"the last good checkpoint {last_path} is kept" if os.path.exists(last_path) \
                else "no checkpoint had been written yet"
            raise NonFiniteLoss(f"{e}; run stopped, {note}") from e
        except Preempted as e:  # last.pt holds this batch
            stop_at = (epoch, e.batch)
            break
        masker.mask_ratio = args.mask  # validation at --mask, also under --mask-range
        metrics = evaluate(model_without_ddp, masker, val, transform, meta, amp, desc="val")
        score = metrics[args.main_metric]
        is_best = score > best
        best = max(best, score)
        save(epoch + 1, 0, is_best)
        if rank == 0:
            run_folder.append_log(args.out, {
                "epoch": epoch + 1, "dataset": args.dataset, "strategy": args.strategy,
                "train_mask_ratio": args.mask, "train_mask_range": args.mask_range, **stats,
                "val": metrics, "peak_memory_mb": peak_memory_mb(device), **info})
            print(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f}, "
                  f"val {args.main_metric} {100 * score:.2f}{' (best)' if is_best else ''}, "
                  f"kept {stats['kept_share']:.3f}, {rate_text(stats['images_per_s'])}",
                  flush=True)
        # a signal during the epoch's last batch or validation stops here, after the epoch's save
        if epoch + 1 < args.epochs and preemption.requested():
            stop_at = (epoch + 1, 0)
            break
    if stop_at is not None and rank == 0:
        epoch, batch = stop_at
        run_folder.log_event(args.out, "preempted", epoch + 1, batch,
                             global_step=epoch * steps + batch, signal=preemption.name)
        print(f"preempted by {preemption.name} in epoch {epoch + 1} after batch {batch}: "
              f"{last_path} holds it; the same command with --resume auto continues "
              f"(exit {EXIT_PREEMPTED})", flush=True)
    if stop_at is not None:  # no rank exits before rank 0 has written: torchrun would stop it
        distributed.barrier()
    # DDP's reducer holds the process group, and frees it holding the GIL, which can deadlock
    # with a gloo thread that needs the GIL to free a finished collective's tensors: drop the
    # reducer first, so the group dies in cleanup(), whose binding releases the GIL
    del model
    distributed.cleanup()
    if stop_at is not None:
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    run_cli("train.py", main, train_parser().parse_args(),
            (ValueError, OSError, ImportError, RuntimeError, FloatingPointError))
