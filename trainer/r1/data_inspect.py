"""`r1-grpo data inspect --dataset_name …`: how a dataset loads, before any training run.

Takes the data flags of the stages (:class:`~trainer.r1.data.DataArgs`, the same names and meanings) and
prints the schema and columns chosen, the load report (rows read, kept, skipped and why), whether the set
has worked solutions (what SFT needs), and the first examples as the prompt a stage would build with their
gold answers. No model is loaded and torch is not imported; ``--tokenizer_name_or_path`` formats the
prompts with that tokenizer's chat template (the plain R1 prompt otherwise).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from trainer.r1.data import DataArgs, DataError
from trainer.r1.prompt import format_prompt

PROG = "r1-grpo data"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    """DataArgs' fields as flags, as HfArgumentParser makes them for the stages (without importing torch)."""
    hints = typing.get_type_hints(DataArgs)
    for f in fields(DataArgs):
        hint = hints[f.name]
        args = typing.get_args(hint)
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", "")}
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(args)
        elif hint is bool:
            kwargs.update(type=_bool, nargs="?", const=True)
        elif int in args or hint is int:
            kwargs["type"] = int
        elif isinstance(hint, types.UnionType) or hint is str:
            kwargs["type"] = str
        if f.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        parser.add_argument(f"--{f.name}", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} inspect",
        description="Show how a dataset loads: schema, columns, load report, formatted prompts and gold "
        "answers (the stages' data flags; no model is loaded).",
        allow_abbrev=False,
    )
    _add_data_flags(parser)
    parser.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="Which split to read: --dataset_train_split (train, drawn as training draws a mixture) or "
        "--dataset_test_split (test)",
    )
    parser.add_argument("--num_examples", type=int, default=3, help="Examples to print")
    parser.add_argument(
        "--tokenizer_name_or_path",
        default=None,
        help="Format the prompts with this tokenizer's chat template (default: the plain R1 prompt)",
    )
    return parser


def inspect(args: DataArgs, split: str, num_examples: int, tokenizer: Any = None) -> str:
    """The report :func:`main` prints."""
    if split == "train":
        examples, report = args.load_train()
        split_name = args.dataset_train_split
    else:
        examples, report = args.load_eval()
        split_name = args.dataset_test_split
    reports = report.sources or [report]
    lines = [f"dataset: {args.dataset_name} (split {split_name!r})"]
    for r in reports:
        columns = ", ".join(f"{role}={col}" for role, col in r.columns.items())
        lines.append(f"schema: {r.schema} ({columns})" + (f" [{r.dataset}]" if report.sources else ""))
    lines.append(f"load: {report.summary()}")
    with_solutions = sum(1 for e in examples if e.reasoning)
    if with_solutions:
        lines.append(f"worked solutions: {with_solutions} of {len(examples)} examples (SFT can use them)")
    else:
        lines.append("worked solutions: none (GRPO and eval only; SFT refuses this dataset)")
    template = "the tokenizer's chat template" if tokenizer is not None else "the plain R1 prompt"
    lines.append(f"prompts: {template}")
    for n, example in enumerate(examples[:num_examples], 1):
        lines += ["", f"--- example {n}: {example.source} ---", format_prompt(tokenizer, example.problem)]
        lines.append(f"--- gold answer: {example.answer}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {PROG} inspect --dataset_name NAME [data flags]   ({PROG} inspect --help for the flags)"
        )
        return 0 if argv else 2
    if argv[0] != "inspect":
        print(f"{PROG}: error: unknown subcommand {argv[0]!r}; the subcommand is: inspect", file=sys.stderr)
        return 2
    parser = build_parser()
    ns = parser.parse_args(argv[1:])
    if ns.num_examples < 0:
        parser.error(f"--num_examples must be >= 0, got {ns.num_examples}")
    data_flags = {f.name: getattr(ns, f.name) for f in fields(DataArgs)}
    try:
        args = DataArgs(**data_flags)
        tokenizer = None
        if ns.tokenizer_name_or_path:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(ns.tokenizer_name_or_path)
            except (OSError, ValueError) as e:
                raise DataError(f"--tokenizer_name_or_path {ns.tokenizer_name_or_path!r}: {e}") from e
        print(inspect(args, ns.split, ns.num_examples, tokenizer))
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
