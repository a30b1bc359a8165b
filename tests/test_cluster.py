"""train.py as a cluster job: one command starts or continues a run, a finished run is never
overwritten, preemption signals stop every rank at one step, torchrun restarts continue exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CPU, ROOT, run
from rvit import lifecycle
from rvit.checkpoint import load_checkpoint
from rvit.preemption import Preemption, signal_names

BEN_RUN = ["--img-size", "64", "--batch-size", "2", "--epochs", "1", "--mask", "0.5", *CPU]
# 2 ranks x batch 1 on the 7 training patches: 3 steps per epoch, 6 in all
JOB = ["--img-size", "32", "--batch-size", "1", "--epochs", "2", "--mask", "0.5", "--seed", "7",
       "--checkpoint-every", "1", "--resume", "auto", *CPU]
STEPS = 6


def train(data, out, *flags, env=None):
    return run("train.py", "--dataset", "bigearthnet", "--data-dir", data, "--out", out, *flags,
               env=env, check=False)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def log(folder):
    return [json.loads(line) for line in open(folder / "log.jsonl")]


def same_weights(a, b):
    """Bit-identical weights and masker state (its tau is NaN but for the dynamic strategy)."""
    a, b = load_checkpoint(str(a / "last.pt")), load_checkpoint(str(b / "last.pt"))
    for part in ("model", "masker"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, equal_nan=True)
    return True


def one_error_line(proc, only=True):
    """The error line of a failed run; with `only`, nothing else may be on stderr (no progress
    bar: it stopped before training)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 or not only, proc.stderr[-2000:]
    return lines[-1]


def test_a_repeated_command_on_a_finished_run_changes_nothing(ben_v1, ben_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ben_run, out)
    before = files(out)
    line = one_error_line(train(ben_v1, out, *BEN_RUN))
    assert line == (f"train.py: error: {out}: holds a run (last.pt, best.pt, log.jsonl); "
                    "--resume continues it, --overwrite replaces it, or choose another --out")
    line = one_error_line(train(ben_v1, out, *BEN_RUN, "--resume", "auto", "--overwrite"))
    assert "--overwrite" in line and "--resume" in line
    done = train(ben_v1, out, *BEN_RUN, "--resume", "auto")  # a requeue after the end
    assert done.returncode == 0 and "the run is complete (epoch 1/1)" in done.stdout
    assert files(out) == before


def test_resume_auto_in_an_empty_folder_trains_from_scratch(ben_v1, ben_run, tmp_path):
    assert train(ben_v1, tmp_path, *BEN_RUN, "--resume", "auto").returncode == 0
    assert same_weights(tmp_path, ben_run)
    assert [entry["epoch"] for entry in log(tmp_path)] == [1]  # no event lines


KEEP = "(a resume keeps the run's flags; a longer --epochs is allowed)"


@pytest.mark.parametrize("case,message", [
    ("dataset", "trained on 'flair', not 'bigearthnet'"),
    ("model", "trained with --model vit_tiny, not vit_small"),
    ("mask", f"trained with --mask 0.5, not --mask 0.75 {KEEP}"),
    ("schedule", "trained with --mask-range none --strategy similarity --no-merge --lr 0.0005 "
                 "--warmup-epochs 2, not --mask-range 0 0.9 --strategy kmedoids --merge "
                 f"--lr 0.001 --warmup-epochs 0 {KEEP}"),
])
def test_resume_auto_refuses_another_run_in_one_line(ben_v1, ben_run, tmp_path, case, message):
    out = tmp_path / "run"
    shutil.copytree(ben_run, out)
    flags, data = list(BEN_RUN), ben_v1
    if case == "dataset":
        ckpt = load_checkpoint(str(out / "last.pt"))
        ckpt["config"]["dataset"] = "flair"
        torch.save(ckpt, out / "last.pt")
    elif case == "model":
        flags += ["--model", "vit_small"]
    else:  # read from last.pt alone, before any data: a missing --data-dir is never reached
        data = tmp_path / "no-data"
        flags += {"mask": ["--mask", "0.75"],
                  "schedule": ["--mask-range", "0", "0.9", "--strategy", "kmedoids", "--merge",
                               "--lr", "0.001", "--warmup-epochs", "0"]}[case]
    before = files(out)
    line = one_error_line(train(data, out, *flags, "--resume", "auto"))
    assert line == f"train.py: error: {out / 'last.pt'}: {message}"
    assert files(out) == before


