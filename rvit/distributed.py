"""torchrun set-up and tear-down, `print0`, and exact reductions for distributed evaluation.

Works unchanged without torchrun (one process, no process group). Under torchrun
(`RANK`, `LOCAL_RANK`, `WORLD_SIZE` set) it joins the group: NCCL on CUDA, gloo on CPU.
Evaluation shards samples as `range(rank, n, world)`, with no padding and no dropped tail, so
every sample is counted exactly once; counts are summed, scores gathered.
"""
import os

import torch
import torch.distributed as dist


def setup(device: str):
    """Join the torchrun process group if there is one; returns (rank, world_size, torch.device)
    for `device` "cuda" or "cpu" (under torchrun on CUDA each process takes GPU LOCAL_RANK).

    Raises:
        RuntimeError: device "cuda" asked for but CUDA is not available.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available on this machine")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    cuda = device == "cuda"
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get(
            "TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps its store across restarts, so a restarted group can read the addresses
        # of the dead one and fail to connect (pytorch/pytorch#135712, #167288)
        print0("warning: torchrun --max-restarts: a restart may fail to connect unless torchrun "
               "runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/cluster.md)")
    return dist.get_rank(), dist.get_world_size(), dev


def cleanup():
    """Leave the process group at the end of a run, after a barrier: a rank that tears its gloo
    group down while a peer's last collective is in flight can die in C++ at exit
    ("terminate called without an active exception", cf. pytorch/pytorch#179291)."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier():
    """Wait until every rank gets here (nothing to wait for without a process group)."""
    if is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def shard(n: int) -> range:
    """This rank's sample indices: every world_size-th, so each of n samples is seen once."""
    return range(rank(), n, world_size())


def all_reduce(t, op="sum"):
    """Sum (exact for integers), "min" or "max" of a tensor over ranks, on t's device."""
    if not is_initialized():
        return t
    nccl = dist.get_backend() == "nccl"
    out = t.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(out, {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                          "max": dist.ReduceOp.MAX}[op])
    return out.to(t.device)


def mean(t):
    """Mean of a float tensor over ranks (the tensor itself without a process group)."""
    return all_reduce(t) / world_size()


def gather_cat(t):
    """Concatenate along dim 0 every rank's tensor (rows in rank order), on CPU."""
    if not is_initialized():
        return t.cpu()
    parts = [None] * world_size()
    dist.all_gather_object(parts, t.cpu())
    parts = [p for p in parts if p.numel()]
    return torch.cat(parts) if parts else t.cpu()
