"""The stage contract: args maps rendered onto CLI flags, pipeline configs and the plan's model hand-off."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import yaml

from trainer.contract.stages import (
    STAGE_MODULES,
    STAGES,
    ConfigError,
    args_to_cli,
    load_config,
    model_sources,
    parse_config,
    plan,
)

# ---------------------------------------------------------------------------------------------
# args_to_cli


def test_keys_sorted_and_scalars() -> None:
    assert args_to_cli(
        {"output_dir": "runs/x", "beta": 0.04, "max_steps": 60, "dataset_name": "builtin:arith"}
    ) == [
        "--beta",
        "0.04",
        "--dataset_name",
        "builtin:arith",
        "--max_steps",
        "60",
        "--output_dir",
        "runs/x",
    ]


def test_booleans_lists_and_none() -> None:
    args = {
        "bf16": True,
        "dynamic_sampling": False,
        "reward_funcs": ["r1", "format"],
        "reward_weights": [1.0, 0.5],
        "run_name": None,
        "save_total_limit": None,
        "tags": ("a", True, 2.0),
    }
    assert args_to_cli(args) == [
        "--bf16",
        "true",
        "--dynamic_sampling",
        "false",
        "--reward_funcs",
        "r1",
        "format",
        "--reward_weights",
        "1",
        "0.5",
        "--tags",
        "a",
        "true",
        "2",
    ]


def test_values_stay_single_arguments() -> None:
    assert args_to_cli({"run_name": "my run", "dataset_name": "data/{split}.jsonl"}) == [
        "--dataset_name",
        "data/{split}.jsonl",
        "--run_name",
        "my run",
    ]


def test_map_values_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="argument 'lora'"):
        args_to_cli({"lora": {"r": 8}})


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        # Integral numbers print as integers: Helm reads `3` from YAML as float64 3.0.
        (3.0, "3"),
        (1000000.0, "1000000"),
        (-2.0, "-2"),
        (0.0, "0"),
        (-0.0, "0"),
        (100.0, "100"),
        (3, "3"),
        (1000000, "1000000"),
        # Other floats as Go's %v: shortest digits, exponent form when the exponent is < -4 or >= 6.
        (2e-05, "2e-05"),
        (1.5e-05, "1.5e-05"),
        (0.1, "0.1"),
        (0.7, "0.7"),
        (-0.25, "-0.25"),
        (0.0001, "0.0001"),
        (0.00012, "0.00012"),
        (123456.5, "123456.5"),
        (999999.5, "999999.5"),
        (1234567.5, "1.2345675e+06"),
        (12345678.9, "1.23456789e+07"),
        # Integral but beyond the chart's int64 window (|x| >= 1e15): Go's %v as well.
        (1e15, "1e+15"),
        (2.5e20, "2.5e+20"),
        (1e21, "1e+21"),
        (-1e16, "-1e+16"),
        (1e-300, "1e-300"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_numbers_render_like_the_chart(value: float, rendered: str) -> None:
    assert args_to_cli({"x": value}) == ["--x", rendered]


def test_rendered_flags_parse_back_to_the_values() -> None:
    # The point of the rendering: the stage's own flag parser reads back what the config said.
    from trainer.grpo import GRPOArgs
    from trainer.r1.data import DataArgs
    from trainer.runtime import parse_args

    args = {
        "model_name_or_path": "m",
        "output_dir": "o",
        "dataset_name": "builtin:arith",
        "learning_rate": 2e-05,
        "max_steps": 60.0,
        "beta": 0.0,
        "bf16": True,
        "dynamic_sampling": False,
        "reward_funcs": ["r1", "format"],
        "reward_weights": [1.0, 0.5],
        "max_train_samples": None,
    }
    data, grpo = parse_args((DataArgs, GRPOArgs), args_to_cli(args), prog="t")
    assert (grpo.learning_rate, grpo.max_steps, grpo.beta, grpo.bf16, grpo.dynamic_sampling) == (
        2e-05,
        60,
        0.0,
        True,
        False,
    )
    assert grpo.reward_funcs == ["r1", "format"] and grpo.reward_weights == [1.0, 0.5]
    assert data.max_train_samples is None and data.dataset_name == "builtin:arith"


# ---------------------------------------------------------------------------------------------
# Pipeline configs


def _write(tmp_path: Path, config: object, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config) if not isinstance(config, str) else config)
    return path


def test_load_config(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "release": "r7",
            "root": str(tmp_path / "runs"),
            "model": "Qwen/Qwen2.5-0.5B",
            "dataset": "openai/gsm8k",
            "stages": {
                "sft": {"nproc_per_node": 2, "args": {"learning_rate": 2e-05}},
                "grpo": {"enabled": False},
                "eval": None,
            },
        },
    )
    cfg = load_config(path)
    assert (cfg.release, cfg.model, cfg.dataset, cfg.source) == (
        "r7",
        "Qwen/Qwen2.5-0.5B",
        "openai/gsm8k",
        str(path),
    )
    assert cfg.stages["sft"].nproc_per_node == 2 and cfg.stages["sft"].args == {"learning_rate": 2e-05}
    assert not cfg.stages["grpo"].enabled
    assert cfg.stages["eval"].enabled and cfg.stages["eval"].args == {}


def test_overrides_replace_top_level_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, {"release": "a", "stages": {"eval": {}}})
    cfg = load_config(path, overrides={"release": "b", "root": None, "model": "builtin:tiny-qwen2"})
    assert (cfg.release, cfg.root, cfg.model) == ("b", "runs", "builtin:tiny-qwen2")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"stages": {"dpo": {}}}, "stages.dpo: unknown stage; stages are prepare, sft, grpo, eval"),
        ({"stages": {"sft": {"epochs": 3}}}, r"stages.sft: unknown keys \['epochs'\]"),
        (
            {"stages": {"grpo": {"args": {"output_dir": "/x"}}}},
            "stages.grpo.args.output_dir is set by the pipeline",
        ),
        ({"stages": {"sft": {"nproc_per_node": 0}}}, "stages.sft.nproc_per_node must be a positive integer"),
        (
            {"stages": {"sft": {"nproc_per_node": True}}},
            "stages.sft.nproc_per_node must be a positive integer",
        ),
        ({"stages": {"sft": {"enabled": "yes"}}}, "stages.sft.enabled must be true or false"),
        ({"stages": {"sft": {"args": ["lr"]}}}, "stages.sft.args must be a map"),
        ({"stages": {"sft": "on"}}, "stages.sft must be a map"),
        ({"stages": {"sft": {"args": {"lora": {"r": 8}}}}}, "stages.sft.args: argument 'lora': a map cannot"),
        ({"stages": {"sft": {"enabled": False}}}, "no stage is enabled"),
        ({"stages": {}}, "no stage is enabled"),
        ({"stages": ["sft"]}, "'stages' must be a map"),
        ({"relase": "x", "stages": {"sft": {}}}, r"unknown top-level keys \['relase'\]"),
        ({"release": "", "stages": {"sft": {}}}, "'release' must be a non-empty string"),
        ({"model": 3, "stages": {"sft": {}}}, "'model' must be a non-empty string"),
        ("- just\n- a list\n", "the top level must be a map"),
        ("stages: {sft: [\n", "invalid YAML"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, config: object, message: str) -> None:
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ")


def test_unreadable_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read pipeline config") as e:
        load_config(tmp_path / "missing.yaml")
    assert str(tmp_path / "missing.yaml") in str(e.value)


def test_model_name_on_a_later_stage_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, {"stages": {"sft": {}, "grpo": {"args": {"model_name_or_path": "other"}}}})
    with pytest.raises(
        ConfigError, match="stages.grpo.args.model_name_or_path: this stage starts from the sft"
    ) as e:
        plan(load_config(path))
    assert str(e.value).startswith(f"{path}: ")
    # eval after grpo: the same rule, naming the stage it starts from.
    path = _write(tmp_path, {"stages": {"grpo": {}, "eval": {"args": {"model_name_or_path": "x"}}}}, "b.yaml")
    with pytest.raises(
        ConfigError, match="stages.eval.args.model_name_or_path: this stage starts from the grpo"
    ):
        plan(load_config(path))


# ---------------------------------------------------------------------------------------------
# plan(): output folders and the model hand-off


def _plan(stages: dict, **top) -> list:
    return plan(
        parse_config(
            {
                "release": "r1",
                "root": "/vol",
                "model": "base-model",
                "dataset": "ds",
                **top,
                "stages": stages,
            },
            "test.yaml",
        )
    )


def test_plan_sft_grpo_eval() -> None:
    runs = _plan(
        {
            "sft": {"nproc_per_node": 2, "args": {"learning_rate": 2e-05}},
            "grpo": {"args": {"dataset_name": "other"}},
            "eval": {},
        }
    )
    assert [r.name for r in runs] == ["sft", "grpo", "eval"]
    sft, grpo, ev = runs
    assert (
        sft.output_dir == Path("/vol/r1/sft")
        and sft.model_name_or_path == "base-model"
        and sft.model_from_stage is None
    )
    assert sft.nproc_per_node == 2
    assert sft.args == {
        "learning_rate": 2e-05,
        "dataset_name": "ds",
        "model_name_or_path": "base-model",
        "output_dir": "/vol/r1/sft",
    }
    assert (grpo.model_name_or_path, grpo.model_from_stage) == ("/vol/r1/sft", "sft")
    assert grpo.args["dataset_name"] == "other"  # a stage's own dataset wins over the top-level one
    assert (ev.model_name_or_path, ev.model_from_stage, ev.output_dir) == (
        "/vol/r1/grpo",
        "grpo",
        Path("/vol/r1/eval"),
    )
    assert sft.cli_args() == [
        "--dataset_name",
        "ds",
        "--learning_rate",
        "2e-05",
        "--model_name_or_path",
        "base-model",
        "--output_dir",
        "/vol/r1/sft",
    ]


def test_plan_grpo_only() -> None:
    (grpo,) = _plan({"grpo": {"args": {"model_name_or_path": "runs/old/sft"}}})
    assert (grpo.name, grpo.model_name_or_path, grpo.model_from_stage) == ("grpo", "runs/old/sft", None)
    assert grpo.args["model_name_or_path"] == "runs/old/sft"


def test_plan_eval_only() -> None:
    (ev,) = _plan({"eval": {}}, model="builtin:tiny")
    assert (ev.name, ev.model_name_or_path, ev.model_from_stage) == ("eval", "builtin:tiny", None)
    assert ev.args == {
        "dataset_name": "ds",
        "model_name_or_path": "builtin:tiny",
        "output_dir": "/vol/r1/eval",
    }


def test_plan_sft_then_eval() -> None:
    runs = _plan(
        {"sft": {}, "grpo": {"enabled": False, "args": {"model_name_or_path": "ignored"}}, "eval": {}}
    )
    assert [r.name for r in runs] == ["sft", "eval"]
    assert (runs[1].model_name_or_path, runs[1].model_from_stage) == ("/vol/r1/sft", "sft")


# The lineage rule for every subset of stages: the last model stage (prepare's download, sft, grpo) before a
# stage, else the base model.
LINEAGE = {
    ("prepare",): {"prepare": None},
    ("prepare", "sft"): {"prepare": None, "sft": "prepare"},
    ("prepare", "grpo"): {"prepare": None, "grpo": "prepare"},
    ("prepare", "eval"): {"prepare": None, "eval": "prepare"},
    ("prepare", "sft", "grpo"): {"prepare": None, "sft": "prepare", "grpo": "sft"},
    ("prepare", "sft", "eval"): {"prepare": None, "sft": "prepare", "eval": "sft"},
    ("prepare", "grpo", "eval"): {"prepare": None, "grpo": "prepare", "eval": "grpo"},
    ("prepare", "sft", "grpo", "eval"): {"prepare": None, "sft": "prepare", "grpo": "sft", "eval": "grpo"},
    ("sft",): {"sft": None},
    ("grpo",): {"grpo": None},
    ("eval",): {"eval": None},
    ("sft", "grpo"): {"sft": None, "grpo": "sft"},
    ("sft", "eval"): {"sft": None, "eval": "sft"},
    ("grpo", "eval"): {"grpo": None, "eval": "grpo"},
    ("sft", "grpo", "eval"): {"sft": None, "grpo": "sft", "eval": "grpo"},
}


@pytest.mark.parametrize("enabled", list(LINEAGE), ids="+".join)
def test_model_sources_and_plan_follow_the_lineage_rule(enabled: tuple[str, ...]) -> None:
    assert model_sources(enabled) == LINEAGE[enabled]
    runs = _plan({name: {"enabled": name in enabled} for name in STAGES})
    assert [r.name for r in runs] == list(enabled)
    for run in runs:
        source = LINEAGE[enabled][run.name]
        assert run.model_from_stage == source
        assert run.model_name_or_path == ("base-model" if source is None else f"/vol/r1/{source}")


def test_lineage_covers_every_subset_of_stages() -> None:
    subsets = {tuple(s for i, s in enumerate(STAGES) if mask >> i & 1) for mask in range(1, 2 ** len(STAGES))}
    assert subsets == set(LINEAGE)


@pytest.mark.parametrize("stages", [("grpo", "sft"), ("sft", "sft"), ("sft", "train")])
def test_model_sources_refuses_stages_out_of_contract_order(stages: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match=r"are not distinct stages in the order prepare, sft, grpo, eval"):
        model_sources(stages)


def test_plan_order_is_fixed_whatever_the_config_order() -> None:
    runs = _plan({"eval": {}, "grpo": {}, "sft": {"enabled": False}})
    assert [r.name for r in runs] == ["grpo", "eval"]
    assert runs[0].model_name_or_path == "base-model" and runs[1].model_name_or_path == "/vol/r1/grpo"


def test_plan_does_not_mutate_the_config() -> None:
    cfg = parse_config({"stages": {"sft": {"args": {"model_name_or_path": "m"}}}}, "t.yaml")
    plan(cfg)
    assert cfg.stages["sft"].args == {"model_name_or_path": "m"}
    assert plan(cfg)[0].model_name_or_path == "m"


def test_every_stage_has_a_cli_module() -> None:
    assert tuple(STAGE_MODULES) == STAGES == ("prepare", "sft", "grpo", "eval")
    for module in STAGE_MODULES.values():
        assert callable(importlib.import_module(module).main)
