"""Shared fixtures: paths to the real EO samples in ../shared/data, and prepared HDF5 splits."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
BEN_V1 = os.path.join(SHARED, "bigearthnet", "v1")
BEN_V2 = os.path.join(SHARED, "bigearthnet", "v2")


def need(path):
    """Skip, with the reason, when a folder of real samples is absent."""
    if not os.path.exists(path):
        pytest.skip(f"real samples not found at {path} (../shared/data beside the project)")
    return path


def run(script, *args, env=None, check=True):
    """Run one of the project's entry points in a fresh interpreter; returns CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def ben_v1(tmp_path_factory):
    """Real BigEarthNet v1 S2 patches, official 19-class splits, snow/cloud lists applied."""
    v1 = need(BEN_V1)
    out = tmp_path_factory.mktemp("ben_v1")
    ex = os.path.join(v1, "exclusions")
    run("prepare_data.py", "--dataset", "bigearthnet", "--root", os.path.join(v1, "BigEarthNet-S2"),
        "--splits", os.path.join(v1, "splits_v1_19class"), "--exclude",
        os.path.join(ex, "patches_with_seasonal_snow.csv"),
        os.path.join(ex, "patches_with_cloud_and_shadow.csv"), "--out", out)
    return out
