"""Every entry point and `python -m` tool: no abbreviated flags, defaults in --help, and errors
as one line naming the file (the traceback only with --debug)."""
import importlib

import pytest

from conftest import run

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
