"""What the figures depend on: the device, memory, versions, whether varlen attention and
torch.compile work, the checkout's commit; and the tests that need a GPU (`pytest -m cuda`).
The suite's first two parts."""
import contextlib
import importlib.util
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import h5py
import torch

from benchmarks.timing import ROOT, Skip


def cores():
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def device_name(device):
    """'<GPU> (CUDA <version>)', or 'CPU: <model>, <n> cores'."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), model)
    return f"CPU: {model}, {cores()} cores"


def commit():
    """The checkout's commit, and whether tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, text=True,
                              capture_output=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + \
        (" (uncommitted changes)" if dirty else "")


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


def suite_part(suite, deadline):
    """The suite's record of the device, memory, load, shared memory, versions and
    capabilities."""
    device, cuda = suite.device, suite.device.type == "cuda"
    rows = [("device", suite.name), ("CPU cores", suite.cores)]
    if cuda:
        props = torch.cuda.get_device_properties(device)
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
             ("cuDNN", torch.backends.cudnn.version() if cuda else "n/a (CPU run)"),
             ("h5py", h5py.__version__), ("timm", timm_version() or "not installed"),
             ("varlen attention", varlen_usable(device)),
             ("torch.compile", compile_usable(device)), ("commit", suite.commit)]
    return {"rows": [{"item": k, "value": str(v)} for k, v in rows],
            "table": (["item", "value"], [[k, str(v)] for k, v in rows]),
            "caption": "versions and capabilities the figures below depend on."}


def cuda_tests_part(suite, deadline):
    """The suite's record of `pytest -m cuda`, stopped at the deadline: one row per test."""
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
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}",
                     "outcome": {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
                         found[0].tag if found else None, "passed"),
                     "seconds": round(float(case.get("time", 0)), 1),
                     "detail": ((found[0].get("message") or "") + "\n").splitlines()[0][:160]
                     if found else ""})
    return {"rows": rows, "table": (["test", "outcome", "seconds", "detail"],
                                    [list(r.values()) for r in rows]),
            "caption": "`pytest -m cuda`: the tests that need a GPU.",
            "status": "ok" if all(r["outcome"] == "passed" for r in rows) else "partial"}
