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

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rvit import distributed
from rvit.checkpoint import load_pretrained
from rvit.cli import run_cli
from rvit.config import masker_from_args, resolve, run_tag, train_parser
from rvit.data import DeviceTransform, H5Dataset, eval_loader, read_meta, train_loader
from rvit.engine import (NonFiniteLoss, evaluate, mask_ratio_at, peak_memory_mb, rate_text,
                         train_one_epoch)
from rvit.lifecycle import Run
from rvit.models import build_model, encoder
from rvit.preemption import Preempted
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


def open_splits(args, run):
    """The train and val splits and the meta a checkpoint records, checked before training:
    config.yaml's metric names against the task in train.h5's attributes (before any sample is
    read), the checkpoint being continued against the splits, and their sizes.

    Raises:
        ValueError: one line naming the file or flag.
    """
    # a section without metrics (such as `folder`) reports the task's defaults
    task = read_meta(os.path.join(args.data_dir, "train.h5"), args.dataset)["task"]
    args.main_metric, args.metrics = report_metrics(
        task, getattr(args, "metrics", None), getattr(args, "main_metric", None),
        f"{args.config}: datasets.{args.dataset}.")
    train_ds = H5Dataset(os.path.join(args.data_dir, "train.h5"), args.dataset, args.preload)
    val_ds = H5Dataset(os.path.join(args.data_dir, "val.h5"), args.dataset, args.preload)
    meta = {k: train_ds.meta[k] for k in ("dataset", "task", "bands", "classes", "mean", "std")}
    meta["ignore_index"] = train_ds.meta.get("ignore_index")
    meta["tile_size"] = train_ds.meta["image_shape"][-1]  # predict.py tiles scenes by it
    run.check_data(meta)
    if len(val_ds) == 0:  # best.pt is chosen on it; a few own images can leave it empty
        raise ValueError(f"{val_ds.path}: no samples; validation needs at least one (more "
                         "images, a larger --val-fraction, or val rows in the manifest)")
    if len(train_ds) < args.batch_size * run.world:
        raise ValueError(f"{train_ds.path}: {len(train_ds)} samples, fewer than one batch of "
                         f"{args.batch_size} x {run.world} processes (lower --batch-size)")
    if meta["task"] == "segmentation" and args.batch_size < 2:
        raise ValueError("--batch-size must be at least 2 for segmentation: the decoder's "
                         "BatchNorm needs more than one value per channel")
    return train_ds, val_ds, meta


def training_state(args, meta, run, steps):
    """What a checkpoint saves, named as its keys: the model (timm weights with --pretrained on a
    fresh run), the masker, AdamW with linear warm-up then cosine decay over `steps` an epoch,
    and the fp16 gradient scaler (a no-op otherwise)."""
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = build_model(vars(args), meta)
    if args.pretrained and run.ckpt is None:
        for note in load_pretrained(encoder(model), args.pretrained):
            distributed.print0(f"pretrained: {note}")
    model.to(run.device)
    masker = masker_from_args(args, args.mask, args.patch_size, distributed.mean).to(run.device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                            fused=run.device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(int(args.warmup_epochs * steps), args.epochs * steps))
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp == "fp16")
    return {"model": model, "masker": masker, "optimizer": opt, "scheduler": sched,
            "scaler": scaler}


def wrap(model_without_ddp, masker, args, run):
    """(model, select): what the training step calls. MAE's pair: `model` is compiled and / or
    DDP-wrapped, `model_without_ddp` the plain module that checkpoints save and validation
    runs; `select` is the masker, kept eager under torch.compile (the loops of coverage and
    k-medoids would unroll into the graph, and a ratio that changes per step would recompile
    it)."""
    model, select = model_without_ddp, masker
    if run.world > 1 and run.device.type == "cuda":  # BatchNorm statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the root
    if args.compile:
        model, select = torch.compile(model), torch.compiler.disable(masker)
    if run.world > 1:
        # in segmentation, blocks after the last tapped one get no gradient, nor does a mask
        # token at a step that drops no token (mask 0, a ratio below 1 / 2N, a --mask-range
        # draw, a batch the dynamic strategy keeps whole). Which steps those are depends on the
        # data, so DDP looks for unused parameters at every step (one walk of the autograd
        # graph) rather than the model adding a zero term for DDP's sake
        unused = hasattr(model_without_ddp, "out_indices") and (
            max(args.out_indices) < len(encoder(model_without_ddp).blocks) - 1
            or model_without_ddp.mask_token is not None)
        model = DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                    find_unused_parameters=unused)
    return model, select


