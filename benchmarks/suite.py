"""How fast is RViT here, and does the masking speed-up survive end to end? The benchmarks in
one command, most important first, within a wall-clock budget.

    python -m benchmarks.suite --device cuda --out suite-gpu --budget-s 480
    python -m benchmarks.suite --device cpu --out /tmp/suite-cpu --budget-s 120

Parts, in the order they run:
  environment  device, memory, torch / CUDA / cuDNN versions, varlen attention, torch.compile;
  cuda_tests   `pytest -m cuda` (varlen, compile, bf16), CUDA only;
  throughput   benchmarks.throughput: ViT-tiny/16 training steps and inference forwards at mask
               0 / 0.6 / 0.75 for every strategy of rvit.masking.STRATEGIES, beside timm's
               patch_drop_rate when timm is installed (same batch, same AMP); eager, and
               compiled on CUDA; batch 32 on CPU, 1024 and 256 on CUDA;
  loader       benchmarks.loader: the training step fed by the loader with 0 / 4 / 8 / all
               workers against the same step on a batch already on the device, mask 0 / 0.75;
  mapping      benchmarks.mapping: predict.py on a scene against the model alone;
  convert      benchmarks.convert: prepare_data.py by worker count (CPU work).

Budget: a part gets the time still left in proportion to its weight among the parts not yet
run, so what one part leaves unused goes to the next. Inside a part, settings run most
important first; each is sized from what this run has measured so far (seconds per step, per
batch, per tile) so that it and as many of the settings after it as possible fit with the same
number of timed steps, and one that cannot fit is skipped with the reason. The benchmarks' one
timer (throughput.time_steps) stops at the part's deadline: a part overruns it by one step at
most.

Data: the repository's real BigEarthNet v1 S2 patches (tests/data) converted by prepare_data.py
and repeated into a larger file by benchmarks.loader.synthesize (block copies: cheaper than
drawing random pixels, and the mapping part needs the converted split anyway), under --work,
reused by later runs.

Writes OUT/report.md and OUT/report.json after every part (a stopped run keeps what it has) and
OUT/suite.log (what the benchmarks print); prints the Markdown at the end. Each figure is one
run: figures to read, not tests.
"""
import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections import namedtuple

if not __package__:  # run as `python benchmarks/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h5py
import torch

from benchmarks import convert, loader, mapping, throughput
from rvit.atomic import atomic_write
from rvit.data import H5Dataset
from rvit.masking import STRATEGIES, num_keep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEN_S2 = os.path.join(ROOT, "tests", "data", "bigearthnet", "v1", "BigEarthNet-S2")
PARTS = ("environment", "cuda_tests", "throughput", "loader", "mapping", "convert")
TITLES = {"environment": "Environment", "cuda_tests": "CUDA tests",
          "throughput": "Model throughput", "loader": "Loader end to end",
          "mapping": "Mapping (predict.py)", "convert": "Conversion (prepare_data.py)"}
# shares of the time left (the environment runs first, unbudgeted: a second on a CPU, on a GPU
# some more for its compile probe)
WEIGHTS = {"cuda": {"cuda_tests": 0.10, "throughput": 0.52, "loader": 0.20, "mapping": 0.10,
                    "convert": 0.08},
           "cpu": {"throughput": 0.45, "loader": 0.30, "mapping": 0.15, "convert": 0.10}}
# the sizes before the budget shrinks them: steps (fewest, most) timed per setting; samples in
# the loader's file; grid: tiles per side of the mapping scene; copies of the 10 real patches
SIZES = {"cuda": {"img": 224, "batches": (1024, 256), "runs": ("eager", "compiled"),
                  "warmup": 8, "steps": (5, 20), "samples": 50_000, "loader_batch": 1024,
                  "grid": 50, "copies": 60},
         # CPU: two warm-up steps (the first allocates the optimizer's state) and at least
         # three timed ones (a baseline timed once read 14 img/s against 23 over eight steps)
         "cpu": {"img": 224, "batches": (32,), "runs": ("eager",), "warmup": 2,
                 "steps": (3, 10), "samples": 2_048, "loader_batch": 32, "grid": 20,
                 "copies": 20}}
TINY = {"img": 32, "batches": (2,), "warmup": 1, "steps": (1, 2), "samples": 64,
        "loader_batch": 4, "grid": 3, "copies": 2}
MASKS = (0.0, 0.75, 0.6)  # run order: the baseline, the headline ratio, the other one
LOADER_MASKS = (0.0, 0.75)
WRITE_SHARE = 0.35  # of the loader part's time, at most, for writing its file
CONVERT_RATE = 30.0  # patches/s of one prepare_data.py worker, to size the archive: the 2-core
# VM's slowest of three measured runs (30-41), as nothing in this run has measured it yet
COMPILE_S = 60.0  # assumed seconds of a setting's first compile until one is measured: enough
# that a late compile does not start (it cannot be stopped) and overrun the budget by minutes
Setting = namedtuple("Setting", "mode batch run impl strategy mask")


