"""The stage list shared by the local pipeline, the Helm chart and the controller (docs/contract.md).

A pipeline config (YAML) names the base model and dataset and, per stage, whether it runs, how many
processes it gets and its `args` (rendered 1:1 onto the stage's CLI flags by `args_to_cli`). `plan()`
turns it into concrete stage runs: output folders `<root>/<release>/<stage>` and the hand-off of
`--model_name_or_path` from one training stage to the next.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from trainer.contract.prepared import OFFLINE_ENV, hub_datasets, rewrite_dataset_name
from trainer.contract.stage_args import StageArgsError, check_stage_argv

STAGES: tuple[str, ...] = ("prepare", "sft", "grpo", "eval")
TRAINING_STAGES: tuple[str, ...] = ("sft", "grpo")
# Stages whose folder holds a model (weights required in r1_stage.json), hence the lineage's sources:
# `prepare` downloads the base model, sft and grpo train one.
MODEL_STAGES: tuple[str, ...] = ("prepare", *TRAINING_STAGES)
# Off unless a config or the chart's values enable them.
OPTIONAL_STAGES: tuple[str, ...] = ("prepare",)
STAGE_MODULES: dict[str, str] = {
    "prepare": "trainer.prepare",
    "sft": "trainer.sft",
    "grpo": "trainer.grpo",
    "eval": "trainer.evaluate",
}
# Flags the pipeline sets itself; a config naming them in `args` would silently break the hand-off.
MANAGED_ARGS = ("output_dir",)
DEFAULT_CONFIG = Path(__file__).parents[1] / "pipeline.yaml"


class ConfigError(ValueError):
    """A pipeline config that cannot run; the message names the file and key."""


def args_to_cli(args: Mapping[str, Any]) -> list[str]:
    """Render an args map onto CLI flags, exactly as the Helm chart does.

    Keys sorted; `--key value`; booleans `true`/`false`; lists as repeated values; None dropped.
    """
    out: list[str] = []
    for key in sorted(args):
        value = args[key]
        if value is None:
            continue
        out.append(f"--{key}")
        if isinstance(value, bool):
            out.append("true" if value else "false")
        elif isinstance(value, list | tuple):
            out.extend(_scalar(v) for v in value)
        elif isinstance(value, Mapping):
            raise ConfigError(f"argument {key!r}: a map cannot be rendered as a CLI flag")
        else:
            out.append(_scalar(value))
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        # Helm reads every YAML number as float64, so the chart prints integral numbers as integers and
        # other floats with Go's %v; doing the same here keeps both renderers byte-identical.
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return _go_float(value)
    return str(value)


def _go_float(value: float) -> str:
    """Go's `fmt.Sprint(float64)`: shortest digits, exponent form when exp < -4 or exp >= 6."""
    if value != value or value in (float("inf"), float("-inf")):
        return {"nan": "NaN", "inf": "+Inf", "-inf": "-Inf"}[repr(value)]
    sign, digits, exp = Decimal(repr(value)).as_tuple()
    digits_str = "".join(map(str, digits)).rstrip("0") or "0"
    exp += len(digits) - len(digits_str)
    nd = len(digits_str)
    x = exp + nd - 1  # decimal exponent of the first digit
    eprec = 6  # Go uses 6 for the shortest representation whatever the digit count
    minus = "-" if sign else ""
    if x < -4 or x >= eprec:
        mantissa = digits_str[0] + ("." + digits_str[1:] if nd > 1 else "")
        return f"{minus}{mantissa}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if x >= nd - 1:
        return minus + digits_str + "0" * (x - nd + 1)
    if x >= 0:
        return f"{minus}{digits_str[: x + 1]}.{digits_str[x + 1 :]}"
    return f"{minus}0.{'0' * (-x - 1)}{digits_str}"


@dataclass
class StageConfig:
    enabled: bool = True
    nproc_per_node: int = 1
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    release: str = "local"
    root: str = "runs"
    model: str = "builtin:tiny"
    dataset: str = "builtin:arith"
    stages: dict[str, StageConfig] = field(default_factory=dict)
    source: str = "<built-in>"


@dataclass
class StagePlan:
    name: str
    output_dir: Path
    model_name_or_path: str
    model_from_stage: str | None  # the stage whose output this one starts from (lineage)
    nproc_per_node: int
    args: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)  # set for the stage's processes (hub offline)

    def cli_args(self) -> list[str]:
        return args_to_cli(self.args)


