"""A run folder holds one run of train.py: config.yaml, log.jsonl, last.pt and best.pt.

A command is never silently pointed at a folder that holds a run: without --resume it stops,
naming the flags that continue (--resume) or replace (--overwrite) the run, and changes nothing.
`--resume auto` continues OUT/last.pt when there is one and starts fresh in an empty folder, so
one command line both starts a cluster job and continues it after a restart or requeue.
log.jsonl holds one run: a line per epoch, continued across resumes, and `{"event": ...}` lines
where the run was resumed or preempted, which readers of the epoch lines skip.
"""
import datetime
import json
import os

RUN_FILES = ("config.yaml", "log.jsonl", "last.pt", "best.pt")  # what train.py writes
PROGRESS = ("last.pt", "best.pt", "log.jsonl")  # config.yaml alone: a start that saved nothing


def job_id() -> str:
    """The torchrun job of this process: its rendezvous id, the same on every rank and in every
    restart of one torchrun command (a fresh uuid under --standalone or on one node, the
    --rdzv-id given otherwise); "" outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


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
