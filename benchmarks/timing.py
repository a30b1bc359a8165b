"""What every benchmark shares: the one timer, the budget it runs settings within, peak memory,
speed-ups over a baseline row and Markdown tables."""
import contextlib
import gc
import os
import signal
import time
import traceback

import torch

from rvit.cli import parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEN_S2 = os.path.join(ROOT, "tests", "data", "bigearthnet", "v1", "BigEarthNet-S2")
STOPPED = []  # signals that asked benchmarks.suite to stop


class Skip(Exception):
    """A part of benchmarks.suite that cannot run here; the message says why."""


def device_parser(doc, data=False):
    """rvit.cli's parser, described by `doc`'s first paragraph, for a benchmark of a model at
    --img-size on --device; with `data`, of a split (--data-dir, --split) too."""
    p = parser(doc.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (cuda when available)")
    p.add_argument("--img-size", type=int, default=224, help="model input side (pixels)")
    if data:
        p.add_argument("--data-dir", required=True, help="a prepared dataset (SPLIT.h5 files)")
        p.add_argument("--split", default="train", help="split file name without .h5")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps, device, warmup=0, deadline=None, sync_each=True):
    """`warmup` untimed calls of `step()` (compile included), then up to `steps` timed calls.
    With a `deadline` (a `time.perf_counter()` time) it stops before a call that would end past
    it, judged by the calls so far, so a budget is overrun by at most the misjudgement of one
    call (or by the first warm-up call, whose cost is unknown).

    Args:
        steps: timed calls, or a function (seconds of the last warm-up call, None without
            one) -> timed calls, so a caller can size a run from what one call costs here.
        device: synchronised around each call (CUDA), so a duration is that call's own.
        sync_each: False synchronises only after the last call: durations then overlap (device
            queues, loader prefetch) and only their sum, the run's wall time, is meaningful.

    Returns:
        (warm-up seconds, [seconds per timed call]); the list is empty when the deadline left
        no room for a timed call after the warm-up.
    """
    def late(now, per_call):
        return deadline is not None and now + per_call > deadline

    sync(device)
    start, last = time.perf_counter(), None
    for _ in range(warmup):
        t = time.perf_counter()
        step()
        sync(device)
        now = time.perf_counter()
        last = now - t
        if late(now, last):
            return now - start, []
    warm = time.perf_counter() - start
    n = steps(last) if callable(steps) else steps
    times, t0 = [], time.perf_counter()
    t = t0
    for i in range(n):
        step()
        now = time.perf_counter()
        stop = i == n - 1 or late(now, (now - t0) / (i + 1))
        if sync_each or stop:
            sync(device)
            now = time.perf_counter()
        times.append(now - t)
        t = now
        if stop:
            break
    return warm, times


def plan_steps(step_s, share_s, lo, hi):
    """Timed steps of `step_s` seconds that fit in `share_s` seconds, at least `lo` (the
    deadline still stops them) and at most `hi`."""
    return int(min(hi, max(lo, share_s // max(step_s, 1e-9))))


def run_settings(settings, measure, deadline, lo, hi, costs, kind):
    """Results of `measure(setting, steps, deadline)` for each setting, most important first.

    Args:
        measure: runs one setting; `steps` turns the seconds of its last warm-up step into
            timed steps (plan_steps over the setting's share: the time left to `deadline`
            split evenly among it and the settings after it). Returns a dict with `steps`
            (timed) and `step_s` (seconds per timed step).
        deadline: `time.perf_counter()` time by which the part must end.
        lo, hi: fewest and most timed steps.
        costs, kind: a setting is skipped when costs[kind(setting)] seconds (what the last of
            its kind took at `lo` steps, recorded here; an entry set beforehand stands for one
            never measured) exceed the time left.

    Returns:
        one dict per setting with `status`: "ok", "skipped: budget spent", "stopped: budget
        spent in the warm-up", "stopped (interrupted)" or "failed: <error>".
    """
    results = []
    for i, setting in enumerate(settings):
        start = time.perf_counter()
        share_end = start + (deadline - start) / (len(settings) - i)
        if STOPPED:
            results.append({"status": "stopped (interrupted)"})
            continue
        if start + costs.get(kind(setting), 0.0) > deadline:
            results.append({"status": "skipped: budget spent"})
            continue
        try:
            r = measure(setting, lambda warm_s: plan_steps(
                warm_s or 0.0, share_end - time.perf_counter(), lo, hi), deadline)
            r["status"] = "ok" if r["steps"] else "stopped: budget spent in the warm-up"
            if r["steps"]:
                costs[kind(setting)] = (time.perf_counter() - start
                                        + (lo - r["steps"]) * r["step_s"])
        except KeyboardInterrupt:  # SIGTERM or Ctrl-C: the part keeps what it has measured
            STOPPED.append(signal.SIGINT)
            r = {"status": "stopped (interrupted)"}
        except Exception as e:  # one setting failing (e.g. out of memory) ends only itself
            traceback.print_exc()
            r = {"status": f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}"[:200]}
        gc.collect()  # free the setting's model and optimizer before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.append(r)
    return results


def reset_peak(device):
    """Start a new peak-memory window: CUDA allocator stats, or on Linux CPUs the process's
    resident-set high-water mark (writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib(device):
    """Peak CUDA memory allocated, or peak resident set of this process on CPU, in MiB (NaN
    where /proc cannot tell)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return float("nan")


def sig(v, digits=4):
    """v to `digits` significant figures: the reports' precision, so ratios stay checkable
    against their figures whatever their size."""
    return float(f"{v:.{digits}g}")


def add_speedups(rows, value, same, key, base, name="speedup"):
    """rows[i][name] = rows[i][value] over the value of the row with the same `same` fields
    whose `key` is `base` (None where either is missing), to 4 significant figures."""
    bases = {tuple(r[f] for f in same): r.get(value) for r in rows if r[key] == base}
    for r in rows:
        b, v = bases.get(tuple(r[f] for f in same)), r.get(value)
        r[name] = sig(v / b) if v and b else None
    return rows


def part_status(rows):
    """A suite part's status: "ok" when every row is, else "partial"."""
    return "ok" if all(r["status"] == "ok" for r in rows) else "partial"


def rate(v):
    """A rate as the tables print it: no decimals from 100 up, one below."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def markdown(header, rows):
    """Lines of a Markdown table; floats as %g."""
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


def cell(r, value, ratio=None):
    """A table cell: r[value], with r[ratio] in brackets when given, or why the row has none."""
    if r is None:
        return ""
    if r.get("status", "ok") != "ok":
        return "not run (budget)" if "budget" in r["status"] else r["status"].split(":")[0]
    return rate(r[value]) + (f" ({r[ratio]:.2f}x)" if ratio and r.get(ratio) else "")
