"""Token lengths, checked before the first step: every prompt (GRPO, evaluation) and every SFT sequence of a
split is tokenized once, up front, the same way on every rank.

A prompt (the text of :class:`~trainer.r1.prompt.Prompter`) longer than ``--max_prompt_length`` tokens is a
:class:`LengthError` that says how many prompts are too long and names the first few
(``<dataset>:<split>:row <i> (<n> tokens)``); with ``--skip_bad_rows`` those examples are dropped instead
and counted in the split's :class:`~trainer.r1.data.LoadReport` (as verl's ``filter_overlong_prompts``
does). Checking only when a prompt is first sampled would let a run die hours in, on a different row on
each rank.

An SFT sequence (prompt + completion + EOS) longer than ``--max_seq_length`` is truncated to it, keeping
the whole prompt (as TRL's SFTTrainer does); how many were truncated, and the first few, are logged as a
warning. A prompt that leaves no room for a single completion token is an over-long prompt as above.

The token ids are returned, so nothing is tokenized twice: ``prompt_ids`` maps each problem text to its
prompt's ids (the GRPO sampler and :func:`trainer.r1.scoring.evaluate_model` look prompts up there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.r1.data import DataError, Example, LoadReport
from trainer.r1.prompt import DEFAULT_PROMPT, Prompter

logger = logging.getLogger(__name__)

SHOWN = 5  # rows named in a message
_BATCH = 1024  # texts per tokenizer call (fast tokenizers encode a batch in parallel)


class LengthError(DataError):
    """Examples over a token limit; the message counts them and names the first few."""


@dataclass(frozen=True)
class TooLong:
    source: str  # Example.source: "<dataset>:<split>:row <i>"
    tokens: int


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, in batches."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        # verbose=False: texts over the model's length are expected here and reported by the caller.
        batch = tokenizer(list(texts[start : start + _BATCH]), add_special_tokens=False, verbose=False)
        ids.extend(batch["input_ids"])
    return ids


def describe(rows: Sequence[TooLong]) -> str:
    """``a:train:row 3 (577 tokens), a:train:row 9 (1204 tokens), and 4 more``."""
    text = ", ".join(f"{r.source} ({r.tokens} tokens)" for r in rows[:SHOWN])
    if len(rows) > SHOWN:
        text += f", and {len(rows) - SHOWN} more"
    return text


def _where(report: LoadReport | None, examples: Sequence[Example]) -> str:
    if report is not None:
        return f"{report.dataset}:{report.split}"
    return examples[0].source.rsplit(":row ", 1)[0] if examples else "dataset"


def _over_limit(
    over: list[TooLong],
    checked: int,
    *,
    condition: str,
    reason: str,
    flag: str,
    skip: bool,
    report: LoadReport | None,
    where: str,
) -> None:
    """Raise, or (``skip``) count the dropped rows in ``report`` and log its line. ``condition`` completes
    "<n> of <m> prompts ..." (e.g. "are longer than --max_prompt_length 512 tokens"); ``reason`` is the
    skip reason of one row in the load report."""
    if not over:
        return
    longest = f"the longest is {max(r.tokens for r in over)} tokens"
    if not skip:
        raise LengthError(
            f"{where}: {len(over)} of {checked} prompts {condition}: {describe(over)}; pass --skip_bad_rows "
            f"true to drop them, or raise {flag} ({longest})"
        )
    if len(over) == checked:
        raise LengthError(
            f"{where}: all {checked} prompts {condition} ({describe(over)}); raise {flag} ({longest})"
        )
    if report is not None:
        report.drop([r.source for r in over], reason)
        logger.warning("%s", report.summary())
    logger.warning(
        "%s: dropped %d of %d prompts that %s: %s", where, len(over), checked, condition, describe(over)
    )


def prompt_ids(
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_prompt_length: int,
    skip: bool = False,
    report: LoadReport | None = None,
    flag: str = "--max_prompt_length",
    cache: dict[str, list[int]] | None = None,
    prompter: Prompter | None = None,
) -> tuple[list[Example], dict[str, list[int]]]:
    """Every example's prompt (``prompter``'s; default: the default settings) tokenized once and checked
    against ``max_prompt_length``.

    Returns the examples kept (all of them, or with ``skip`` those that fit) and ``cache``, which maps each
    problem text to its prompt's ids (a new dict unless given; problems already there are not encoded again).
    """
    cache = {} if cache is None else cache
    started = time.perf_counter()
    new = list(dict.fromkeys(ex.problem for ex in examples if ex.problem not in cache))
    prompter = prompter or Prompter(DEFAULT_PROMPT, tokenizer)
    texts = [prompter.prompt(problem) for problem in new]
    cache.update(zip(new, encode(tokenizer, texts), strict=True))
    over = [TooLong(ex.source, n) for ex in examples if (n := len(cache[ex.problem])) > max_prompt_length]
    where = _where(report, examples)
    logger.info(
        "%s: %d prompts tokenized in %.2f s (longest %d tokens, limit %s %d)",
        where,
        len(examples),
        time.perf_counter() - started,
        max((len(cache[ex.problem]) for ex in examples), default=0),
        flag,
        max_prompt_length,
    )
    _over_limit(
        over,
        len(examples),
        condition=f"are longer than {flag} {max_prompt_length} tokens",
        reason=f"prompt longer than {flag} {max_prompt_length} tokens",
        flag=flag,
        skip=skip,
        report=report,
        where=where,
    )
    dropped = {r.source for r in over}
    kept = [ex for ex in examples if ex.source not in dropped]
    for problem in {ex.problem for ex in examples if ex.source in dropped}:
        if len(cache[problem]) > max_prompt_length:
            cache.pop(problem, None)
    return kept, cache


@dataclass
class Sequences:
    """SFT rows: ``rows[i]`` is (prompt + completion + EOS ids, prompt length) of ``examples[i]``."""

    examples: list[Example]
    rows: list[tuple[list[int], int]]
    truncated: list[TooLong]  # sequences cut to max_seq_length (tokens: their length before)


def sft_sequences(
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_seq_length: int,
    skip: bool = False,
    report: LoadReport | None = None,
    flag: str = "--max_seq_length",
    prompter: Prompter | None = None,
) -> Sequences:
    """Prompt and completion ids of every example (``prompter``'s prompt and target; default: the default
    settings), tokenized once; sequences over ``max_seq_length`` are truncated (logged), prompts that leave
    no room for the completion are over-long prompts (see the module docstring)."""
    started = time.perf_counter()
    prompter = prompter or Prompter(DEFAULT_PROMPT, tokenizer)
    prompts = encode(tokenizer, [prompter.prompt(ex.problem) for ex in examples])
    completions = encode(tokenizer, [prompter.target(ex.reasoning, ex.answer) for ex in examples])
    where = _where(report, examples)
    eos = [tokenizer.eos_token_id]
    no_room = [
        TooLong(ex.source, len(p))
        for ex, p in zip(examples, prompts, strict=True)
        if len(p) >= max_seq_length
    ]
    _over_limit(
        no_room,
        len(examples),
        condition=f"leave no room for a completion within {flag} {max_seq_length} tokens",
        reason=f"prompt leaves no room for a completion within {flag} {max_seq_length} tokens",
        flag=flag,
        skip=skip,
        report=report,
        where=where,
    )
    dropped = {r.source for r in no_room}
    out = Sequences([], [], [])
    for ex, prompt, completion in zip(examples, prompts, completions, strict=True):
        if ex.source in dropped:
            continue
        ids = prompt + completion + eos
        if len(ids) > max_seq_length:
            out.truncated.append(TooLong(ex.source, len(ids)))
            ids = ids[:max_seq_length]
        out.examples.append(ex)
        out.rows.append((ids, len(prompt)))
    logger.info(
        "%s: %d sequences tokenized in %.2f s (longest %d tokens, limit %s %d)",
        where,
        len(examples),
        time.perf_counter() - started,
        max((len(p) + len(c) + 1 for p, c in zip(prompts, completions, strict=True)), default=0),
        flag,
        max_seq_length,
    )
    if out.truncated:
        logger.warning(
            "%s: %d of %d sequences (prompt + completion) are longer than %s %d tokens and are truncated to "
            "it, losing the end of their completion: %s",
            where,
            len(out.truncated),
            len(out.rows),
            flag,
            max_seq_length,
            describe(out.truncated),
        )
    return out
