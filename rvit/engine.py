"""The training and evaluation loops (MAE's `engine` split): one epoch of training, one pass of
evaluation, the --mask-range schedule, and autocast set-up.

Every sample a loader yields is counted once; under torchrun the loaders shard without padding
(rvit/data.py), and the meters pool counts and scores over ranks (rvit/metrics.py).
"""
import math
import re
import resource
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

from rvit import distributed
from rvit.cli import progress_bar
from rvit.figures import save_examples
from rvit.flops import vit_flops
from rvit.masking import Selection
from rvit.models import encoder, encoder_depth
from rvit.preemption import Preempted
from rvit.tasks import meter as task_meter

# a rate from less time, or from fewer batches after the first (the last one alone is often a
# short batch, whose fixed costs inflate its time per image), is noise, not a measurement
MIN_TIMED_S, MIN_TIMED_BATCHES = 1.0, 2


def rate_text(images_per_s):
    """'12.3 img/s' (three significant digits, never a rounded 0), or 'n/a img/s' when the
    loop was too short to time (None)."""
    if images_per_s is None:
        return "n/a img/s"
    return f"{images_per_s:.3g} img/s" if images_per_s < 100 else f"{images_per_s:.0f} img/s"


def autocast(device, amp):
    """Autocast context for "bf16" or "fp16" on `device`, or a no-op for "none"."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def peak_memory_mb(device):
    """Peak allocated CUDA memory, or on CPU the process's peak resident set, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mask_ratio_at(step: int, mask_range, seed: int) -> float:
    """The mask ratio of training step `step` under --mask-range: m ~ U[LO, HI) drawn from a
    generator seeded by (seed, step) alone, so every DDP rank draws the same m (equal work per
    step) and a resumed run the same sequence, without any state to save."""
    lo, hi = mask_range
    return float(np.random.default_rng([seed, step]).uniform(lo, hi))


class KeptTokens:
    """A loop's running record of what the selection kept, pooled over ranks by `compute`: the
    share of patch tokens each image kept (mean, min, max) and the mean encoder GFLOPs per image
    at those counts (rvit/flops.py)."""

    def __init__(self, model, device):
        self.vit, self.depth = encoder(model), encoder_depth(model)
        self.num_patches = self.vit.patch_embed.num_patches
        self.share = torch.zeros((), device=device, dtype=torch.float64)  # summed over images
        self.flops = torch.zeros((), device=device, dtype=torch.float64)
        self.images = torch.zeros((), device=device, dtype=torch.int64)
        self.min, self.max = self.share + math.inf, self.share - math.inf

    def update(self, keep, batch):
        """`keep`: a pass's selection (None: every token kept) of `batch` images. Returns it as
        a `Selection`."""
        if keep is None:
            keep = Selection.full(batch, self.num_patches, self.share.device)
        num_kept = keep.num_kept.double()  # (B,)
        share = num_kept / self.num_patches
        self.share += share.sum()
        self.flops += vit_flops(self.vit, num_kept, self.depth).sum()
        self.images += batch
        self.min, self.max = self.min.minimum(share.min()), self.max.maximum(share.max())
        return keep

    def compute(self):
        """kept_share, kept_share_min, kept_share_max, gflops over every rank's images."""
        n = max(int(distributed.all_reduce(self.images)), 1)
        return {"kept_share": float(distributed.all_reduce(self.share)) / n,
                "kept_share_min": float(distributed.all_reduce(self.min, "min")),
                "kept_share_max": float(distributed.all_reduce(self.max, "max")),
                "gflops": float(distributed.all_reduce(self.flops)) / n / 1e9}


class NonFiniteLoss(FloatingPointError):
    pass


