"""How fast is RViT here, and does the masking speed-up survive end to end? The benchmarks in
one command, most important first, within a wall-clock budget.

    python -m benchmarks.suite --device cuda --out suite-gpu --budget-s 480
    python -m benchmarks.suite --device cpu --out /tmp/suite-cpu --budget-s 120

Parts, in the order they run, each run by the module named (PARTS):
  environment  environment: device, memory, torch / CUDA / cuDNN versions, varlen attention,
               torch.compile;
  cuda_tests   environment: `pytest -m cuda` (varlen, compile, bf16), CUDA only;
  throughput   throughput: ViT-tiny/16 training steps and inference forwards at mask 0 / 0.6 /
               0.75 for every strategy of rvit.masking.STRATEGIES, beside timm's patch_drop_rate
               when timm is installed (same batch, same AMP); eager, and compiled on CUDA;
               batch 32 on CPU, 1024 and 256 on CUDA;
  loader       loader: the training step fed by the loader with 0 / 4 / 8 / all workers
               against the same step on a batch already on the device, mask 0 / 0.75;
  mapping      mapping: predict.py on a scene against the model alone;
  convert      convert: prepare_data.py by worker count (CPU work).

Budget: a part gets the time still left in proportion to its weight among the parts not yet
run, so what one part leaves unused goes to the next. Inside a part the settings run most
important first, each with an equal share of the part's time still left: its timed steps are
that share over its last warm-up step, between the fewest and the most of SIZES. A setting is
skipped, with the reason, when the last one of its kind took longer (at the fewest steps) than
the part has left (benchmarks.timing.run_settings). The one timer (timing.time_steps) stops at
the part's deadline: a part overruns it by one step at most.

Data: the repository's real BigEarthNet v1 S2 patches (tests/data) converted by prepare_data.py
and repeated into a larger file by benchmarks.loader.synthesize, under --work, reused by later
runs.

Writes OUT/report.md and OUT/report.json after every part (a stopped run keeps what it has) and
OUT/suite.log (what the benchmarks print); prints the Markdown at the end. Each figure is one
run: figures to read, not tests.
"""
import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback

if not __package__:  # run as `python benchmarks/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import convert, environment, loader, mapping, throughput
from benchmarks.timing import BEN_S2, ROOT, STOPPED, Skip, markdown
from rvit.atomic import atomic_write

# name: (title, the function that runs it and returns its record), in the order they run
PARTS = {"environment": ("Environment", environment.suite_part),
         "cuda_tests": ("CUDA tests", environment.cuda_tests_part),
         "throughput": ("Model throughput", throughput.suite_part),
         "loader": ("Loader end to end", loader.suite_part),
         "mapping": ("Mapping (predict.py)", mapping.suite_part),
         "convert": ("Conversion (prepare_data.py)", convert.suite_part)}
# shares of the time left; the environment runs first, unbudgeted
WEIGHTS = {"cuda": {"cuda_tests": 0.10, "throughput": 0.52, "loader": 0.20, "mapping": 0.10,
                    "convert": 0.08},
           "cpu": {"throughput": 0.45, "loader": 0.30, "mapping": 0.15, "convert": 0.10}}
# steps: (fewest, most) timed per setting; samples in the loader's file; grid: tiles per side
# of the mapping scene; copies of the 10 real patches to convert
SIZES = {"cuda": {"img": 224, "batches": (1024, 256), "runs": ("eager", "compiled"),
                  "warmup": 8, "steps": (5, 20), "samples": 50_000, "loader_batch": 1024,
                  "grid": 50, "copies": 60},
         # CPU: two warm-up steps (the first allocates the optimizer's state) and at least
         # three timed ones (one timed step misreads a CPU's rate)
         "cpu": {"img": 224, "batches": (32,), "runs": ("eager",), "warmup": 2,
                 "steps": (3, 10), "samples": 2_048, "loader_batch": 32, "grid": 20,
                 "copies": 20}}
TINY = {"img": 32, "batches": (2,), "warmup": 1, "steps": (1, 2), "samples": 64,
        "loader_batch": 4, "grid": 3, "copies": 2}


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


def allot(weights, part, todo, left):
    """Seconds for `part`: `left` (seconds, 0 when negative) shared by weight among `todo` (it
    and the parts after it), so what a part leaves unused goes to the next; None for a part
    without a weight (it runs unbudgeted, or skips itself)."""
    if not weights.get(part):
        return None
    return max(0.0, left) * weights[part] / sum(weights.get(p, 0.0) for p in todo)


