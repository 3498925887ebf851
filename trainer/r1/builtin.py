"""The embedded default: a built-in math task and a tiny causal LM the project builds itself.

`builtin:arith` — two-digit additions, "Compute 47 + 38.", with a digit-by-digit reasoning trace
("7 + 8 = 15, carry 1\n4 + 3 + 1 = 8") and the verified sum ("85") as the answer. GRPO and eval use it.

`builtin:arith-teacher` — the same training problems as *demonstrations from a sloppy teacher*: when a
column carries, the teacher notes the carry but forgets to add it 60% of the time, and its answer is
then wrong ("4 + 3 = 7" → "75"). SFT on it teaches the format and column addition — and the teacher's
habit. GRPO's verifiable reward then pushes the model past its teacher, as in DeepSeek-R1, where RL
improves on imperfect cold-start data. The test split has the same problems with correct traces.

Splits are deterministic and disjoint (a test question never appears in train).

`builtin:tiny` (Llama) / `builtin:tiny-qwen2` — a random-init model of under a million parameters with
a byte-level BPE tokenizer trained locally (with `tokenizers`) on the task's own text, saved with
`save_pretrained` so it loads through `AutoModelForCausalLM` / `AutoTokenizer` like any hub model.
Digits are single tokens (arithmetic stays learnable) and the R1 tags are tokens of their own.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.r1.format import FORMAT_TAGS

BUILTIN_PREFIX = "builtin:"
TASKS = ("arith", "arith-teacher")
TINY_MODELS = {"tiny": "llama", "tiny-llama": "llama", "tiny-qwen2": "qwen2"}
# Bump when the builder changes so cached copies are rebuilt.
TINY_VERSION = 3


@dataclass(frozen=True)
class ArithSpec:
    """Size and difficulty of the built-in task (small enough for a tiny model on CPU in minutes)."""

    low: int = 10
    high: int = 99
    train_size: int = 6000
    test_size: int = 300
    teacher_forgets_carry: float = 0.6


ARITH = ArithSpec()


def column_addition(a: int, b: int, forget_carry: bool = False) -> tuple[str, str]:
    """Reasoning trace and answer for a + b, column by column from the units."""
    lines, digits, carry = [], [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        terms = f"{x} + {y}" + (" + 1" if carry and not forget_carry else "")
        total = x + y + (carry if not forget_carry else 0)
        last = i == max(len(da), len(db)) - 1
        if last:
            lines.append(f"{terms} = {total}")
            digits.append(str(total)[::-1])
        else:
            carry = total // 10
            lines.append(f"{terms} = {total}" + (", carry 1" if carry else ""))
            digits.append(str(total % 10))
    return "\n".join(lines), "".join(digits)[::-1]


def _is_test(question: str) -> bool:
    # A stable hash split: the same question always lands in the same split, so they never overlap.
    return hashlib.sha256(question.encode()).digest()[0] < 26  # ~10% of the question space


def builtin_rows(task: str, split: str) -> list[dict[str, str]]:
    """Rows of a built-in task in the built-in schema (`question`, `reasoning`, `answer`)."""
    if task not in TASKS:
        raise ValueError(f"unknown built-in task {task!r}; built-in tasks: {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"built-in task {task!r} has splits 'train' and 'test', not {split!r}")
    spec = ARITH
    want_test = split == "test"
    size = spec.test_size if want_test else spec.train_size
    space = (spec.high - spec.low + 1) ** 2
    rng = random.Random(f"arith-{split}")  # both tasks share the problems; only the traces differ
    teacher = random.Random(f"teacher-{split}")
    rows, seen = [], set()
    while len(rows) < size and len(seen) < space:
        a, b = rng.randint(spec.low, spec.high), rng.randint(spec.low, spec.high)
        question = f"Compute {a} + {b}."
        if _is_test(question) != want_test:
            continue
        # Drawn for every candidate so the teacher's choices do not depend on duplicates.
        sloppy = (
            task == "arith-teacher" and split == "train" and teacher.random() < spec.teacher_forgets_carry
        )
        if question in seen and not want_test:
            pass  # training data may repeat a problem, as real corpora do
        elif question in seen:
            continue
        seen.add(question)
        reasoning, answer = column_addition(a, b, forget_carry=sloppy)
        rows.append({"question": question, "reasoning": reasoning, "answer": answer})
    return rows


# ---------------------------------------------------------------------------------------------
# The tiny model


def cache_root() -> Path:
    return Path(os.environ.get("R1_GRPO_CACHE", Path.home() / ".cache" / "r1-grpo"))


def is_builtin_model(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX) and name[len(BUILTIN_PREFIX) :] in TINY_MODELS


def resolve_model(name_or_path: str) -> str:
    """Map `builtin:tiny*` to a built (cached) folder; anything else is returned unchanged."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    key = name_or_path[len(BUILTIN_PREFIX) :]
    if key not in TINY_MODELS:
        raise ValueError(
            f"--model_name_or_path {name_or_path!r}: unknown built-in model; "
            f"built-in models: {', '.join(BUILTIN_PREFIX + k for k in TINY_MODELS)}"
        )
    arch = TINY_MODELS[key]
    target = cache_root() / f"tiny-{arch}-v{TINY_VERSION}"
    if not (target / "config.json").is_file():
        build_tiny_model(target, arch=arch)
    return str(target)


def _tokenizer_corpus() -> list[str]:
    from trainer.r1.format import format_completion
    from trainer.r1.prompt import plain_prompt

    texts = []
    for split in ("train", "test"):
        for row in builtin_rows("arith", split):
            texts.append(plain_prompt(row["question"]))
            texts.append(format_completion(row["reasoning"], row["answer"]))
    # General text so other datasets still tokenize to something sensible (byte fallback covers the rest).
    texts += [
        "What is the value of x? Solve for x. The answer is \\frac{1}{2}. Let us think step by step.",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    ]
    return texts


def build_tokenizer(vocab_size: int = 1024):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits stay single tokens; byte-level covers any UTF-8 text; no whitespace split, so frequent
    # phrases (the system prompt, "User:", "Assistant:") merge into few tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=64,
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    # The R1 tags are ordinary (non-special) added tokens: one id each, and decode() keeps them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=1024,
        # A causal LM takes no token_type_ids: `model.generate(**tokenizer(text, return_tensors="pt"))`
        # (the usual inference snippet) refuses them.
        model_input_names=["input_ids", "attention_mask"],
    )


def build_tiny_model(output_dir: str | os.PathLike, arch: str = "llama", seed: int = 0) -> Path:
    """Build tokenizer + random-init model and save both (atomically) to `output_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    else:
        raise ValueError(f"arch must be 'llama' or 'qwen2', not {arch!r}")
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, output_dir)
    except OSError:
        # Another process built it first (e.g. two torchrun ranks); theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (output_dir / "config.json").is_file():
            raise
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="r1-grpo build-tiny", allow_abbrev=False, description=build_tiny_model.__doc__
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.output_dir).exists():
        print(f"--output_dir {args.output_dir}: already exists", file=sys.stderr)
        return 2
    path = build_tiny_model(args.output_dir, arch=args.arch, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
