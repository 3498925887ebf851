"""Stage flags checked before anything runs: the generated flag table and chart schema against the stage
parsers (drift), the controller's torch-free parse against the real HfArgumentParser, and `helm template`
(helm 3 and 4) refusing an unknown flag and a wrong type with the field named."""

from __future__ import annotations

import importlib
import json

import pytest

from tests.support.helmtool import HelmError, find_doc, helm_binaries, parse_documents, render_chart, run_helm
from trainer import flag_table
from trainer.contract.stage_args import FLAG_TABLE, StageArgsError, check_stage_argv
from trainer.contract.stages import STAGE_MODULES, STAGES
from trainer.executors.kubernetes.spec import (
    StageRejected,
    check_stage_flags,
    parse_pipeline,
    stage_argvs,
)

BASE = {"sft": [], "grpo": [], "eval": []}
REQUIRED = ["--dataset_name", "d", "--model_name_or_path", "m", "--output_dir", "o"]


def test_the_committed_flag_table_and_schema_match_the_stage_parsers() -> None:
    """Fails when a stage's dataclasses changed without `make schema` (python -m trainer.flag_table)."""
    stale = [
        str(path.relative_to(flag_table.ROOT))
        for path, text in flag_table.expected_files().items()
        if path.read_text(encoding="utf-8") != text
    ]
    assert not stale, f"out of date with the stage parsers: {stale}; run `make schema`"


def test_every_stage_has_its_flags_in_the_table_and_the_schema() -> None:
    table = json.loads(FLAG_TABLE.read_text(encoding="utf-8"))
    schema = json.loads(flag_table.SCHEMA.read_text(encoding="utf-8"))
    for stage in STAGES:
        dests = {f["dest"] for f in table["stages"][stage]["flags"]}
        assert {"dataset_name", "model_name_or_path", "output_dir"} <= dests
        props = schema["definitions"]["stageArgs"][stage]["properties"]
        own = {"prepare": "model_revision", "eval": "num_samples_per_problem"}.get(stage, "eval_strategy")
        assert own in props
        assert not [k for k in props if k.startswith("no_")], "flags without a value cannot be args"


def _real_parse(stage: str, argv: list[str]) -> bool:
    """Whether the stage's own HfArgumentParser accepts argv (trainer.runtime.parse_args' rules)."""
    from transformers import HfArgumentParser

    module = importlib.import_module(STAGE_MODULES[stage])
    parser = HfArgumentParser(module.ARG_TYPES, allow_abbrev=False)
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))  # type: ignore[method-assign]
    try:
        *_, rest = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
    except (ValueError, SystemExit):
        return False
    return not rest


CASES = [
    ("sft", [], True),
    ("sft", ["--num_train_epochs", "2", "--bf16", "true", "--learning_rate", "1e-05"], True),
    ("sft", ["--num_train_epochs", "three"], False),
    ("sft", ["--per_device_train_batch_size", "2.5"], False),
    ("sft", ["--bf16", "maybe"], False),
    ("sft", ["--bf16"], True),
    ("sft", ["--eval_strategy", "steps"], True),
    ("sft", ["--dataset_schema", "gsm8k"], True),
    ("sft", ["--dataset_schema", "csv"], False),
    ("sft", ["--num_generations", "8"], False),  # a GRPO flag
    ("grpo", ["--learning_rat", "1e-06"], False),
    ("grpo", ["--reward_funcs", "accuracy", "format", "--reward_weights", "1", "0.5"], True),
    ("grpo", ["--reward_weights", "one"], False),
    ("grpo", ["--no_stop_at_answer_tag"], True),
    ("grpo", ["--stop_at_answer_tag", "false", "--epsilon_high", "0.28"], True),
    ("eval", ["--num_samples_per_problem", "4", "--temperature", "0.6"], True),
    ("eval", ["--max_eval_samples", "none"], False),
    ("eval", ["--num_train_epochs", "1"], False),
]


@pytest.mark.parametrize(("stage", "argv", "ok"), CASES)
def test_the_torch_free_parse_agrees_with_the_stage_parser(stage: str, argv: list[str], ok: bool) -> None:
    full = [*REQUIRED, *argv]
    assert _real_parse(stage, full) is ok
    if ok:
        check_stage_argv(stage, full)
    else:
        with pytest.raises(StageArgsError):
            check_stage_argv(stage, full)