def check_finite(first_bad, model, epoch, done):
    """Raise NonFiniteLoss if a loss so far, or a weight now, is not finite (a device sync:
    call it sparingly). A finite loss can still give NaN gradients, e.g. from inf pixels in
    dropped patches, so the weights are checked too before anything is checkpointed."""
    bad = int(first_bad)
    if bad >= 0:
        raise NonFiniteLoss(f"loss is not finite at epoch {epoch + 1}, batch {bad + 1}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise NonFiniteLoss(f"weights are not finite at epoch {epoch + 1}, batch {done}")


def train_one_epoch(model, model_without_ddp, masker, select, loader, transform, opt, sched,
                    scaler, amp, epoch, loss_fn, first=0, every=0, save=None, stop=None,
                    ratio_at=None):
    """One pass over this rank's shard, from batch `first` (after a mid-epoch resume), with
    `select` the hook `model` calls (`masker`, or it wrapped to run eagerly under torch.compile),
    `loss_fn(output, targets)` the task's loss (rvit/tasks.py), calling `save(batches done)`
    every `every` batches, and after any batch but the last at which `stop()` (collective,
    called after each such batch) says to stop; with `ratio_at`, the masker's ratio is
    `ratio_at(batch)` at each step. Returns mean loss, lr, kept share (mean, min, max over
    images), encoder GFLOPs per image and images/s, pooled over ranks.

    Raises:
        NonFiniteLoss: a loss was NaN or infinite; no checkpoint is written after it.
        Preempted: `stop()` said to stop; `save` has written that batch.
    """
    model.train()
    masker.train()
    dev = transform.device
    loss_sum, kept = torch.zeros((), device=dev), KeptTokens(model_without_ddp, dev)
    first_bad = torch.full((), -1, device=dev)
    n, start = 0, time.perf_counter()
    bar = progress_bar(loader, distributed.rank() == 0, desc=f"epoch {epoch + 1}", leave=False,
                       initial=first, total=first + len(loader))
    for step, (images, targets, _) in enumerate(bar, start=first):
        x, y = transform(images, targets, train=True)
        if ratio_at is not None:
            masker.mask_ratio = ratio_at(step)
        with autocast(dev, amp):
            out, keep = model(x, select=select)
            loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        loss_sum += loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        kept.update(keep, len(x))
        n += 1
        if step % 20 == 0:  # .item() syncs the device: not every step
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if int(first_bad) >= 0:  # the weights are checked only before checkpoints
                check_finite(first_bad, model_without_ddp, epoch, step + 1)
        done = step + 1
        if done < first + len(loader):  # the last batch is saved with the epoch, after validation
            stopping = stop is not None and stop()
            if save is not None and (stopping or every and done % every == 0):
                check_finite(first_bad, model_without_ddp, epoch, done)  # never save a broken one
                save(done)
            if stopping:
                raise Preempted(done)
    check_finite(first_bad, model_without_ddp, epoch, first + n)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    world = distributed.world_size()
    return {"loss": float(distributed.all_reduce(loss_sum)) / (n * world),
            "lr": sched.get_last_lr()[0], **kept.compute(),
            "images_per_s": n * loader.batch_size * world / elapsed, "seconds": elapsed}


@torch.no_grad()
def calibrate_dynamic(model, masker, loader, transform, max_batches=20):
    """Set a dynamic masker's tau to the (1 - m)-quantile of the redundancy scores of up to
    `max_batches` batches (no labels are used). Returns the number of batches read."""
    vit = encoder(model)
    scores = []
    for i, (images, targets, _) in enumerate(loader):
        if i == max_batches:
            break
        x, _ = transform(images, targets)
        scores.append(masker.score(vit.patch_embed(x), x).flatten())
    if not scores:
        raise ValueError("cannot calibrate the dynamic threshold: the train split is empty")
    flat = torch.cat(scores)
    if flat.numel() > 2**24:  # torch.quantile's input limit
        flat = flat[torch.randperm(flat.numel(), device=flat.device)[:2**24]]
    q = torch.quantile(flat, 1.0 - masker.mask_ratio)
    masker.tau.copy_(distributed.mean(q))
    return len(scores)


@torch.no_grad()
def evaluate(model, masker, loader, transform, meta, amp, desc="eval", examples_dir=None,
             num_examples=4):
    """Metrics of `model` over every sample that `loader` shards to this rank, all ranks pooled.

    With `examples_dir`, rank 0 also writes PNGs of its first `num_examples` samples
    (rvit/figures.py).

    Returns a dict of the task's metrics (rvit/tasks.py) plus `kept_share` (mean share of patch
    tokens kept), `kept_share_min`, `kept_share_max`, `gflops` (mean encoder GFLOPs per image at
    the kept counts, rvit/flops.py), `num_samples`, `images_per_s` (this rank's loop: loading,
    transform and model, timed from the end of the first batch, which pays one-time costs; None
    when that leaves under MIN_TIMED_S seconds or MIN_TIMED_BATCHES batches), `timed_images`
    (the images it counts) and `peak_memory_mb`.
    """
    model.eval()
    masker.eval()
    meter = task_meter(meta)
    dev = transform.device
    kept = KeptTokens(model, dev)
    start, seen, timed, timed_batches = None, 0, 0, 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for images, targets, index in progress_bar(loader, distributed.rank() == 0, desc=desc,
                                               leave=False):
        x, y = transform(images, targets)
        with autocast(dev, amp):
            out, keep = model(x, select=partial(masker, index=index))
        meter.update(out.float(), y)
        keep = kept.update(keep, len(x))
        if examples_dir and seen < num_examples and distributed.rank() == 0:
            write_examples(examples_dir, keep, x, y, out, index, meta,
                           kept.vit.patch_embed.patch_size, num_examples - seen,
                           f"{masker.strategy} at mask {masker.mask_ratio:g}")
        seen += len(images)
        if start is None:  # the clock starts once the first batch is done
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        else:
            timed, timed_batches = timed + len(images), timed_batches + 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start if start is not None else 0.0
    result = meter.compute()
    result.update(**kept.compute(), peak_memory_mb=peak_memory_mb(dev),
                  images_per_s=timed / elapsed if elapsed >= MIN_TIMED_S and
                  timed_batches >= MIN_TIMED_BATCHES else None,
                  timed_images=timed)
    return result


def write_examples(folder, keep, x, y, out, index, meta, patch, n, caption=""):
    """PNGs of the first n samples of a batch: image, kept tokens (`keep`, the selection the
    batch's forward pass made), prediction (class map, or class probabilities), reference."""
    out = out[:n].float()
    if meta["task"] == "segmentation":
        pred = out.argmax(1)
    else:
        pred = out.softmax(1) if meta["task"] == "multiclass" else torch.sigmoid(out)
    save_examples(folder, x[:n], keep, meta, patch,
                  [f"{re.sub(r'[^A-Za-z0-9_-]', '_', str(meta['dataset']))}_{int(i):06d}"
                   for i in index[:n]],  # a name from a data file never steers the path
                  pred, y[:n], caption)
