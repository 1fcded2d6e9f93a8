"""Command-line parsing, in-process (no subprocess, no MPI launcher): the shared job options, the
default command, the exit codes, and the commands that need no job at all."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hpc_bkd import errors
from hpc_bkd.cli import args as cli_args
from hpc_bkd.cli import main as cli
from hpc_bkd.config import ConfigError, shipped_configs


def _job_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_args.add_job_arguments(parser)
    return parser.parse_args(list(argv))


def test_exit_codes_are_distinct_and_stable():
    # schedulers and scripts test these numbers: changing one is an interface change
    assert (errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_BAD_INPUT, errors.EXIT_INTERRUPTED) == (0, 1, 2, 3)


def test_job_arguments_default_to_the_default_config():
    args = _job_args()
    assert (args.config, args.run_dir, args.overrides) == (None, None, [])
    cfg = cli_args.job_config(args)
    assert cfg.model.arch == "vgg16" and cfg.run.dir == "runs/default"


def test_overrides_and_run_dir_reach_the_config():
    args = _job_args("-c", "tiny", "--set", "distill.epochs=2", "--set", "run.threads=1", "--run-dir", "/tmp/r")
    cfg = cli_args.job_config(args)
    assert cfg.distill.epochs == 2 and cfg.run.threads == 1
    assert cfg.run.dir == "/tmp/r"


def test_run_dir_option_wins_over_a_set_of_run_dir():
    args = _job_args("--set", "run.dir=/tmp/a", "--run-dir", "/tmp/b")
    assert cli_args.job_overrides(args) == ["run.dir=/tmp/a", "run.dir=/tmp/b"]
    assert cli_args.job_config(args).run.dir == "/tmp/b"


def test_a_bad_override_is_a_config_error():
    with pytest.raises(ConfigError, match="distill"):
        cli_args.job_config(_job_args("--set", "distill.nope=1"))


@pytest.mark.parametrize("argv, expected", [
    ([], ["run"]),
    (["--set", "distill.epochs=2"], ["run", "--set", "distill.epochs=2"]),
    (["-c", "tiny"], ["run", "-c", "tiny"]),
    (["plan", "--ranks", "4"], ["plan", "--ranks", "4"]),
    (["export", "--teacher"], ["export", "--teacher"]),
    (["configs"], ["configs"]),
    (["-h"], ["-h"]),
    (["--help"], ["--help"]),
])
def test_no_command_means_run(argv: list[str], expected: list[str]):
    assert cli.normalize_argv(argv) == expected


def test_every_command_has_a_parser_and_the_job_options():
    parser = cli.build_parser()
    for command in cli.COMMANDS:
        args = parser.parse_args([command])
        assert args.command == command
        if command not in ("config-keys", "configs"):
            assert hasattr(args, "overrides") and hasattr(args, "run_dir") and hasattr(args, "config")


def test_export_options():
    args = cli.build_parser().parse_args(["export", "--run-dir", "d", "--formats", "onnx", "--teacher"])
    assert (args.run_dir, args.formats, args.teacher) == ("d", "onnx", True)
    args = cli.build_parser().parse_args(["export"])
    assert (args.formats, args.teacher) == ("pt2,onnx", False)


def test_config_keys_prints_every_section(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["config-keys"]) == errors.EXIT_OK
    out = capsys.readouterr().out
    for section in ("model:", "data:", "distill:", "run:"):
        assert section in out
    assert "device:" in out


def test_configs_lists_the_shipped_configs(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["configs"]) == errors.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in lines}
    assert names == set(shipped_configs()) and {"tiny", "digits-vgg16"} <= names


def test_a_config_error_exits_with_bad_input(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["evaluate", "--set", "nosuch.key=1"]) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("hpc-bkd: config error:") and "nosuch" in err


def test_evaluate_without_a_run_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert cli.main(["evaluate", "-c", "tiny", "--run-dir", str(tmp_path)]) == errors.EXIT_BAD_INPUT
    assert "student.pt not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- export


@pytest.fixture
def export_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Replace export_main by a recorder (the real one trains nothing but needs a finished run)."""
    export = pytest.importorskip("hpc_bkd.deploy.export")
    calls: list[tuple] = []
    monkeypatch.setattr(export, "export_main", lambda run_dir, formats, include_teacher:
                        calls.append((run_dir, list(formats), include_teacher)))
    return calls


def test_export_passes_run_dir_formats_and_teacher(export_calls: list[tuple], tmp_path: Path):
    assert cli.main(["export", "--run-dir", str(tmp_path), "--formats", "pt2, onnx", "--teacher"]) == errors.EXIT_OK
    assert export_calls == [(tmp_path, ["pt2", "onnx"], True)]


def test_export_run_dir_defaults_to_the_configs(export_calls: list[tuple]):
    assert cli.main(["export", "-c", "tiny", "--set", "run.dir=/tmp/from-config"]) == errors.EXIT_OK
    assert export_calls == [(Path("/tmp/from-config"), ["pt2", "onnx"], False)]


@pytest.mark.parametrize("error", [
    FileNotFoundError("/x/student.pt not found: run `hpc-bkd run` first"),
    ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime"),
    ImportError("export format 'onnx' needs onnx,\nnot installed: pip install -e '.[export]'"),
])
def test_export_errors_the_user_can_fix_are_one_line_and_bad_input(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   error: Exception, tmp_path: Path):
    export = pytest.importorskip("hpc_bkd.deploy.export")

    def fail(*_: object) -> None:
        raise error

    monkeypatch.setattr(export, "export_main", fail)
    assert cli.main(["export", "--run-dir", str(tmp_path)]) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("hpc-bkd: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_export_of_a_broken_hpc_bkd_import_is_a_bug_not_bad_input(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path):
    export = pytest.importorskip("hpc_bkd.deploy.export")

    def fail(*_: object) -> None:
        raise ImportError("cannot import name 'gone' from 'hpc_bkd.deploy.form'", name="hpc_bkd.deploy.form")

    monkeypatch.setattr(export, "export_main", fail)
    assert cli.main(["export", "--run-dir", str(tmp_path)]) == errors.EXIT_FAILED
    assert "Traceback" in capsys.readouterr().err


def test_export_with_a_missing_run_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pytest.importorskip("hpc_bkd.deploy.export")
    assert cli.main(["export", "--run-dir", str(tmp_path / "none")]) == errors.EXIT_BAD_INPUT
    assert "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hpc_bkd.launch


def test_launch_cli_shares_the_job_options():
    from hpc_bkd.launch.__main__ import build_parser

    args = build_parser().parse_args(["submit", "-c", "tiny", "--set", "distill.epochs=1", "--run-dir", "r",
                                      "--nodes", "2", "--sbatch", "account=proj"])
    assert (args.config, args.overrides, args.run_dir, args.nodes) == ("tiny", ["distill.epochs=1"], "r", 2)
    assert args.sbatch == [("account", "proj")]


def test_launch_cli_config_error_is_bad_input(capsys: pytest.CaptureFixture[str]):
    from hpc_bkd.launch.__main__ import main

    assert main(["submit", "--executor", "debug", "--set", "nosuch.key=1"]) == errors.EXIT_BAD_INPUT
    assert "nosuch" in capsys.readouterr().err