def test_refusals_name_the_stage_and_the_flag() -> None:
    with pytest.raises(StageArgsError) as typo:
        check_stage_argv("grpo", [*REQUIRED, "--learning_rat", "1e-06"])
    assert str(typo.value) == (
        "stage grpo: --learning_rat: unrecognized argument (not a flag of r1-grpo grpo); "
        "did you mean --learning_rate?"
    )
    assert typo.value.flag == "--learning_rat"
    with pytest.raises(StageArgsError) as wrong:
        check_stage_argv("sft", [*REQUIRED, "--num_train_epochs", "three"])
    assert str(wrong.value) == "stage sft: --num_train_epochs 'three': expected a number"
    with pytest.raises(StageArgsError) as choice:
        check_stage_argv("sft", [*REQUIRED, "--dataset_schema", "csv"])
    assert str(choice.value).startswith("stage sft: --dataset_schema: invalid choice: 'csv'")
    with pytest.raises(StageArgsError) as missing:
        check_stage_argv("eval", ["--output_dir", "o", "--model_name_or_path", "m"])
    assert "stage eval: the following arguments are required: --dataset_name" in str(missing.value)


def _stages_configmap(values: dict, helm_args: tuple[str, ...] = ()) -> dict:
    docs = parse_documents(
        run_helm(["template", "r1", str(flag_table.ROOT / "charts" / "r1-grpo"), *helm_args], values=values)
    )
    cm = find_doc(docs, "ConfigMap", "r1-stages")
    cm["metadata"]["namespace"] = "default"
    return cm


def test_the_controller_refuses_a_stage_flag_the_schema_was_told_to_skip() -> None:
    """`helm install --skip-schema-validation` (or a hand-edited stages ConfigMap): the controller parses
    every stage's flags at start and names the stage, the flag and the chart value."""
    good = parse_pipeline(_stages_configmap({}), "r1")
    for spec in good.stages:
        kinds = [kind for kind, _ in stage_argvs(spec.job)]
        assert kinds == ["Master"]
        check_stage_flags(spec, "here")
    values = {"stages": {"grpo": {"args": {"learning_rat": 1e-6}}}}
    bad = parse_pipeline(_stages_configmap(values, ("--skip-schema-validation",)), "r1")
    check_stage_flags(bad.stage("sft"), "here")
    with pytest.raises(StageRejected) as e:
        check_stage_flags(bad.stage("grpo"), "PyTorchJob r1-grpo-1 in ConfigMap r1-stages key grpo.yaml,")
    assert e.value.stage == "grpo"
    assert str(e.value) == (
        "stage grpo: --learning_rat: unrecognized argument (not a flag of r1-grpo grpo); did you mean "
        "--learning_rate? (PyTorchJob r1-grpo-1 in ConfigMap r1-stages key grpo.yaml, Master; chart value "
        "stages.grpo.args.learning_rat)"
    )


HELM_MESSAGES = {
    # helm 3 (gojsonschema) and helm 4 (santhosh-tekuri/jsonschema) word schema errors differently
    "3": (
        "- stages.grpo.args: Additional property learning_rat is not allowed",
        "- stages.sft.args.num_train_epochs: Invalid type. Expected: [number,null], given: string",
    ),
    "4": (
        "- at '/stages/grpo/args': additional properties 'learning_rat' not allowed",
        "- at '/stages/sft/args/num_train_epochs': got string, want null or number",
    ),
}


@pytest.mark.parametrize("major", ["3", "4"])
def test_helm_refuses_an_unknown_stage_flag_and_a_wrong_type_naming_the_field(major: str) -> None:
    helm = next((path for version, path in helm_binaries().items() if version.startswith(f"{major}.")), None)
    assert helm is not None, f"no helm {major}.x among {helm_binaries()}"
    typo, wrong = HELM_MESSAGES[major]
    with pytest.raises(HelmError) as e:
        render_chart({"stages": {"grpo": {"args": {"learning_rat": 1e-6}}}}, helm=helm)
    assert typo in e.value.output
    with pytest.raises(HelmError) as e:
        render_chart({"stages": {"sft": {"args": {"num_train_epochs": "three"}}}}, helm=helm)
    assert wrong in e.value.output
    # the chart's own defaults and every flag type pass
    render_chart(
        {
            "stages": {
                "sft": {"args": {"eval_strategy": "steps", "max_train_samples": None, "seed": 7}},
                "grpo": {"args": {"reward_funcs": ["accuracy", "format"], "reward_weights": [1, 0.5]}},
                "eval": {"args": {"temperature": 0.6, "num_samples_per_problem": 4}},
            }
        },
        helm=helm,
    )


def test_the_local_pipeline_refuses_a_stage_flag_before_any_stage_runs() -> None:
    from trainer.contract.stages import ConfigError, parse_config, plan

    cfg = parse_config({"stages": {"sft": {"args": {"max_steps": 2}}, "grpo": {"args": {"learning_rat": 1e-6}}}},
                       "my.yaml")  # fmt: skip
    with pytest.raises(ConfigError) as e:
        plan(cfg)
    assert str(e.value) == (
        "my.yaml: stages.grpo.args: stage grpo: --learning_rat: unrecognized argument (not a flag of r1-grpo "
        "grpo); did you mean --learning_rate?"
    )
