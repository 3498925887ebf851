"""Each stage's command-line rules, torch-free: the flag table `stage_flags.json` and a parser built from it.

The stage recipes parse their flags with transformers' HfArgumentParser over their argument dataclasses
(trainer/sft.py, grpo.py, evaluate.py and DataArgs), which needs torch. The controller and the chart must
check a stage's flags long before a GPU pod runs it, so `python -m trainer.flag_table` (`make schema`)
writes what those parsers accept -- every option string, its type, `nargs`, choices and whether it is
required -- into stage_flags.json next to this file, and the chart's values.schema.json from it.
tests/test_stage_args.py fails when either drifts from the parsers.

`check_stage_argv(stage, argv)` parses a stage's flags as the stage would (unknown flags, bad numbers and
booleans, choices, missing required flags); the range checks of the dataclasses' `validate()` still run in
the stage itself, which exits 2 on them.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

FLAG_TABLE = Path(__file__).with_name("stage_flags.json")
# HfArgumentParser's string_to_bool, case-insensitive.
TRUE_WORDS, FALSE_WORDS = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")


class StageArgsError(ValueError):
    """A stage flag its parser would refuse; the message names the stage and the flag."""

    def __init__(self, stage: str, flag: str, message: str):
        super().__init__(f"stage {stage}: {message}")
        self.stage, self.flag = stage, flag


@cache
def flag_table() -> dict[str, Any]:
    """The committed table: {"stages": {stage: {"prog": ..., "flags": [...]}}}."""
    return json.loads(FLAG_TABLE.read_text(encoding="utf-8"))


def stage_flags(stage: str) -> list[dict[str, Any]]:
    stages = flag_table()["stages"]
    if stage not in stages:
        raise KeyError(f"no flag table for stage {stage!r} (stages: {', '.join(stages)})")
    return stages[stage]["flags"]


def _to_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise ValueError(text)


_CONVERT = {"str": str, "int": int, "float": float, "bool": _to_bool}


class _Refusal(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _Refusal(message)


def _typed(kind: str, flag: str):
    convert = _CONVERT[kind]

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError:
            expected = {
                "int": "an integer",
                "float": "a number",
                "bool": f"a boolean ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})",
            }.get(kind, kind)
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected {expected}") from None

    parse.__name__ = kind
    return parse


@cache
def _parser(stage: str) -> _Parser:
    p = _Parser(prog=flag_table()["stages"][stage]["prog"], allow_abbrev=False, add_help=False)
    for flag in stage_flags(stage):
        options = flag["options"]
        if flag["action"] == "store_false":
            p.add_argument(*options, dest=flag["dest"], action="store_false")
            continue
        kwargs: dict[str, Any] = {"dest": flag["dest"], "required": flag["required"]}
        kwargs["type"] = _typed(flag["type"], options[0])
        if flag["nargs"] is not None:
            kwargs["nargs"] = flag["nargs"]
        if flag["nargs"] == "?":
            kwargs["const"] = flag["const"]
        if flag["choices"] is not None:
            kwargs["choices"] = flag["choices"]
        p.add_argument(*options, **kwargs)
    return p


def known_options(stage: str) -> list[str]:
    return [o for flag in stage_flags(stage) for o in flag["options"]]


def check_stage_argv(stage: str, argv: Sequence[str]) -> None:
    """Parse `argv` (the stage's flags, after `-m trainer.<stage>`) with the stage's rules; raise
    StageArgsError naming the stage and the flag when its parser would refuse them."""
    try:
        _, rest = _parser(stage).parse_known_args(list(argv))
    except _Refusal as e:
        message = str(e)
        flag = next(
            (o for o in known_options(stage) if re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", message)), ""
        )
        if message.startswith("argument "):  # "argument --x/--y: <why>": keep only the why, after the flag
            message = message.split(": ", 1)[-1]
            if flag and not message.startswith(flag):
                message = f"{flag}: {message}"
        raise StageArgsError(stage, flag, message) from None
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        name = unknown[0].split("=", 1)[0]
        close = difflib.get_close_matches(name, known_options(stage), n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise StageArgsError(
            stage, name, f"{name}: unrecognized argument (not a flag of {_parser(stage).prog}){hint}"
        )
    if rest:
        raise StageArgsError(stage, "", f"unrecognized arguments: {' '.join(rest)}")