STOPPED = []  # signals that asked the run to stop


class Skip(Exception):
    """A part that cannot run here; the message says why."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag with its default, and this module's docstring as written."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__,
                                formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the models run: cuda when it is available, else cpu")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS,
                   help="folder for report.md, report.json and suite.log")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock seconds for all parts together")
    p.add_argument("--work", default=argparse.SUPPRESS,
                   help="folder for the data, scene, checkpoint and archive, reused by later "
                        "runs (default: OUT/work)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated parts to run, always in the order above; the "
                        "others are reported as not selected")
    p.add_argument("--tiny", action="store_true",
                   help="tiny sizes (32 px, batch 2, 64 samples, 3 x 3 tiles): the suite's "
                        "plumbing in seconds, for tests; the figures mean nothing")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


class Costs:
    """Seconds that settings took in this run, by keys from the most to the least specific
    (e.g. mode, run and mask; then mode and run), to estimate the settings still to come."""

    def __init__(self, prior=None):
        self.seconds = dict(prior or {})

    def record(self, keys, value):
        """`value` for the first key; the less specific ones keep the largest value seen, so
        their estimates err towards the slower settings."""
        for i, key in enumerate(keys):
            self.seconds[key] = value if i == 0 else max(value, self.seconds.get(key, 0.0))

    def guess(self, keys):
        """Seconds of the most specific key measured, or 0 when none is: an unknown cost
        (the deadline still guards it)."""
        return next((self.seconds[k] for k in keys if k in self.seconds), 0.0)


def plan_steps(step_s, rest, left, lo, hi):
    """Timed steps for a setting whose step takes `step_s` seconds, chosen so that it and as
    many as possible of the settings after it (`rest`: (fixed seconds, seconds per step)
    estimates, most important first) fit in `left` seconds with the same count: at least `lo`
    (then the least important are dropped, to be skipped when their turn comes), at most `hi`,
    and never fewer than 1."""
    for n in range(len(rest), -1, -1):
        fixed = sum(f for f, _ in rest[:n])
        steps = (left - fixed) / (step_s + sum(s for _, s in rest[:n]))
        if steps >= lo or n == 0:
            return int(max(1, min(hi, steps)))


def allot(weights, part, todo, left):
    """Seconds for `part`: `left` (seconds, 0 when negative) shared by weight among `todo` (it
    and the parts after it), so what a part leaves unused goes to the next; None for a part
    without a weight (it runs unbudgeted, or skips itself)."""
    if not weights.get(part):
        return None
    return max(0.0, left) * weights[part] / sum(weights.get(p, 0.0) for p in todo)


def run_settings(settings, cost, measure, deadline, lo, hi):
    """Results of `measure(setting, steps, deadline)` for each setting in order, or a status
    where it did not run.

    Args:
        cost: setting -> (fixed seconds, warm-up included; seconds per step), estimated.
        measure: runs one setting; `steps` is `time_steps`'s function of a warm-up step's
            seconds, which estimates the settings after it with `cost` then (so a cost the
            warm-up recorded counts). Returns a dict with `steps` (timed).
        deadline: `time.perf_counter()` time by which the part must end.
        lo, hi: fewest and most timed steps.

    Returns:
        one dict per setting with `status`: "ok", "skipped: budget spent", "stopped: budget
        spent in the warm-up", "stopped (interrupted)" or "failed: <error>".
    """
    results = []
    for i, setting in enumerate(settings):
        fixed, step = cost(setting)
        if STOPPED:
            results.append({"status": "stopped (interrupted)"})
            continue
        if time.perf_counter() + fixed + step > deadline:  # not even one timed step fits
            results.append({"status": "skipped: budget spent"})
            continue

        def steps(warm_s, i=i, step=step):
            rest = [cost(s) for s in settings[i + 1:]]
            return plan_steps(warm_s or step or 1e-3, rest, deadline - time.perf_counter(),
                              lo, hi)
        try:
            r = measure(setting, steps, deadline)
            r["status"] = "ok" if r["steps"] else "stopped: budget spent in the warm-up"
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


def device_name(device, cores):
    """The device as every caption names it."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), model)
    return f"CPU: {model}, {cores} cores"


