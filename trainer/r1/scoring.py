"""Scoring a model on problems: k samples per problem, rewards, pass@1 / pass@k / maj@k.

Shared by the eval stage, GRPO's periodic held-out evaluation and the local pipeline's summary table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.r1.data import Example
from trainer.r1.format import STOP_STRINGS, check_format, extract_answer
from trainer.r1.prompt import DEFAULT_PROMPT, Prompter
from trainer.r1.rewards import answers_equal, normalize_answer, reward_function
from trainer.runtime import Dist, progress


@dataclass
class EvalResult:
    metrics: dict[str, float]
    records: list[dict[str, Any]]


def majority_answer(answers: list[str | None]) -> str | None:
    """Most frequent extracted answer (by normalised text; ties go to the earliest)."""
    present = [a for a in answers if a is not None]
    if not present:
        return None
    counts = Counter(normalize_answer(a) for a in present)
    best = max(counts.values())
    return next(a for a in present if counts[normalize_answer(a)] == best)


def evaluate_model(
    model,
    tokenizer,
    examples: list[Example],
    *,
    k: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    seed: int = 1234,
    show_progress: bool = False,
    prompt_ids: Mapping[str, list[int]] | None = None,
    prompter: Prompter | None = None,
) -> EvalResult:
    """Generate k completions per example and score them; single process (callers shard).

    ``prompt_ids`` maps problem texts to their prompts' token ids (:func:`trainer.r1.lengths.prompt_ids`,
    which also checked their lengths); problems not in it are tokenized here with ``prompter`` (default:
    the default settings), whose prefill, if any, starts every completion's text that is scored."""
    import torch  # the model's side; this module's own scoring needs no torch

    with torch.no_grad():
        return _evaluate_model(
            torch,
            model,
            tokenizer,
            examples,
            k=k,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            show_progress=show_progress,
            prompt_ids=prompt_ids or {},
            prompter=prompter or Prompter(DEFAULT_PROMPT, tokenizer),
        )


def _evaluate_model(
    torch,
    model,
    tokenizer,
    examples,
    *,
    k,
    temperature,
    top_p,
    max_new_tokens,
    batch_size,
    seed,
    show_progress,
    prompt_ids,
    prompter,
) -> EvalResult:
    from trainer.rl.sampling import sample_groups
    from trainer.rl.stopping import StopStrings, eos_token_ids

    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    eos = eos_token_ids(tokenizer, model)
    stops = StopStrings.for_tokenizer(tokenizer, STOP_STRINGS)
    records: list[dict[str, Any]] = []
    bar = progress(len(examples), 0, "eval", Dist()) if show_progress else None
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [
            prompt_ids[ex.problem]
            if ex.problem in prompt_ids
            else tokenizer(prompter.prompt(ex.problem), add_special_tokens=False)["input_ids"]
            for ex in chunk
        ]
        out = sample_groups(
            model,
            prompts,
            num_generations=k,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_ids=eos,
            stop_strings=stops,
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
        )
        lengths = out.completion_mask.sum(1).tolist()
        for i, ex in enumerate(chunk):
            rows = range(i * k, (i + 1) * k)
            texts = [
                prompter.response(stops.text(out.completion_ids[r, : lengths[r]].tolist())) for r in rows
            ]
            rewards = [reward_function(t, ex.answer) for t in texts]
            answers = [extract_answer(t) for t in texts]
            correct = [r == 10.0 for r in rewards]
            majority = majority_answer(answers)
            records.append(
                {
                    "source": ex.source,
                    "dataset": ex.dataset,
                    "problem": ex.problem,
                    "answer": ex.answer,
                    "completions": texts,
                    "rewards": rewards,
                    "pass@1": sum(correct) / k,
                    f"pass@{k}": float(any(correct)),
                    f"maj@{k}": float(majority is not None and answers_equal(majority, ex.answer)),
                    "format_ok": [check_format(t) for t in texts],
                    "completion_tokens": [lengths[r] for r in rows],
                    "truncated": [bool(out.truncated[r]) for r in rows],
                }
            )
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return EvalResult(summarize(records, k), records)


def datasets_of(records: list[dict[str, Any]]) -> list[str]:
    """The datasets (mixture entries) the records come from, in order of first appearance."""
    return list(dict.fromkeys(rec.get("dataset", "") for rec in records))


def summarize_by_dataset(records: list[dict[str, Any]], k: int) -> dict[str, float]:
    """:func:`summarize` over all records (each problem counts once, whichever dataset it is from), and,
    when they come from several datasets, every metric again per dataset as ``<metric>/<dataset>``
    (``pass@1/math-ai/aime24``: the metric name holds no ``/``, so the first one splits the key)."""
    metrics = summarize(records, k)
    datasets = datasets_of(records)
    if len(datasets) > 1:
        for name in datasets:
            part = summarize([rec for rec in records if rec.get("dataset", "") == name], k)
            metrics.update({f"{key}/{name}": value for key, value in part.items()})
    return metrics


def summarize(records: list[dict[str, Any]], k: int) -> dict[str, float]:
    n = max(1, len(records))
    samples = [
        (f, r, t, tr)
        for rec in records
        for f, r, t, tr in zip(
            rec["format_ok"], rec["rewards"], rec["completion_tokens"], rec["truncated"], strict=True
        )
    ]
    m = max(1, len(samples))
    metrics = {
        "num_problems": float(len(records)),
        "accuracy": sum(rec["pass@1"] for rec in records) / n,
        "pass@1": sum(rec["pass@1"] for rec in records) / n,
        "format_rate": sum(s[0] for s in samples) / m,
        "mean_reward": sum(s[1] for s in samples) / m,
        "mean_completion_tokens": sum(s[2] for s in samples) / m,
        "truncated_rate": sum(s[3] for s in samples) / m,
    }
    if k > 1:
        metrics[f"pass@{k}"] = sum(rec[f"pass@{k}"] for rec in records) / n
        metrics[f"maj@{k}"] = sum(rec[f"maj@{k}"] for rec in records) / n
    return metrics
