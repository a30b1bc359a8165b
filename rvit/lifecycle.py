"""One door for a training run's lifecycle: its folder, process group, checkpoint, resume checks
and preemption (`Run`). The training loop itself is rvit/engine.py; train.py wires the two.

A run folder holds one run of train.py: config.yaml, log.jsonl, last.pt and best.pt. A command
is never silently pointed at a folder that holds a run: without --resume it stops, naming the
flags that continue (--resume) or replace (--overwrite) the run, and changes nothing.
`--resume auto` continues OUT/last.pt when there is one and starts fresh in an empty folder, so
one command line both starts a cluster job and continues it after a restart or requeue. A resume
must keep the run's masking, optimiser and schedule flags (a longer --epochs is allowed).
log.jsonl holds one run: a line per epoch, continued across resumes, and `{"event": ...}` lines
where the run was resumed or preempted, which readers of the epoch lines skip. On a signal of
--preempt-signals every rank stops after the same step (rvit/preemption.py), last.pt holds that
step and the process exits with EXIT_PREEMPTED.
"""
import datetime
import json
import math
import os
import random
import sys

import numpy as np
import torch
import yaml

from rvit import distributed
from rvit.atomic import atomic_write
from rvit.checkpoint import atomic_save, load_checkpoint, provenance
from rvit.config import device_and_amp
from rvit.curves import draw_curves
from rvit.preemption import EXIT_PREEMPTED, Preemption

RUN_FILES = ("config.yaml", "log.jsonl", "last.pt", "best.pt", "curves.png")  # train.py writes
PROGRESS = ("last.pt", "best.pt", "log.jsonl")  # config.yaml alone: a start that saved nothing


def job_id() -> str:
    """The torchrun job of this process: its rendezvous id, the same on every rank and in every
    restart of one torchrun command (a fresh uuid under --standalone or on one node without
    --master-port, the --rdzv-id given otherwise); "" outside torchrun and for torchrun's
    default id "none", which names no job in particular."""
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return "" if job == "none" else job


def plan(out, resume, overwrite) -> str:
    """What train.py does with the folder `out`: "continue" last.pt, "start" a run in it,
    "replace" the run it holds, or "restart": torchrun reran an --overwrite command and last.pt
    may be this job's (continue it) or the run to replace, if the failed attempt died before
    removing it (train.py tells them apart by the job id and flags last.pt records). Reads
    only; call it on every rank before any rank writes.

    Args:
        out: the run folder.
        resume: --resume: False, True (last.pt must exist) or "auto".
        overwrite: --overwrite.

    Raises:
        ValueError: one line naming the folder: it holds a run and neither flag says what to do
            with it, or --resume auto finds a run without last.pt, or both flags are given.
    """
    if overwrite and resume:
        raise ValueError("--overwrite replaces the run that --resume continues: give one of them")
    has_last = os.path.isfile(os.path.join(out, "last.pt"))
    if resume is True or (resume == "auto" and has_last):
        return "continue"  # a missing last.pt under --resume is load_checkpoint's error
    if overwrite and has_last and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return "restart"  # replacing again would drop the run torchrun restarts, if it is one
    held = [name for name in PROGRESS if os.path.exists(os.path.join(out, name))]
    if overwrite:
        return "replace"
    if held and resume == "auto":
        raise ValueError(f"{out}: holds a run ({', '.join(held)}) but no last.pt to continue "
                         "from; --overwrite replaces it, or choose another --out")
    if held:
        raise ValueError(f"{out}: holds a run ({', '.join(held)}); --resume continues it, "
                         "--overwrite replaces it, or choose another --out")
    return "start"


def clear(out) -> list:
    """Remove the files of train.py's previous run in `out` (and any temporary left by a
    killed write); other files stay. Returns the names removed."""
    removed = []
    for name in RUN_FILES:
        for path in (os.path.join(out, name), os.path.join(out, name + ".tmp")):
            if os.path.exists(path):
                os.remove(path)
                removed.append(os.path.basename(path))
    return removed


