"""Every entry point and `python -m` tool: no abbreviated flags, defaults in --help, and errors
as one line naming the file (the traceback only with --debug)."""
import importlib
import os

import pytest
import torch
import yaml

from conftest import BEN_V1, ROOT, run

# (module, function returning the parsed args, arguments that parse)
PARSERS = [
    ("rvit.config", "train_parser", ["--dataset", "bigearthnet"]),
    ("evaluate", "parse_args", ["--checkpoint", "x.pt"]),
    ("predict", "parse_args", ["--checkpoint", "x.pt", "--input", "s.tif", "--out", "o"]),
    ("prepare_data", "parse_args", ["--dataset", "flair", "--out", "o"]),
    ("rvit.redundancy", "parse_args", ["--data-dir", "d", "--out", "o"]),
    ("rvit.report", "parse_args", ["runs"]),
    ("benchmarks.throughput", "parse_args", []),
    ("benchmarks.loader", "parse_args", ["--data-dir", "d"]),
    ("benchmarks.mapping", "parse_args", ["--data-dir", "d"]),
    ("benchmarks.convert", "parse_args", ["--root", "r"]),
    ("benchmarks.strategy_fit", "parse_args", ["--data-dir", "d", "--out", "o"]),
]


def parse(module, name, argv, monkeypatch):
    """Parse `argv` as the command line (sys.argv), as the entry point does."""
    monkeypatch.setattr("sys.argv", [module, *argv])
    fn = getattr(importlib.import_module(module), name)
    return fn().parse_args() if name == "train_parser" else fn()


@pytest.mark.parametrize("module,name,argv", PARSERS, ids=[p[0] for p in PARSERS])
def test_abbreviated_flags_are_errors_and_help_shows_defaults(module, name, argv, capsys,
                                                              monkeypatch):
    parse(module, name, argv, monkeypatch)  # the arguments alone parse
    with pytest.raises(SystemExit) as e:  # a prefix: --he would be --help
        parse(module, name, argv + ["--he"], monkeypatch)
    assert e.value.code == 2 and "unrecognized arguments: --he" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parse(module, name, ["--help"], monkeypatch)
    assert e.value.code == 0
    assert "(default: " in capsys.readouterr().out


def test_train_takes_no_prefix_of_a_flag():
    from rvit.config import train_parser
    with pytest.raises(SystemExit):
        train_parser().parse_args(["--dataset", "bigearthnet", "--epoch", "1"])


def one_line_error(proc, *words):
    """The process failed with one line naming `words`, and no traceback."""
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and all(w in err[-1] for w in words), proc.stderr
    return err[-1]