def main(args):
    resolve(args, args.config)
    run = Run(args)  # the folder, process group, checkpoint and resume checks: before any data
    train_ds, val_ds, meta = open_splits(args, run)
    if run.complete:
        distributed.print0(f"{args.out}: the run is complete (epoch {run.ckpt['epoch']}/"
                           f"{args.epochs}); nothing to train")
        return run.close()
    loader = train_loader(train_ds, args.batch_size, args.workers, args.seed, run.device)
    val = eval_loader(val_ds, args.batch_size, args.workers, run.device)
    transform = DeviceTransform(meta["mean"], meta["std"], args.img_size, run.device)
    steps = len(loader)
    state = training_state(args, meta, run, steps)
    model_without_ddp, masker, opt = state["model"], state["masker"], state["optimizer"]
    start_epoch, skip, best = run.restore(state)
    model, select = wrap(model_without_ddp, masker, args, run)
    run.begin(meta, f"RViT {args.model} on {args.dataset}: {len(train_ds)} train / "
                    f"{len(val_ds)} val, mask {run_tag(args)[1:]} ({args.strategy})")
    loss_fn, stop_at = criterion(meta, args.label_smoothing), None
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        first = skip if epoch == start_epoch else 0  # a mid-epoch resume skips done batches
        loader.sampler.start = first * args.batch_size
        ratio_at = None if args.mask_range is None else (  # --mask-range: m per step
            lambda step: mask_ratio_at(epoch * steps + step, args.mask_range, args.seed))
        try:
            stats = train_one_epoch(
                model, model_without_ddp, masker, select, loader, transform, opt,
                state["scheduler"], state["scaler"], run.amp, epoch, loss_fn, first,
                args.checkpoint_every, lambda done: run.save(state, epoch, done, steps, best),
                run.stop_requested, ratio_at)
        except NonFiniteLoss as e:
            note = f"the last good checkpoint {run.last_path} is kept" \
                if os.path.exists(run.last_path) else "no checkpoint had been written yet"
            raise NonFiniteLoss(f"{e}; run stopped, {note}") from e
        except Preempted as e:  # last.pt holds this batch
            stop_at = (epoch, e.batch)
            break
        masker.mask_ratio = args.mask  # validation at --mask, also under --mask-range
        metrics = evaluate(model_without_ddp, masker, val, transform, meta, run.amp, desc="val")
        score = metrics[args.main_metric]
        is_best, best = score > best, max(best, score)
        run.save(state, epoch + 1, 0, steps, best, is_best)
        run.log_epoch({"epoch": epoch + 1, "dataset": args.dataset, "strategy": args.strategy,
                       "train_mask_ratio": args.mask, "train_mask_range": args.mask_range,
                       **stats, "val": metrics, "peak_memory_mb": peak_memory_mb(run.device)})
        distributed.print0(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f}, val "
                           f"{args.main_metric} {100 * score:.2f}{' (best)' * is_best}, kept "
                           f"{stats['kept_share']:.3f}, {rate_text(stats['images_per_s'])}")
        # a signal during the epoch's last batch or validation stops here, after the epoch's save
        if epoch + 1 < args.epochs and run.stop_requested():
            stop_at = (epoch + 1, 0)
            break
    del model  # DDP's reducer before the process group (see Run.close)
    run.close(stop_at, steps)


if __name__ == "__main__":
    run_cli("train.py", main, train_parser().parse_args(),
            (ValueError, OSError, ImportError, RuntimeError, FloatingPointError))
