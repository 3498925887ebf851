"""`r1-grpo <command>`: usage, errors, version and dispatch to the command modules."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

import trainer
from trainer import cli
from trainer.contract.stages import STAGE_MODULES, STAGES


def test_no_arguments_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: r1-grpo <command> [flags]")
    for name in (*cli.COMMANDS, "version"):
        assert f"\n  {name} " in out, name


@pytest.mark.parametrize("flag", ["-h", "--help", "help"])
def test_help_succeeds(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    assert cli.main([flag]) == 0
    assert capsys.readouterr().out == cli.usage() + "\n"


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trian", "--max_steps", "3"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("r1-grpo: unknown command 'trian'\n\nusage: r1-grpo")
    assert captured.out == ""


@pytest.mark.parametrize("command", ["version", "--version"])
def test_version(capsys: pytest.CaptureFixture[str], command: str) -> None:
    assert cli.main([command]) == 0
    assert capsys.readouterr().out == f"{trainer.__version__}\n"
    assert trainer.__version__ == importlib.metadata.version("r1-grpo")


def test_every_command_names_a_callable() -> None:
    for name, (module, func, help_) in cli.COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), func)), name
        assert help_


def test_stage_commands_run_the_contract_modules() -> None:
    # The chart, the local pipeline and `r1-grpo <stage>` must start the same module for a stage.
    assert {name: cli.COMMANDS[name][0] for name in STAGES} == STAGE_MODULES


def test_dispatch_passes_the_remaining_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # build-tiny refuses an existing folder before building anything: a cheap way to see the flags arrive.
    assert cli.main(["build-tiny", "--output_dir", str(tmp_path)]) == 2
    assert f"--output_dir {tmp_path}: already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--help"])
    assert e.value.code == 0
    assert "usage: r1-grpo sft" in capsys.readouterr().out


def test_installed_entry_points(stage_runner) -> None:
    version = stage_runner.run_script("r1-grpo", ["version"])
    assert (version.returncode, version.output) == (0, f"{trainer.__version__}\n"), version.describe()
    module = stage_runner.run("trainer", ["--version"])
    assert (module.returncode, module.output) == (0, f"{trainer.__version__}\n"), module.describe()
    unknown = stage_runner.run_script("r1-grpo", ["nope"])
    assert unknown.returncode == 2 and "r1-grpo: unknown command 'nope'" in unknown.output
    bare = stage_runner.run_script("r1-grpo", [])
    assert bare.returncode == 2 and bare.output.startswith("usage: r1-grpo")


@pytest.mark.parametrize("command", ["sft", "grpo", "eval"])
def test_flag_prefixes_are_not_accepted(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Chart values map 1:1 onto flags: a truncated or misspelt name must fail, never match another flag.
    with pytest.raises(SystemExit) as e:
        cli.main(
            [
                command,
                "--model_name_or_path",
                "m",
                "--dataset_name",
                "d",
                "--output_dir",
                "o",
                "--max_eval_sample",
                "5",
            ]
        )
    assert e.value.code == 2
    assert "unrecognized arguments: --max_eval_sample 5" in capsys.readouterr().err