class Suite:
    """One run as every module's suite part sees it: args (the flags), device, amp, sizes (of
    SIZES), work (the --work folder), cores, name (the device's), commit, costs (what settings
    cost, kept by timing.run_settings), parts (the records of the parts done, by name) and
    fixture()."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.sizes = {**SIZES[args.device], **(TINY if args.tiny else {})}
        self.work = os.path.abspath(getattr(args, "work", os.path.join(args.out, "work")))
        self.cores, self.name = environment.cores(), environment.device_name(self.device)
        self.commit = environment.commit()
        self.amp = "bf16" if self.device.type == "cuda" else "none"
        self.costs, self.parts = {}, {}  # see run_settings; name -> record of a part done
        self.start = time.perf_counter()
        self.end = self.start + args.budget_s

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


def run_part(suite, name, todo, log):
    """The part's record: status, reason, seconds, its rows, table and caption."""
    allotted = allot(WEIGHTS[suite.args.device], name, todo, suite.end - time.perf_counter())
    deadline = time.perf_counter() + (allotted if allotted is not None else 60.0)
    record = {"name": name, "title": PARTS[name][0], "status": "ok", "reason": None,
              "allotted_s": None if allotted is None else round(allotted, 1)}
    start = time.perf_counter()
    try:
        if allotted is not None and allotted < 1.0:
            raise Skip("budget spent")
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            print(f"== {name}", flush=True)
            record.update(PARTS[name][1](suite, deadline))
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


def report_markdown(report):
    """The report as Markdown: a caption naming the device above every table."""
    dev = report["device"]
    lines = ["# RViT speed report", "", f"`{report['command']}` on {dev}, torch "
             f"{report['torch']}, commit {report['commit']}, {report['started']}: "
             f"{report['elapsed_s']:.0f} s of a {report['budget_s']:g} s budget. Each figure "
             f"is one run.", "", f"Parts on {dev}, in the order they ran:", ""]
    lines += markdown(["part", "status", "seconds", "allotted s"], [
        [p["title"], p["status"] + (f": {p['reason']}" if p["reason"] else ""), p["seconds"],
         "" if p["allotted_s"] is None else p["allotted_s"]] for p in report["parts"]])
    for p in report["parts"]:
        lines += ["", f"## {p['title']}", ""]
        if "table" not in p:
            lines.append(f"{p['status']}: {p['reason']}")
            continue
        lines += [f"{p['title']} on {dev}: {p['caption']}", ""] + markdown(*p["table"])
        lines += [""] + [f"- {n}" for n in p["notes"]] if p.get("notes") else []
    return "\n".join(lines) + "\n"


def write_report(suite, started):
    report = {"command": "python -m benchmarks.suite " + " ".join(sys.argv[1:]),
              "device": suite.name, "torch": torch.__version__, "commit": suite.commit,
              "started": started, "budget_s": suite.args.budget_s,
              "elapsed_s": round(time.perf_counter() - suite.start, 1), "sizes": suite.sizes,
              "parts": list(suite.parts.values())}
    text = report_markdown(report)
    for name, content in (("report.json", json.dumps(report, indent=1)), ("report.md", text)):
        with atomic_write(os.path.join(suite.args.out, name)) as tmp, open(tmp, "w") as f:
            f.write(content)
    return text


def stop(signum, frame):
    """SIGTERM (a scheduler ending the slot) and Ctrl-C: stop the part under way. The flag ends
    the run after it even where the exception is swallowed (a finalizer, such as a DataLoader
    shutting its workers down, ignores exceptions)."""
    STOPPED.append(signum)
    raise KeyboardInterrupt


def skipped(name, reason):
    return {"name": name, "title": PARTS[name][0], "status": "skipped", "reason": reason,
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
    with open(os.path.join(args.out, "suite.log"), "w") as log:
        for name in PARTS:
            if name not in chosen or STOPPED:
                suite.parts[name] = skipped(name, "stopped (interrupted)" if STOPPED
                                            else "not selected (--parts)")
                continue
            print(f"[{time.perf_counter() - suite.start:5.0f} s] {name} ...", flush=True)
            try:
                p = suite.parts[name] = run_part(suite, name, chosen[chosen.index(name):], log)
            except KeyboardInterrupt:
                STOPPED.append(signal.SIGINT)
                p = suite.parts[name] = skipped(name, "stopped (interrupted)")
            print(f"[{time.perf_counter() - suite.start:5.0f} s] {name}: {p['seconds']:.1f} s"
                  + (f" of {p['allotted_s']:.0f} allotted" if p["allotted_s"] else "")
                  + f", {summary(p)}", flush=True)
            write_report(suite, started)
    text = write_report(suite, started)
    if STOPPED:
        sys.exit(f"stopped: {args.out}/report.md holds the parts done so far")
    print(text)


if __name__ == "__main__":
    main()
