"""Published math evaluation sets as they load and grade: one table row per set.

    python bench/math_sets.py FOLDER [--markdown] [--show N]

FOLDER holds ``<set>/test.jsonl`` files (or ``*.jsonl``), e.g. Qwen2.5-Math's ``evaluation/data``. For each
set: the rows, the rows kept by auto-detection (with ``--skip_bad_rows``; at least 99% required), the
schema and columns chosen, and on the kept golds:

* ``self``: the gold, as the ``<answer>`` of an R1 completion, scores 10 against itself;
* ``model``: so does the gold written as a model would (no ``$``, no parenthesised unit: ``9`` for
  ``9 (apples)``);
* ``+1``: for numeric golds, gold + 1 never scores 10 (the count of those that did: must be 0).

Exit status 1 when a set keeps under 99% of its rows, a kept gold fails ``self`` or ``model``, or a
gold + 1 scores; ``--show N`` prints the first N failures of each set.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.r1.answers import terminating  # noqa: E402
from trainer.r1.data import DataError, load_examples  # noqa: E402
from trainer.r1.numerals import parse_numeral  # noqa: E402
from trainer.r1.rewards import REWARD_CORRECT, reward_function  # noqa: E402

KEEP_TARGET = 0.99
_PAREN_UNIT_RE = re.compile(r"(?<=[\d$])\s+\([A-Za-z][A-Za-z '.-]*\)\s*$")  # "9 (apples)", "$Q$ (lb)"


def completion(answer: str) -> str:
    return f"<think>\nworking\n</think>\n<answer>{answer}</answer>"


def model_form(gold: str) -> str:
    """The gold as a model would write it: without ``$`` delimiters and a parenthesised unit."""
    text = _PAREN_UNIT_RE.sub("", gold).strip()
    return text.replace("\\$", "\0").replace("$", "").replace("\0", "\\$").strip()


def plus_one(gold: str) -> str | None:
    """gold + 1 written the way the gold is (decimal, fraction or integer); None for a non-numeric gold."""
    numeral = parse_numeral(gold)
    if numeral is None:
        return None
    value = numeral.value + 1
    if value.denominator == 1:
        return str(value.numerator)
    if numeral.parts is None and terminating(value):  # a decimal gold: a decimal
        places = max(numeral.places or 0, 1)
        return _decimal(value, places)
    return f"{value.numerator}/{value.denominator}"


def _decimal(value: Fraction, places: int) -> str:
    while (value * 10**places).denominator != 1:
        places += 1
    scaled = abs(value.numerator * 10**places // value.denominator)
    whole, frac = divmod(scaled, 10**places)
    return f"{'-' if value < 0 else ''}{whole}.{frac:0{places}d}"


def bench_set(name: str, path: Path, show: int) -> dict:
    rows = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    start = time.perf_counter()
    try:
        examples, report = load_examples(str(path), "test", skip_bad_rows=True)
    except DataError as e:
        return {"set": name, "rows": rows, "kept": 0, "schema": "-", "columns": str(e), "failures": []}
    load_s = time.perf_counter() - start
    failures: list[str] = []
    self_ok = model_ok = numeric = plus_scored = 0
    start = time.perf_counter()
    for ex in examples:
        gold = ex.answer
        if reward_function(completion(gold), gold) == REWARD_CORRECT:
            self_ok += 1
        else:
            failures.append(f"self  {ex.source}: {gold!r}")
        written = model_form(gold)
        if reward_function(completion(written), gold) == REWARD_CORRECT:
            model_ok += 1
        else:
            failures.append(f"model {ex.source}: {written!r} vs {gold!r}")
        wrong = plus_one(gold)
        if wrong is not None:
            numeric += 1
            if reward_function(completion(wrong), gold) == REWARD_CORRECT:
                plus_scored += 1
                failures.append(f"+1    {ex.source}: {wrong!r} scored against {gold!r}")
    grade_s = time.perf_counter() - start
    for line in failures[:show]:
        print(f"  {name}: {line}", file=sys.stderr)
    kept = len(examples)
    columns = ", ".join(f"{role}={col}" for role, col in report.columns.items())
    return {
        "set": name,
        "rows": rows,
        "kept": kept,
        "schema": report.schema,
        "columns": columns,
        "self": self_ok,
        "model": model_ok,
        "numeric": numeric,
        "plus_scored": plus_scored,
        "load_s": load_s,
        "grade_s": grade_s,
        "failures": failures,
    }


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}%" if d else "-"


def table(results: list[dict]) -> str:
    header = (
        "| set | rows | kept | kept % | schema | columns | self = 10 | model form = 10 | numeric golds "
        "| gold+1 = 10 | load s | grade s |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        kept = r["kept"]
        lines.append(
            f"| {r['set']} | {r['rows']} | {kept} | {_pct(kept, r['rows'])} | {r['schema']} | {r['columns']} "
            f"| {_pct(r.get('self', 0), kept)} | {_pct(r.get('model', 0), kept)} | {r.get('numeric', 0)} "
            f"| {r.get('plus_scored', 0)} | {r.get('load_s', 0):.1f} | {r.get('grade_s', 0):.1f} |"
        )
    return "\n".join(lines)


def find_sets(folder: Path) -> list[tuple[str, Path]]:
    found = sorted(folder.glob("*/test.jsonl"))
    if found:
        return [(p.parent.name, p) for p in found]
    return [(p.stem, p) for p in sorted(folder.glob("*.jsonl"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder of <set>/test.jsonl (or *.jsonl) files")
    parser.add_argument("--show", type=int, default=5, help="failures printed per set (stderr)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder}: not a folder")
    sets = find_sets(args.folder)
    if not sets:
        parser.error(f"{args.folder}: no <set>/test.jsonl or *.jsonl files")
    logging.basicConfig(level=logging.ERROR)
    results = [bench_set(name, path, args.show) for name, path in sets]
    print(table(results))
    bad = [
        r["set"]
        for r in results
        if r["kept"] < KEEP_TARGET * r["rows"]
        or r.get("self") != r["kept"]
        or r.get("model") != r["kept"]
        or r.get("plus_scored", 0)
    ]
    if bad:
        print(f"\nfailing: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
