"""Stop training cleanly when a scheduler says the job must go, so a restart loses nothing.

SLURM sends SIGUSR1 ahead of a time limit (`--signal=USR1@120`) and SIGTERM when it preempts;
Kubernetes sends SIGTERM on eviction; torchrun passes the signals it handles on to every worker.
A signal reaches the ranks at different moments, or only some of them, so the handler only
records it; after each step every rank calls `requested()`, an all-reduce (MAX) of the signal
number, and all ranks stop after the same step. train.py then writes last.pt at that batch and
exits with EXIT_PREEMPTED. A repeated signal changes nothing (SLURM and torchrun may both deliver
one); SIGKILL is the only hard stop.
"""
import argparse
import signal

import torch
import torch.distributed as dist

from rvit import distributed

EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: stopped on request, continue with --resume
DEFAULT_SIGNALS = "SIGTERM,SIGUSR1"


class Preempted(Exception):
    """Raised by the training loop after the step at which every rank agreed to stop; `batch`:
    batches of the epoch done (last.pt was written at this point)."""

    def __init__(self, batch):
        super().__init__(f"preempted after batch {batch}")
        self.batch = batch


def signal_names(text) -> str:
    """argparse type of --preempt-signals: 'sigterm, USR1' -> 'SIGTERM,SIGUSR1'; 'none' -> ''.

    Raises:
        argparse.ArgumentTypeError: an unknown signal, or one no process can catch.
    """
    if text.strip().lower() == "none":
        return ""
    names = []
    for name in filter(None, (n.strip().upper() for n in text.split(","))):
        name = name if name.startswith("SIG") else "SIG" + name
        if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
            raise argparse.ArgumentTypeError(f"not a signal a process can catch: {name!r}")
        names.append(name)
    return ",".join(names)


class Preemption:
    """Records the `signals` (names as `signal_names` returns them; "": none); `requested()`
    tells every rank at once that one arrived. Construct it on every rank after
    `distributed.setup` (under NCCL it makes a gloo group)."""

    def __init__(self, signals):
        self.received = 0  # the last signal number this process got; 0: none
        self.signum = 0  # the one the ranks agreed on
        self.handled = list(filter(None, signals.split(",")))
        for name in self.handled:
            signal.signal(signal.Signals[name], self._record)
        # the flag is a CPU tensor reduced over gloo even beside NCCL: a CUDA flag read each
        # step would make the host wait for the GPU
        on_nccl = distributed.is_initialized() and dist.get_backend() == "nccl"
        self.group = dist.new_group(backend="gloo") if on_nccl else None
        self.flag = torch.zeros(1, dtype=torch.int64)

    def _record(self, signum, frame):
        # a handler runs between two bytecodes of the loop: only record; the loop decides
        self.received = signum

    def requested(self) -> bool:
        """Whether any rank has received one of the signals; `name` then names it (the highest
        number, if ranks got different ones). Collective: every rank must call it at the same
        steps; it returns the same answer on all of them."""
        if not self.handled:  # --preempt-signals none, on every rank alike: nothing to ask
            return False
        self.flag[0] = self.received
        if distributed.is_initialized():
            dist.all_reduce(self.flag, dist.ReduceOp.MAX, group=self.group)
        self.signum = int(self.flag[0])
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