class Suite:
    """One run: its flags, sizes, device, deadline, and the costs it has measured so far."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.sizes = {**SIZES[args.device], **(TINY if args.tiny else {})}
        self.work = os.path.abspath(getattr(args, "work", os.path.join(args.out, "work")))
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count()
        self.name, self.commit = device_name(self.device, self.cores), commit()
        self.amp = "bf16" if self.device.type == "cuda" else "none"
        self.costs = Costs({("fixed", "compiled"): COMPILE_S})
        self.start = time.perf_counter()
        self.end = self.start + args.budget_s

    def allot(self, part, todo):
        """Seconds for `part` of the time left now (the module's `allot`)."""
        return allot(WEIGHTS[self.args.device], part, todo, self.end - time.perf_counter())

    def fixture(self, deadline):
        """Folder of train/val/test.h5 that prepare_data.py converted from the repository's
        real BigEarthNet patches (made once under --work). Raises Skip at the deadline."""
        out = os.path.join(self.work, "bigearthnet")
        if not os.path.exists(os.path.join(out, "train.h5")):
            try:
                subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"),
                                "--dataset", "bigearthnet", "--root", BEN_S2, "--out", out],
                               check=True, capture_output=True,
                               timeout=max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                raise Skip("budget spent converting the real patches") from None
        return out