def cli_error(capsys, name, main, args, *words):
    """run_cli in this process: exit 1 and one stderr line naming `words`."""
    from rvit.cli import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(name, main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and all(w in err[0] for w in words), err
    return err[0]


def test_redundancy_and_report_name_a_missing_folder_in_one_line(tmp_path, capsys):
    from rvit import report
    missing = tmp_path / "missing"
    one_line_error(run("-m", "rvit.redundancy", "--data-dir", missing, "--out", tmp_path / "r",
                       check=False), str(missing / "train.h5"), "no such file")
    one_line_error(run("-m", "rvit.report", missing, check=False), str(missing), "no such")
    (tmp_path / "eval-bad.json").write_text("{not json")
    cli_error(capsys, "rvit.report", report.run, report.parse_args([str(tmp_path)]),
              "eval-bad.json", "not a JSON file")
    (tmp_path / "eval-bad.json").write_text('{"dataset": "x"}')
    cli_error(capsys, "rvit.report", report.run, report.parse_args([str(tmp_path)]),
              "eval-bad.json", "not an evaluate.py record")
    with pytest.raises(ValueError):  # --debug: the exception itself, with its traceback
        cli_error(capsys, "rvit.report", report.run,
                  report.parse_args([str(tmp_path), "--debug"]))


def test_truncated_hdf5_and_a_geotiff_as_checkpoint_are_one_line_errors(ben_v1, ben_run,
                                                                        tmp_path, capsys):
    import predict
    truncated = tmp_path / "test.h5"
    truncated.write_bytes((ben_v1 / "test.h5").read_bytes()[:5000])
    args = ["--input", str(truncated), "--out", str(tmp_path / "o"), "--device", "cpu"]
    line = cli_error(capsys, "predict.py", predict.main, predict.parse_args(
        ["--checkpoint", str(ben_run / "last.pt"), *args]), str(truncated),
        "not a readable HDF5 file")
    assert "truncated" in line
    tif = tmp_path / "scene.tif"
    tif.write_bytes(b"II*\x00" + bytes(2000))  # a TIFF header: no torch archive
    line = cli_error(capsys, "predict.py", predict.main, predict.parse_args(
        ["--checkpoint", str(tif), *args]), f"{tif}: not a readable checkpoint")
    assert "weights_only" not in line


MULTILABEL = "valid: mAP_macro, mAP_micro, F1_micro, F1_macro, F1_weighted"  # and nothing else


@pytest.mark.parametrize("key,value", [("main_metric", "mAP_marco"), ("main_metric", "gflops"),
                                       ("metrics", ["mAP_macro", "F1-macro"])])
def test_metric_names_in_config_are_checked_before_training(ben_v1, tmp_path, key, value):
    """A misspelt name, or a record's field that is no metric (gflops), stops train.py before
    its first epoch: no run folder, one line naming file, key and the task's metrics."""
    with open(os.path.join(ROOT, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["datasets"]["bigearthnet"][key] = value
    path, out = tmp_path / "config.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(cfg))
    proc = run("train.py", "--dataset", "bigearthnet", "--data-dir", ben_v1, "--out", out,
               "--config", path, "--img-size", "32", "--patch-size", "8", "--batch-size", "2",
               "--epochs", "1", "--workers", "0", "--device", "cpu", check=False)
    bad = value if key == "main_metric" else "F1-macro"
    line = one_line_error(proc, f"{path}: datasets.bigearthnet.{key}: ", repr(bad))
    assert line.endswith(MULTILABEL)
    assert not out.exists()  # no config.yaml, log.jsonl nor checkpoint: nothing ran


def test_evaluate_checks_a_checkpoints_metric_names_before_reading_data(ben_run, tmp_path,
                                                                        capsys):
    """A run trained before train.py checked the names: evaluate.py names the bad one before it
    reads any data (here there is none), instead of a KeyError after the evaluation."""
    import evaluate
    ckpt = torch.load(ben_run / "last.pt", weights_only=False)
    ckpt["config"]["metrics"] = ["mAP_macro", "F1-macro"]
    torch.save(ckpt, tmp_path / "old.pt")
    line = cli_error(capsys, "evaluate.py", evaluate.main, evaluate.parse_args(
        ["--checkpoint", str(tmp_path / "old.pt"), "--data-dir", str(tmp_path / "no-data"),
         "--device", "cpu"]), f"{tmp_path / 'old.pt'}: ", "datasets.bigearthnet.metrics: ",
        "'F1-macro'")
    assert line.endswith(MULTILABEL) and os.listdir(tmp_path) == ["old.pt"]


def test_metric_names_are_what_the_meters_compute():
    """Each task's names (what config.yaml may choose) are the scalars its meter returns, and
    its defaults are among them."""
    from rvit.tasks import TASKS
    for name, task in TASKS.items():
        meter = task.meter(3, None)
        meter.update(torch.randn(4, 3), torch.eye(3)[[0, 1, 2, 0]])
        scalars = {k for k, v in meter.compute().items() if isinstance(v, float)}
        assert scalars == set(task.names) and set(task.metrics) <= scalars, name


def test_progress_bars_stay_out_of_a_captured_stderr(tmp_path):
    """stderr into a log file (not a terminal): prepare_data.py's and train.py's bars are not
    drawn there, only their messages."""
    data = tmp_path / "data"
    prepared = run("prepare_data.py", "--dataset", "bigearthnet", "--root",
                   os.path.join(BEN_V1, "BigEarthNet-S2"), "--splits",
                   os.path.join(BEN_V1, "splits_v1_19class"), "--out", data)
    trained = run("train.py", "--dataset", "bigearthnet", "--data-dir", data, "--out",
                  tmp_path / "run", "--img-size", "32", "--patch-size", "8", "--batch-size", "2",
                  "--epochs", "1", "--workers", "0", "--device", "cpu")
    for proc in (prepared, trained):
        assert "\r" not in proc.stderr and "%|" not in proc.stderr, proc.stderr