def test_resume_with_a_longer_epochs_continues_the_run(ben_v1, ben_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ben_run, out)
    proc = train(ben_v1, out, *BEN_RUN, "--epochs", "2", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [e.get("event", e["epoch"]) for e in log(out)] == [1, "resume", 2]
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 2


def test_overwrite_replaces_the_run_and_says_so(ben_v1, ben_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ben_run, out)
    (out / "notes.txt").write_text("mine")
    proc = train(ben_v1, out, "--img-size", "32", "--batch-size", "2", "--epochs", "1",
                 "--overwrite", *CPU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("--overwrite: removed config.yaml, log.jsonl, last.pt, best.pt, curves.png of the run "
            f"in {out}") in proc.stdout
    assert [entry["epoch"] for entry in log(out)] == [1] and (out / "notes.txt").exists()
    assert load_checkpoint(str(out / "last.pt"))["config"]["img_size"] == 32


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to fill a disk")
def test_failed_checkpoint_write_keeps_the_previous_last_pt(ben_v1, ben_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ben_run, out)
    before = (out / "last.pt").read_bytes()
    os.symlink("/dev/full", out / "last.pt.tmp")  # every write to it: ENOSPC, as on a full disk
    line = one_error_line(train(ben_v1, out, *BEN_RUN, "--epochs", "2", "--resume"), only=False)
    assert line == (f"train.py: error: {out / 'last.pt'}: could not write the checkpoint "
                    "(No space left on device); the previous one is intact")
    assert (out / "last.pt").read_bytes() == before and not (out / "last.pt.tmp").exists()


def test_folder_plans(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert lifecycle.plan(tmp_path, "auto", False) == "start"
    (tmp_path / "config.yaml").write_text("")  # a start that saved nothing
    assert lifecycle.plan(tmp_path, False, False) == "start"
    (tmp_path / "best.pt").write_text("")
    with pytest.raises(ValueError, match="no last.pt to continue from; --overwrite replaces"):
        lifecycle.plan(tmp_path, "auto", False)
    (tmp_path / "last.pt").write_text("")
    assert lifecycle.plan(tmp_path, "auto", False) == "continue"
    assert lifecycle.plan(tmp_path, False, True) == "replace"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun reruns --overwrite
    assert lifecycle.plan(tmp_path, False, True) == "restart"  # train.py asks whose last.pt
    (tmp_path / "last.pt").unlink()
    assert lifecycle.plan(tmp_path, False, True) == "replace"


def test_overwrite_under_a_torchrun_restart_replaces_the_old_run(ben_v1, ben_run, tmp_path):
    """The first attempt died before it removed the old run (mask 0.5): the restart must not
    take that run's last.pt for its own."""
    out = tmp_path / "run"
    shutil.copytree(ben_run, out)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    proc = run("train.py", "--dataset", "bigearthnet", "--data-dir", ben_v1, "--out", out,
               "--img-size", "32", "--patch-size", "8", "--batch-size", "2", "--epochs", "1",
               "--mask", "0.75", "--strategy", "random", "--overwrite", *CPU,
               env={**env, "TORCHELASTIC_RESTART_COUNT": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing to train" not in proc.stdout and "--overwrite: removed" in proc.stdout
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["config"]["mask"] == 0.75 and ckpt["config"]["strategy"] == "random"
    assert [entry["epoch"] for entry in log(out)] == [1]


@pytest.mark.parametrize("job,ours", [("job-1", True), ("job-2", False)])
def test_overwrite_restart_continues_only_its_own_job(ben_v1, ben_run, tmp_path, job, ours):
    """last.pt records torchrun's rendezvous id: a restart continues what its own job wrote
    and replaces a run of the same flags that another job wrote."""
    out = tmp_path / "run"
    shutil.copytree(ben_run, out)
    ckpt = load_checkpoint(str(out / "last.pt"))
    torch.save({**ckpt, "torchrun_id": "job-1"}, out / "last.pt")
    before = files(out)
    env = {**os.environ, "TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": job}
    proc = train(ben_v1, out, *BEN_RUN, "--overwrite", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("the run is complete (epoch 1/1)" in proc.stdout) == ours
    assert (files(out) == before) == ours
    assert load_checkpoint(str(out / "last.pt"))["torchrun_id"] == ("job-1" if ours else job)


def test_signal_names_and_a_signal_recorded():
    assert signal_names(" term,SIGUSR1") == "SIGTERM,SIGUSR1" and signal_names("none") == ""
    with pytest.raises(Exception, match="SIGKILL"):
        signal_names("KILL")
    old = signal.getsignal(signal.SIGUSR1)
    try:
        stop = Preemption("SIGUSR1")
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert stop.requested() and stop.name == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, old)


def torchrun(data, out, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "--max-restarts", str(restarts), os.path.join(ROOT, "train.py"), "--dataset",
            "bigearthnet", "--data-dir", str(data), "--out", str(out), *JOB]


def workers(pid):
    """{local rank: pid} of the train.py processes torchrun `pid` started."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue  # not a process, or one that has just ended
        if ppid == pid and b"LOCAL_RANK" in env:
            found[int(env[b"LOCAL_RANK"])] = int(entry)
    return found


def signal_mid_epoch(cmd, out, sig, ranks, env=None, timeout=120):
    """Run torchrun `cmd`; send `sig` to the workers of `ranks` as soon as the first mid-epoch
    last.pt exists (their pids found before, so the signal follows at once). Returns
    (returncode, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + timeout
    try:
        pids = {}
        while len(pids) < 2 and time.time() < deadline and proc.poll() is None:
            pids = workers(proc.pid)
            time.sleep(0.05)
        while not (out / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.002)
        for rank in ranks:
            os.kill(pids[rank], sig)
        _, err = proc.communicate(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:  # a hang fails the test, and leaves nothing running
            proc.kill()
    return proc.returncode, err


@pytest.fixture(scope="module")
def straight(ben_v1, tmp_path_factory):
    """An uninterrupted 2-rank run of JOB (`--resume auto` in an empty folder)."""
    out = tmp_path_factory.mktemp("straight")
    proc = subprocess.run(torchrun(ben_v1, out), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("ranks", [[1], [0, 1]], ids=["rank 1", "both ranks"])
def test_preempted_job_resumes_to_the_weights_of_an_uninterrupted_one(ben_v1, straight, tmp_path,
                                                                      ranks):
    out = tmp_path / "run"
    rc, err = signal_mid_epoch(torchrun(ben_v1, out), out, signal.SIGTERM, ranks)
    assert rc != 0 and "exitcode  : 75" in err, err[-3000:]  # torchrun: 75 is a failure
    event, = log(out)
    assert event["event"] == "preempted" and event["signal"] == "SIGTERM"
    assert event["epoch"] == 1 and 0 < event["batch"] < STEPS // 2  # mid-epoch
    assert load_checkpoint(str(out / "last.pt"))["global_step"] == event["global_step"]
    proc = subprocess.run(torchrun(ben_v1, out), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = log(out)
    assert [e.get("event") for e in lines] == ["preempted", "resume", None, None]
    assert lines[1]["batch"] == event["batch"] and [e["epoch"] for e in lines[2:]] == [1, 2]
    assert same_weights(out, straight)


def test_worker_killed_under_torchrun_is_restarted_and_ends_exactly(ben_v1, straight, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see the README
    rc, err = signal_mid_epoch(torchrun(ben_v1, out, restarts=1), out, signal.SIGKILL, [1], env)
    assert rc == 0, err[-3000:]
    lines = log(out)
    assert [e.get("event") for e in lines] == ["resume", None, None]
    assert load_checkpoint(str(out / "last.pt"))["global_step"] == STEPS
    assert same_weights(out, straight)


def test_cluster_page_sbatch_script_is_valid_bash(tmp_path):
    text = open(os.path.join(ROOT, "docs", "cluster.md")).read()
    script = text[text.index("#!/bin/bash\n#SBATCH"):]
    script = script[:script.index("```")]
    assert "--resume auto" in script and "--signal=USR1@120" in script and "--requeue" in script
    (tmp_path / "train.sbatch").write_text(script)
    proc = subprocess.run(["bash", "-n", str(tmp_path / "train.sbatch")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_a_restart_knows_its_own_run_only_by_a_real_job_id_and_the_same_command(monkeypatch):
    """torchrun's default id "none" names no job, and a last.pt of another seed or data folder
    is another run, whatever its id: --overwrite replaces both."""
    import argparse
    args = argparse.Namespace(**{k: 1 for k in lifecycle.RESUME_FLAGS + lifecycle.SAME_RUN_KEYS})
    ckpt = {"torchrun_id": "job-1", "meta": {"task": "multilabel"}, "config": dict(vars(args))}
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    assert lifecycle.this_job(ckpt, args)
    assert not lifecycle.this_job({**ckpt, "config": {**ckpt["config"], "seed": 2}}, args)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert not lifecycle.this_job({**ckpt, "torchrun_id": "none"}, args)