def part_environment(suite, deadline):
    """Device, memory, versions, and whether varlen attention and torch.compile work here."""
    rows = [("device", suite.name), ("CPU cores", suite.cores)]
    if suite.device.type == "cuda":
        props = torch.cuda.get_device_properties(suite.device)
        rows += [("GPU memory", f"{props.total_memory / 2**30:.1f} GiB"),
                 ("compute capability", f"{props.major}.{props.minor}")]
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        rows.append(("host memory", f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"))
    with contextlib.suppress(OSError):  # other jobs on a shared machine slow every figure
        rows.append(("load average (1 / 5 / 15 min)",
                      " / ".join(f"{v:.1f}" for v in os.getloadavg())))
    with contextlib.suppress(OSError):
        shm = os.statvfs("/dev/shm")  # where DataLoader workers' batches live
        rows.append(("/dev/shm free", f"{shm.f_bavail * shm.f_frsize / 2**30:.1f} GiB"))
    rows += [("python", platform.python_version()), ("torch", torch.__version__),
             ("CUDA", torch.version.cuda or "none"),
             ("cuDNN", torch.backends.cudnn.version() if suite.device.type == "cuda"
              else "n/a (CPU run)"),
             ("h5py", h5py.__version__), ("timm", timm_version() or "not installed"),
             ("varlen attention", varlen_usable(suite.device)),
             ("torch.compile", compile_usable(suite.device)), ("commit", suite.commit)]
    return {"rows": [{"item": k, "value": str(v)} for k, v in rows],
            "table": (["item", "value"], [[k, str(v)] for k, v in rows]),
            "caption": "versions and capabilities the figures below depend on."}


def timm_version():
    """timm's version, or None when it is not installed."""
    if importlib.util.find_spec("timm") is None:
        return None
    import timm
    return timm.__version__


def varlen_usable(device):
    from rvit.packing import load_varlen, use_varlen
    if load_varlen() is None:
        return "no: torch.nn.attention.varlen is missing (torch < 2.10)"
    if device.type != "cuda":
        return "no: CUDA only (FlashAttention)"
    usable = use_varlen(torch.zeros(1, device=device, dtype=torch.bfloat16))
    return "yes" if usable else "no: needs an Ampere or newer GPU"


def compile_usable(device):
    """Whether a small function compiles and runs on `device` (CUDA only: the suite compiles
    nothing on CPUs, and a probe there costs seconds)."""
    if device.type != "cuda":
        return "not probed: the suite compiles on CUDA only"
    start = time.perf_counter()
    try:
        torch.compile(lambda x: torch.nn.functional.gelu(x) * 2)(torch.ones(8, device=device))
        torch.cuda.synchronize()
    except Exception as e:  # an unusable compiler is a finding, not a crash
        return f"no: {type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
    return f"yes (a probe compiled in {time.perf_counter() - start:.1f} s)"


def commit():
    """The checkout's commit, and whether tracked files differ from it."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           text=True, capture_output=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + (" (uncommitted changes)" if dirty else "")


def part_cuda_tests(suite, deadline):
    """`pytest -m cuda` in a subprocess stopped at the deadline; one row per test."""
    if suite.device.type != "cuda":
        raise Skip("CUDA only")
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest not installed (pip install -r requirements-test.txt)")
    report = os.path.join(suite.work, "cuda-tests.xml")
    os.makedirs(suite.work, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(report)
    try:
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p",
                        "no:cacheprovider", f"--junitxml={report}", "tests"], cwd=ROOT,
                       capture_output=True, timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        raise Skip("budget spent: pytest stopped at the deadline") from None
    rows = []
    for case in ElementTree.parse(report).iter("testcase"):
        found = [c for c in case if c.tag in ("failure", "error", "skipped")]
        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
            found[0].tag if found else None, "passed")
        detail = (found[0].get("message") or "").splitlines()[0][:160] if found else ""
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}",
                     "outcome": outcome, "seconds": round(float(case.get("time", 0)), 1),
                     "detail": detail})
    return {"rows": rows, "table": (["test", "outcome", "seconds", "detail"],
                                    [[r["test"], r["outcome"], r["seconds"], r["detail"]]
                                     for r in rows]),
            "caption": "`pytest -m cuda`: the tests that need a GPU.",
            "status": "ok" if all(r["outcome"] == "passed" for r in rows) else "partial"}


def throughput_settings(sizes, strategies, timm):
    """The settings, most important first, in four tiers: eager runs of the first strategy
    (and timm); compiled training of those at the largest batch; eager runs of the other
    strategies; every other compiled run (each compile costs about a minute, so only the first
    few fit a GPU slot). Within a tier: the larger batch, training, then inference; RViT's
    mask-0 baseline (the plain ViT whatever the strategy, so timed once), then the masks in
    MASKS order, timm after RViT."""
    out = []
    for run in sizes["runs"]:
        for batch in sizes["batches"]:
            for mode in ("train", "infer"):
                models = [("rvit", "none", 0.0)] + [("rvit", s, m) for m in MASKS[1:]
                                                    for s in strategies]
                models += [("timm", "patch_drop", m) for m in MASKS if timm]
                out += [Setting(mode, batch, run, *model) for model in models]

    def tier(st):
        lead = st.strategy in ("none", "patch_drop", strategies[0])
        if st.run == "eager":
            return 0 if lead else 2
        return 1 if lead and st.batch == max(sizes["batches"]) and st.mode == "train" else 3
    return sorted(out, key=tier)  # stable: the order above within a tier


def part_throughput(suite, deadline):
    """benchmarks.throughput's settings on batches already on the device."""
    sizes, timm = suite.sizes, timm_version()
    # the paper's rule first; merging timed with the rule that pairs with it best
    strategies = sorted(STRATEGIES, key=lambda s: s != "similarity") + ["kmedoids+merge"]
    settings = throughput_settings(sizes, strategies, timm)
    warmup, n = sizes["warmup"], (sizes["img"] // 16) ** 2

    def tokens(st):  # per image, the class token included
        return 1 + num_keep(n, st.mask)

    def keys(st):  # seconds per token: a mask ratio not yet measured scales with its tokens
        return [("token", st.mode, st.run, st.mask), ("token", st.mode, st.run), ("token",)]

    def cost(st):
        step = suite.costs.guess(keys(st)) * st.batch * tokens(st)
        return suite.costs.guess([("fixed", st.run), ("fixed",)]) + warmup * step, step

    def measure(st, steps, deadline):
        flags = ["--batch-size", str(st.batch), "--img-size", str(sizes["img"]), "--warmup",
                 str(warmup), "--device", suite.args.device]
        args = throughput.parse_args(flags + (["--compile"] if st.run == "compiled" else []))
        start = time.perf_counter()

        def sized(warm_s):  # what the warm-up step cost estimates the settings to come
            if warm_s:
                suite.costs.record(keys(st), warm_s / st.batch / tokens(st))
            return steps(warm_s)
        if st.impl == "rvit":
            r = throughput.rvit_setting(args, "similarity" if st.strategy == "none"
                                        else st.strategy, st.mask, st.mode == "train",
                                        sized, deadline)
        else:
            r = throughput.timm_setting(args, st.mask, st.mode == "train", sized, deadline)
        if r["steps"]:
            suite.costs.record(keys(st), r["step_s"] / st.batch / tokens(st))
            suite.costs.record([("fixed", st.run), ("fixed",)], time.perf_counter() - start
                               - (warmup + r["steps"]) * r["step_s"])
        return r

    results = run_settings(settings, cost, measure, deadline, *sizes["steps"])
    rows = [throughput_row(st, r, n, suite.device) for st, r in zip(settings, results)]
    add_speedups(rows, "img_per_s", ("impl", "mode", "batch", "run"), "mask", 0.0)
    notes = [f"RViT at mask 0 runs the plain ViT whatever the strategy: timed once per mode, "
             f"batch and run; every RViT speed-up is over that row. Token-count ideal "
             f"(1 + N) / (1 + K), N = {n}: " + ", ".join(
                 f"{(1 + n) / (1 + num_keep(n, m)):.2f}x at mask {m:g}" for m in sorted(MASKS)
                 if m)]
    notes.append(f"timm {timm}: `patch_drop_rate` drops random patches in training only"
                 if timm else "timm rows skipped: timm not installed")
    if suite.device.type != "cuda":
        notes.append("compiled rows skipped: CUDA only (compiling on a CPU would spend the "
                      "budget); peak memory: CUDA only")
    else:
        notes.append(f"a compiled setting's first compile was assumed to take {COMPILE_S:g} s "
                     f"until one was measured; peak memory: CUDA allocator, per setting")
    return {"rows": rows, "table": throughput_table(rows, strategies), "notes": notes,
            "status": part_status(rows),
            "caption": f"ViT-tiny/16 at {sizes['img']} px, 3 bands, 19 classes, AMP "
                       f"{suite.amp}, batches already on the device; img/s = batch / median "
                       f"step of the timed steps (after {warmup} warm-up); in brackets the "
                       f"speed-up over mask 0 of the same model, mode, batch and run."}


def throughput_row(st, r, n, device):
    row = {**st._asdict(), "status": r["status"]}
    if r["status"] == "ok":
        row.update(img_per_s=sig(r["img_per_s"]), steps=r["steps"],
                   warmup_s=round(r["warmup_s"], 1),
                   peak_mib=round(r["peak_mib"]) if device.type == "cuda" else None)
        if "kept" in r:
            row.update(kept_tokens=round(r["kept"], 1),
                       token_ideal=round((1 + n) / (1 + r["kept"]), 2))
    return row


def add_speedups(rows, value, same, key, base, name="speedup"):
    """rows[i][name] = rows[i][value] over the value of the row with the same `same` fields
    whose `key` is `base` (None where either is missing)."""
    bases = {tuple(r[f] for f in same): r.get(value) for r in rows if r[key] == base}
    for r in rows:
        b, v = bases.get(tuple(r[f] for f in same)), r.get(value)
        r[name] = sig(v / b) if v and b else None


def sig(v, digits=4):
    """v to `digits` significant figures: the JSON's precision, so ratios stay checkable
    against their figures whatever their size."""
    return float(f"{v:.{digits}g}")


def part_status(rows):
    return "ok" if all(r["status"] == "ok" for r in rows) else "partial"


def rate(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def cell(r, value, ratio=None):
    """A table cell: the figure, with r[ratio] in brackets when given, or why it is missing."""
    if r is None:
        return ""
    if r["status"] != "ok":
        return "not run (budget)" if "budget" in r["status"] else r["status"].split(":")[0]
    return rate(r[value]) + (f" ({r[ratio]:.2f}x)" if ratio and r.get(ratio) else "")


def throughput_table(rows, strategies):
    masks = sorted(MASKS)
    order = {"none": -1, "patch_drop": len(strategies),
             **{s: i for i, s in enumerate(strategies)}}
    groups = {}
    for r in sorted(rows, key=lambda r: (r["mode"] != "train", r["run"] != "eager", -r["batch"],
                                         order[r["strategy"]])):
        groups.setdefault((r["mode"], r["batch"], r["run"], r["impl"], r["strategy"]),
                          {})[r["mask"]] = r
    lines = []
    for (mode, batch, run, impl, strategy), by_mask in groups.items():
        model = {"none": "RViT, no token dropped (any strategy)",
                 "patch_drop": "timm `patch_drop_rate`"}.get(strategy, f"RViT {strategy}")
        lines.append([mode, batch, run, model] + [
            cell(by_mask.get(m), "img_per_s", "speedup" if m else None) for m in masks])
    return ["mode", "batch", "run", "model"] + [f"mask {m:g}" for m in masks], lines


def loader_file(data, n, deadline):
    """An h5 file of at least n samples repeating the converted split: the smallest such one
    already under `data`, else one written now (fewer samples if the deadline comes first)."""
    have = {}
    for name in os.listdir(data):
        if name.startswith("train-synthetic-") and name.endswith(".h5"):
            have[int(name[len("train-synthetic-"):-3])] = os.path.join(data, name)
    enough = [k for k in have if k >= n]
    if enough:
        return have[min(enough)]
    return loader.synthesize(os.path.join(data, "train.h5"), n, deadline, progress=False)


def part_loader(suite, deadline):
    """The training step fed by the loader against the same step on a batch on the device."""
    sizes, B = suite.sizes, suite.sizes["loader_batch"]
    start = time.perf_counter()
    path = loader_file(suite.fixture(deadline), sizes["samples"],
                       start + WRITE_SHARE * (deadline - start))
    loader.warm(path)  # every setting reads from the page cache
    ds = H5Dataset(path)
    workers = sorted({min(w, suite.cores) for w in (0, 4, 8, suite.cores)}, reverse=True)
    settings = [(None, m) for m in LOADER_MASKS] + [(w, m) for w in workers
                                                    for m in LOADER_MASKS]
    trainers = {}

    def cost(st):
        w, m = st
        step = suite.costs.guess([("batch", w, m), ("batch", None, m), ("batch",)])
        return suite.costs.guess([("start", w), ("start",)]) + (2 * (w or 0) + 1) * step, step

    def measure(st, steps, deadline):
        w, m = st
        if m not in trainers:
            trainers[m] = loader.train_step(ds.meta, sizes["img"], m, suite.device, suite.amp)
        step, tf = trainers[m]
        planned = []

        def timed(warm_s):  # the warm-up batch estimates this and the settings to come
            if warm_s:
                suite.costs.record([("batch", w, m), ("batch",)], warm_s)
            planned.append(steps(warm_s))
            return planned[-1]
        t = time.perf_counter()
        if w is None:
            r = loader.model_only_rate(ds, step, tf, B, timed, suite.device, deadline)
        else:
            r = loader.fed_rate(ds, step, B, w, timed, suite.device, deadline)
        if r == r:  # timed batches: record what this setting costs
            suite.costs.record([("batch", w, m), ("batch",)], B / r)
            wall = time.perf_counter() - t - (2 * (w or 0) + 1 + planned[0]) * B / r
            suite.costs.record([("start", w), ("start",)], max(0.0, wall))
        return {"img_per_s": r, "steps": planned[0] if r == r else 0}

    results = dict(zip(settings, run_settings(settings, cost, measure, deadline,
                                              *sizes["steps"])))
    rows = [loader_row(w, m, results[(w, m)], results[(None, m)])
            for w in workers for m in LOADER_MASKS]
    add_speedups(rows, "end_to_end_img_per_s", ("workers",), "mask", 0.0, "end_to_end_speedup")
    add_speedups(rows, "model_img_per_s", ("workers",), "mask", 0.0, "model_speedup")
    return {"rows": rows, "status": part_status(rows), "table": loader_table(rows),
            "caption": f"ViT-tiny/16 training at {sizes['img']} px (similarity, 12 bands, AMP "
                       f"{suite.amp}), batch {B}, fed by `train_loader` from a {len(ds):,}-"
                       f"sample BigEarthNet-shaped file (the 10 real patches of tests/data "
                       f"converted by prepare_data.py, repeated by benchmarks.loader.synthesize;"
                       f" page cache warm); model only = the same step on one batch already on "
                       f"the device; share kept = end to end / model only.",
            "notes": [f"worker counts 0 / 4 / 8 / all, capped at the {suite.cores} cores here",
                      "on a CPU the loader, the transform and the model share the cores: the "
                      "share kept says nothing about a GPU"]}


def loader_table(rows):
    return ["mask", "workers", "end to end, img/s (speed-up)", "model only, img/s (speed-up)",
            "share kept"], [[r["mask"], r["workers"],
                             cell(r, "end_to_end_img_per_s", r["mask"] and "end_to_end_speedup"),
                             cell(r, "model_img_per_s", r["mask"] and "model_speedup"),
                             f"{r['share_kept']:.0%}" if r.get("share_kept") else ""]
                            for r in rows]


def loader_row(w, m, fed, alone):
    ok = fed["status"] == "ok" and alone["status"] == "ok"
    row = {"mask": m, "workers": w, "status": fed["status"] if alone["status"] == "ok"
           else alone["status"], "end_to_end_img_per_s": None, "model_img_per_s": None}
    if ok:
        row.update(end_to_end_img_per_s=sig(fed["img_per_s"]), batches=fed["steps"],
                   model_img_per_s=sig(alone["img_per_s"]),
                   share_kept=sig(fed["img_per_s"] / alone["img_per_s"]))
    return row


def part_mapping(suite, deadline):
    """predict.py on a scene of the real patches against the model alone on its tiles."""
    sizes = suite.sizes
    flags = ["--data-dir", suite.fixture(deadline), "--batch-size", str(min(sizes["batches"])),
             "--img-size", str(sizes["img"]), "--work",
             os.path.join(suite.work, f"mapping-{sizes['img']}px"),
             "--device", suite.args.device, "--masks", ",".join(f"{m:g}" for m in MASKS)]
    args = mapping.parse_args(flags)
    try:
        ckpt = mapping.checkpoint(args, max(0.1, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        raise Skip("budget spent training the one-step checkpoint") from None
    # a tile costs about twice the throughput part's inference image (12 bands, normalise,
    # 120 -> 224 px resize: the README's CPU run had 41 tiles/s against 66 img/s; a training
    # image, about 3x an inference one, when no inference was measured), plus a millisecond of
    # GeoTIFF reading and writing in predict.py, and each of the two timings per mask loads the
    # model (half a second): guesses, as nothing here has measured them yet. Nothing measured
    # at all: the smallest scene.
    token_s = suite.costs.guess([("token", "infer", "eager", 0.0), ("token", "infer", "eager"),
                                 ("token",)])
    per_tile = len(MASKS) * (4 * token_s * ((sizes["img"] // 16) ** 2 + 1) + 1e-3)
    loads = 2 * len(MASKS) * 0.5
    fit = math.isqrt(max(0, int((deadline - time.perf_counter() - loads) / per_tile)))
    args.grid = min(sizes["grid"], fit) if token_s else 2
    if args.grid < 2:
        raise Skip(f"budget spent: {deadline - time.perf_counter():.0f} s left, a 2 x 2 scene "
                   f"needs about {4 * per_tile + loads:.0f} s")
    rows = mapping.measure(args, mapping.scene(args), ckpt, MASKS, deadline)
    done = {r["mask"] for r in rows}
    rows = sorted([{**{k: sig(v) for k, v in r.items()}, "status": "ok"} for r in rows] + [
        {"mask": m, "status": "skipped: budget spent"} for m in MASKS if m not in done],
        key=lambda r: r["mask"])
    table = [[r["mask"], cell(r, "model_tiles_per_s", r["mask"] and "model_speedup"),
              cell(r, "predict_tiles_per_s", r["mask"] and "predict_speedup"),
              f"{r['share_kept']:.0%}" if r["mask"] and r.get("share_kept") else ""]
             for r in rows]
    return {"rows": rows, "status": part_status(rows),
            "table": (["mask", "model alone, tiles/s (speed-up)",
                       "predict.py, tiles/s (speed-up)", "share of the speed-up kept"], table),
            "caption": f"a {args.grid * 120:,} x {args.grid * 120:,} px scene of "
                       f"{args.grid ** 2} tiles repeating the real patches, ViT-tiny/16 at "
                       f"{sizes['img']} px, similarity, batch {args.batch_size}; predict.py's "
                       f"whole run (checkpoint load, reading, model, writing the maps) against "
                       f"the model alone (normalise, resize, forward) on the same tiles in "
                       f"memory."}


def part_convert(suite, deadline):
    """prepare_data.py --workers N on copies of the real patches."""
    workers = sorted({1, min(4, suite.cores), suite.cores})
    per_patch = sum(1 / (CONVERT_RATE * w) for w in workers)
    start_s = 1.0  # a prepare_data.py process start (no torch import)
    patches = (deadline - time.perf_counter() - start_s * len(workers)) / per_patch
    copies = min(suite.sizes["copies"], int(patches // len(os.listdir(BEN_S2))))
    if copies < 1:
        raise Skip("budget spent")
    folder = os.path.join(suite.work, "convert")
    archive = os.path.join(folder, f"archive-{copies}")
    n = convert.build_archive(BEN_S2, copies, archive)
    rows = []
    for w in workers:
        out = os.path.join(folder, f"out-w{w}")
        r = convert.time_workers(archive, n, w, out, max(1.0, deadline - time.perf_counter()))
        row = {"workers": w, "patches": n, "status": "ok" if r else "stopped: budget spent",
               "patches_per_s": sig(r) if r else None}
        if r and rows and rows[0]["status"] == "ok":
            row["same_datasets"] = convert.same_content(os.path.join(folder, "out-w1"), out)
        if r:
            row["reben_hours"] = round(convert.REBEN_PATCHES / r / 3600, 1)
        rows.append(row)
    add_speedups(rows, "patches_per_s", (), "workers", 1)
    table = [[r["workers"], cell(r, "patches_per_s"), f"{r['speedup']:.2f}x"
              if r.get("speedup") else "", f"{r['reben_hours']} h" if r.get("reben_hours")
              else "", r.get("same_datasets", "-")] for r in rows]
    return {"rows": rows, "status": part_status(rows),
            "table": (["workers", "patches/s", "speed-up", "reBEN (480,038 patches)",
                       "same datasets as 1 worker"], table),
            "caption": f"{n} BigEarthNet v1 S2 patches ({copies} renamed copies of the 10 real "
                       f"ones in tests/data), `prepare_data.py --workers N`, the process start "
                       f"included."}


PART_FUNCTIONS = {"environment": part_environment, "cuda_tests": part_cuda_tests,
                  "throughput": part_throughput, "loader": part_loader,
                  "mapping": part_mapping, "convert": part_convert}


def run_part(suite, name, todo, log):
    """The part's record: status, reason, seconds, its rows, table and caption."""
    allotted = suite.allot(name, todo)
    deadline = time.perf_counter() + (allotted if allotted is not None else 60.0)
    record = {"name": name, "title": TITLES[name], "status": "ok", "reason": None,
              "allotted_s": None if allotted is None else round(allotted, 1)}
    start = time.perf_counter()
    try:
        if allotted is not None and allotted < 1.0:
            raise Skip("budget spent")
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            print(f"== {name}", flush=True)
            record.update(PART_FUNCTIONS[name](suite, deadline))
    except Skip as e:
        record.update(status="skipped", reason=str(e))
    except Exception as e:  # the report says what failed; the log holds the traceback
        traceback.print_exc(file=log)
        record.update(status="failed", reason=f"{type(e).__name__}: {e}"[:300])
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def summary(record):
    """What a part did, in a few words, for the progress line."""
    if record["status"] in ("skipped", "failed"):
        return f"{record['status']}: {record['reason']}"
    rows = record.get("rows", [])
    done = sum(r.get("status", "ok") == "ok" for r in rows)
    return f"{record['status']}, {done} of {len(rows)} rows measured"


def markdown(report):
    """The report as Markdown: a caption naming the device above every table."""
    dev = report["device"]
    lines = ["# RViT speed report", "", f"`{report['command']}` on {dev}, torch "
             f"{report['torch']}, commit {report['commit']}, {report['started']}: "
             f"{report['elapsed_s']:.0f} s of a {report['budget_s']:g} s budget. Each figure "
             f"is one run.", "", f"Parts on {dev}, in the order they ran:", ""]
    lines += table_lines(["part", "status", "seconds", "allotted s"], [
        [p["title"], p["status"] + (f": {p['reason']}" if p["reason"] else ""), p["seconds"],
         "" if p["allotted_s"] is None else p["allotted_s"]] for p in report["parts"]])
    for p in report["parts"]:
        lines += ["", f"## {p['title']}", ""]
        if "table" not in p:
            lines.append(f"{p['status']}: {p['reason']}")
            continue
        lines += [f"{p['title']} on {dev}: {p['caption']}", ""]
        lines += table_lines(*p["table"])
        if p.get("notes"):
            lines += [""] + [f"- {n}" for n in p["notes"]]
    return "\n".join(lines) + "\n"


def table_lines(header, rows):
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


def write_report(suite, parts, started):
    os.makedirs(suite.args.out, exist_ok=True)
    report = {"command": "python -m benchmarks.suite " + " ".join(sys.argv[1:]),
              "device": suite.name, "torch": torch.__version__, "commit": suite.commit,
              "started": started, "budget_s": suite.args.budget_s,
              "elapsed_s": round(time.perf_counter() - suite.start, 1), "sizes": suite.sizes,
              "parts": parts}
    text = markdown(report)
    with atomic_write(os.path.join(suite.args.out, "report.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    with atomic_write(os.path.join(suite.args.out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    return text


def stop(signum, frame):
    """SIGTERM (a scheduler ending the slot) and Ctrl-C: stop the part under way. The flag ends
    the run after it even where the exception is swallowed (a finalizer, such as a DataLoader
    shutting its workers down, ignores exceptions)."""
    STOPPED.append(signum)
    raise KeyboardInterrupt


def skipped(name, reason):
    return {"name": name, "title": TITLES[name], "status": "skipped", "reason": reason,
            "seconds": 0.0, "allotted_s": None}


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"CUDA is not available (torch {torch.__version__} sees no GPU); use "
                 f"--device cpu")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    suite = Suite(args)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    chosen = [p for p in PARTS if p in args.parts.split(",")]
    shares = {p: WEIGHTS[args.device][p] for p in chosen if WEIGHTS[args.device].get(p)}
    plan = ", ".join(f"{p} ~{args.budget_s * w / sum(shares.values()):.0f} s"
                     for p, w in shares.items())
    print(f"benchmarks.suite on {suite.name}, budget {args.budget_s:g} s: environment, then "
          f"{plan} (shares of the time left: what a part leaves goes to the next)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    parts = []
    with open(os.path.join(args.out, "suite.log"), "w") as log:
        for name in PARTS:
            if name not in chosen or STOPPED:
                parts.append(skipped(name, "stopped (interrupted)" if STOPPED
                                     else "not selected (--parts)"))
                continue
            print(f"[{time.perf_counter() - suite.start:5.0f} s] {name} ...", flush=True)
            try:
                parts.append(run_part(suite, name, chosen[chosen.index(name):], log))
            except KeyboardInterrupt:
                STOPPED.append(signal.SIGINT)
                parts.append(skipped(name, "stopped (interrupted)"))
            p = parts[-1]
            print(f"[{time.perf_counter() - suite.start:5.0f} s] {name}: {p['seconds']:.1f} s"
                  + (f" of {p['allotted_s']:.0f} allotted" if p["allotted_s"] else "")
                  + f", {summary(p)}", flush=True)
            write_report(suite, parts, started)
    text = write_report(suite, parts, started)
    if STOPPED:
        sys.exit(f"stopped: {args.out}/report.md holds the parts done so far")
    print(text)


if __name__ == "__main__":
    main()