def load_config(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> PipelineConfig:
    source = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{source}: cannot read pipeline config: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from e
    return parse_config(raw, str(source), overrides)


def parse_config(raw: Any, source: str, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a map")
    raw = dict(raw)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {"release", "root", "model", "dataset", "stages"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {unknown}; known: {sorted(known)}")
    cfg = PipelineConfig(source=source)
    for key in ("release", "root", "model", "dataset"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise ConfigError(f"{source}: {key!r} must be a non-empty string")
            setattr(cfg, key, raw[key])
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict):
        raise ConfigError(f"{source}: 'stages' must be a map of stage name to settings")
    for name, body in stages.items():
        if name not in STAGES:
            raise ConfigError(f"{source}: stages.{name}: unknown stage; stages are {', '.join(STAGES)}")
        body = body or {}
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: stages.{name} must be a map")
        extra = sorted(set(body) - {"enabled", "nproc_per_node", "args"})
        if extra:
            raise ConfigError(
                f"{source}: stages.{name}: unknown keys {extra}; known: enabled, nproc_per_node, args"
            )
        enabled = body.get("enabled", name not in OPTIONAL_STAGES)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{source}: stages.{name}.enabled must be true or false")
        nproc = body.get("nproc_per_node", 1)
        if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
            raise ConfigError(f"{source}: stages.{name}.nproc_per_node must be a positive integer")
        args = body.get("args") or {}
        if not isinstance(args, dict):
            raise ConfigError(f"{source}: stages.{name}.args must be a map of flag name to value")
        for managed in MANAGED_ARGS:
            if managed in args:
                raise ConfigError(
                    f"{source}: stages.{name}.args.{managed} is set by the pipeline (<root>/<release>/<stage>)"
                )
        try:
            args_to_cli(args)  # fail now, naming the file and key, rather than in the subprocess
        except ConfigError as e:
            raise ConfigError(f"{source}: stages.{name}.args: {e}") from None
        cfg.stages[name] = StageConfig(enabled=enabled, nproc_per_node=nproc, args=args)
    if not any(s.enabled for s in cfg.stages.values()):
        raise ConfigError(f"{source}: no stage is enabled")
    return cfg


def model_sources(stages: Sequence[str]) -> dict[str, str | None]:
    """The lineage rule: for each stage that runs, the stage whose output is its --model_name_or_path.

    `stages` are the stages that run, in contract order. A stage starts from the output of the last
    model stage before it (prepare's downloaded base model, sft, grpo); None means it starts from the base
    model. The local pipeline (`plan`) and the controller (`parse_pipeline`) both follow this function; the
    chart's `r1-grpo.modelFrom` is a copy that tests/test_chart.py holds equal to it.
    """
    if list(stages) != [name for name in STAGES if name in stages]:
        raise ValueError(f"stages {list(stages)} are not distinct stages in the order {', '.join(STAGES)}")
    sources: dict[str, str | None] = {}
    previous_training: str | None = None
    for name in stages:
        sources[name] = previous_training
        if name in MODEL_STAGES:
            previous_training = name
    return sources


def plan(cfg: PipelineConfig) -> list[StagePlan]:
    """Concrete runs of the enabled stages, in order, with output folders and the model hand-off.

    With `prepare` enabled it downloads the base model and the hub datasets the later stages name (and
    any its own `dataset_name` adds); those stages then read both from its folder with the hub offline
    (trainer/contract/prepared.py)."""
    enabled = [name for name in STAGES if name in cfg.stages and cfg.stages[name].enabled]
    sources = model_sources(enabled)
    prepare_dir = str(Path(cfg.root) / cfg.release / "prepare") if "prepare" in enabled else None
    runs: list[StagePlan] = []
    for name in enabled:
        stage = cfg.stages[name]
        output_dir = Path(cfg.root) / cfg.release / name
        args = dict(stage.args)
        env: dict[str, str] = {}
        if name == "prepare":  # a null dataset_name drops the flag (args_to_cli): nothing to download
            named = [cfg.stages[s].args.get("dataset_name", cfg.dataset) for s in enabled if s != "prepare"]
            wanted = hub_datasets(
                str(spec) for spec in [args.get("dataset_name"), *named] if spec is not None
            )
            args["dataset_name"] = ",".join(wanted) if wanted else None
        elif prepare_dir is not None:
            if args.get("dataset_name", cfg.dataset) is not None:
                args["dataset_name"] = rewrite_dataset_name(
                    str(args.get("dataset_name", cfg.dataset)), prepare_dir
                )
            env = dict(OFFLINE_ENV)
        model_from = sources[name]
        if model_from is not None:
            if "model_name_or_path" in args:
                raise ConfigError(
                    f"{cfg.source}: stages.{name}.args.model_name_or_path: this stage starts from the "
                    f"{model_from} stage's output; remove the argument or disable {model_from}"
                )
            model = str(Path(cfg.root) / cfg.release / model_from)
        else:
            model = str(args.pop("model_name_or_path", cfg.model))
        if name != "prepare":
            args.setdefault("dataset_name", cfg.dataset)
        args["model_name_or_path"] = model
        args["output_dir"] = str(output_dir)
        try:  # the stage's own flag rules, before any stage runs (trainer/contract/stage_args.py)
            check_stage_argv(name, args_to_cli(args))
        except StageArgsError as e:
            raise ConfigError(f"{cfg.source}: stages.{name}.args: {e}") from None
        runs.append(StagePlan(name, output_dir, model, model_from, stage.nproc_per_node, args, env))
    return runs