def append_log(out, record):
    """Append one JSON line to out/log.jsonl. Raises OSError naming the file (disk full)."""
    path = os.path.join(out, "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise OSError(f"{path}: could not append to the log ({e.strerror or e})") from e


def log_event(out, event, epoch, batch, **fields):
    """An event line: the run was resumed or preempted in epoch `epoch` (1-based) after its
    batch `batch`, at a UTC time."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    append_log(out, {"event": event, "epoch": epoch, "batch": batch, **fields, "time": now})


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


# with RESUME_FLAGS, what makes a last.pt the run this command line started
SAME_RUN_KEYS = ("dataset", "data_dir", "model", "img_size", "patch_size", "epochs",
                 "batch_size", "seed", "label_smoothing")


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
    job, cfg = job_id(), ckpt.get("config", {})
    same = all(cfg.get(k) == getattr(args, k, None) for k in SAME_RUN_KEYS)
    return bool(job) and ckpt.get("torchrun_id") == job and same and not changed_flags(ckpt, args)


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


class Run:
    """A training run of train.py from start to exit, on every rank.

    Constructing it decides what to do with the folder (`plan`), starts the process group,
    installs the preemption handlers and, when continuing, loads last.pt and checks it against
    the flags, all before any data is read. Then `check_data` (the checkpoint against the
    splits), `restore` (the training state), `begin` (rank 0 writes config.yaml), `save` and
    `log_epoch` per epoch or checkpoint, and `close`.

    Attributes:
        args, rank, world, device, amp ("bf16", "fp16" or "none"), ckpt (last.pt's dict when
        continuing, else None), info (commit, versions, device), preemption.

    Raises:
        ValueError: one line naming the folder or checkpoint (see `plan`, `check_resume_flags`,
            `agree_on_start`).
    """

    def __init__(self, args):
        self.args = args
        # every rank reads the folder before rank 0 writes to it (agree_on_start orders the two)
        self.action = plan(args.out, args.resume, args.overwrite)
        device_name, self.amp = device_and_amp(args)
        self.rank, self.world, self.device = distributed.setup(device_name)
        self.preemption = Preemption(args.preempt_signals)
        self.last_path = os.path.join(args.out, "last.pt")
        self.best_path = os.path.join(args.out, "best.pt")
        self.ckpt = None
        if self.action in ("continue", "restart"):
            self.ckpt = load_checkpoint(self.last_path)
        if self.action == "restart" and not this_job(self.ckpt, args):
            self.action, self.ckpt = "replace", None
        agree_on_start(-1 if self.ckpt is None else self.ckpt["global_step"], self.last_path)
        if self.ckpt is not None:  # after agreeing: every rank holds the same one, so all fail
            check_resume_flags(self.ckpt, args, self.last_path)
        self.info = provenance(self.device)

    def check_data(self, meta):
        """The checkpoint being continued against the splits' meta (see `check_resume`)."""
        if self.ckpt is not None:
            check_resume(self.ckpt, self.args, meta, self.last_path)

    @property
    def complete(self) -> bool:
        """last.pt has every epoch asked for: a requeue after the run ended."""
        return self.ckpt is not None and self.ckpt["epoch"] >= self.args.epochs

    def restore(self, state):
        """Load last.pt into `state` (name -> object with `load_state_dict`, named as the
        checkpoint's keys: model, masker, optimizer, scheduler, scaler) and this rank's RNG, or
        seed this rank's RNG for a fresh run. Returns (start epoch, batches of it done, best
        validation score so far)."""
        if self.ckpt is None:
            torch.manual_seed(self.args.seed + self.rank)  # masks and augmentation differ by rank
            return 0, 0, -math.inf
        for name, obj in state.items():
            obj.load_state_dict(self.ckpt[name])
        rngs = self.ckpt["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        epoch, skip = self.ckpt["epoch"], self.ckpt["step_in_epoch"]
        distributed.print0(f"resumed from {self.last_path} at epoch {epoch + 1}, batch {skip + 1}")
        return epoch, skip, self.ckpt["best"]

    def begin(self, meta, summary):
        """Rank 0 makes the folder, clears the run --overwrite replaces, writes config.yaml and
        prints `summary` with the provenance; a resume is logged as an event."""
        self.meta = meta
        if self.rank != 0:
            return
        out = self.args.out
        os.makedirs(out, exist_ok=True)
        if self.action == "replace" and (removed := clear(out)):
            print(f"--overwrite: removed {', '.join(removed)} of the run in {out}", flush=True)
        with atomic_write(os.path.join(out, "config.yaml")) as tmp, open(tmp, "w") as f:
            yaml.safe_dump({**vars(self.args), "amp": self.amp, "world_size": self.world,
                            **self.info}, f, sort_keys=False)
        info = self.info
        print(f"{summary}, {info['device']}, torch {info['torch']}, commit {info['commit']}, "
              f"{self.world} process(es), amp {self.amp}", flush=True)
        if self.ckpt is not None:
            log_event(out, "resume", self.ckpt["epoch"] + 1, self.ckpt["step_in_epoch"],
                      global_step=self.ckpt["global_step"], world_size=self.world, **info)

    def save(self, state, epoch, step_in_epoch, steps, best, is_best=False):
        """last.pt (and best.pt) with everything a resume needs: `state`'s state dicts, the
        position (epoch, batches of it done, of `steps` an epoch), the best score, config,
        meta and every rank's RNG. Collective: rank 0 writes, all gather RNG."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            torch.distributed.all_gather_object(rngs, rng_state())
        if self.rank != 0:
            return
        ckpt = {**{name: obj.state_dict() for name, obj in state.items()}, "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": epoch * steps + step_in_epoch,
                "best": best, "config": dict(vars(self.args)), "meta": self.meta, "rng": rngs,
                "torchrun_id": job_id(), **self.info}
        atomic_save(ckpt, self.last_path)
        if is_best:
            atomic_save(ckpt, self.best_path)

    def log_epoch(self, record):
        """Rank 0 appends an epoch's line, with the provenance, to log.jsonl and redraws
        curves.png from the log (when matplotlib is installed)."""
        if self.rank == 0:
            append_log(self.args.out, {**record, **self.info})
            if self.args.curves:
                try:
                    draw_curves(self.args.out, self.args.main_metric)
                except Exception as e:  # a figure is never worth a stopped run
                    print(f"curves.png not drawn: {type(e).__name__}: {e}", flush=True)

    def stop_requested(self) -> bool:
        """Collective: whether any rank got a preemption signal (see rvit/preemption.py)."""
        return self.preemption.requested()

    def close(self, stop_at=None, steps=0):
        """Leave the process group; after a preemption at `stop_at` (epoch, batches done, of
        `steps` an epoch), log it and exit with EXIT_PREEMPTED. Drop a DDP-wrapped model
        before: its reducer holds the process group and frees it holding the GIL, which can
        deadlock with a gloo thread that needs the GIL to free a finished collective's
        tensors; cleanup's binding releases the GIL."""
        if stop_at is not None and self.rank == 0:
            epoch, batch = stop_at
            name = self.preemption.name
            log_event(self.args.out, "preempted", epoch + 1, batch,
                      global_step=epoch * steps + batch, signal=name)
            print(f"preempted by {name} in epoch {epoch + 1} after batch {batch}: "
                  f"{self.last_path} holds it; the same command with --resume auto continues "
                  f"(exit {EXIT_PREEMPTED})", flush=True)
        if stop_at is not None:  # no rank exits before rank 0 has written: torchrun would stop it
            distributed.barrier()
        distributed.cleanup()
        if stop_at is not None:
            sys.exit(EXIT_PREEMPTED)
