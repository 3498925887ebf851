"""The built-in task (`builtin:arith*`) and the tiny model folders (`builtin:tiny`, `builtin:tiny-qwen2`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.r1 import builtin
from trainer.r1.builtin import TASKS, builtin_rows, cache_root, is_builtin_model, resolve_model
from trainer.r1.format import FORMAT_TAGS

_EXPR = re.compile(r"^Compute (-?\d+(?: [+-] \d+)+)\.$")


def _value(question: str) -> int:
    """The exact value of a built-in question's expression, computed independently of the generator."""
    m = _EXPR.match(question)
    assert m, f"unexpected question text {question!r}"
    tokens = m.group(1).split()
    total = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        total = total + int(operand) if op == "+" else total - int(operand)
    return total


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_deterministic_and_disjoint(task: str) -> None:
    train, test = builtin_rows(task, "train"), builtin_rows(task, "test")
    assert train == builtin_rows(task, "train") and test == builtin_rows(task, "test")
    assert len(train) == builtin.ARITH.train_size and len(test) == builtin.ARITH.test_size
    test_questions = [r["question"] for r in test]
    assert len(set(test_questions)) == len(test_questions), "a test question appears twice"
    assert not set(test_questions) & {r["question"] for r in train}, "a test question appears in train"
    for row in train + test:
        assert set(row) == {"question", "reasoning", "answer"}
        assert row["question"] and row["reasoning"] and row["answer"]


def test_test_split_answers_are_correct() -> None:
    # The eval/GRPO reward is only as good as these answers (whatever the train traces look like).
    for task in TASKS:
        for row in builtin_rows(task, "test"):
            assert row["answer"] == str(_value(row["question"])), (task, row)
    for row in builtin_rows("arith", "train"):
        assert row["answer"] == str(_value(row["question"])), row


def test_rows_do_not_depend_on_the_process() -> None:
    # str hashing is salted per process (PYTHONHASHSEED); the split must not be.
    code = (
        "import hashlib, json; from trainer.r1.builtin import builtin_rows; "
        "print(hashlib.sha256(json.dumps([builtin_rows(t, s) for t in ('arith',) for s in ('train', 'test')])"
        ".encode()).hexdigest())"
    )
    here = hashlib.sha256(
        json.dumps([builtin_rows("arith", s) for s in ("train", "test")]).encode()
    ).hexdigest()
    for seed in ("1", "4242"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == here


def test_unknown_task_or_split() -> None:
    with pytest.raises(ValueError, match="unknown built-in task 'algebra'"):
        builtin_rows("algebra", "train")
    with pytest.raises(ValueError, match="has splits 'train' and 'test', not 'validation'"):
        builtin_rows("arith", "validation")


# ---------------------------------------------------------------------------------------------
# The tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_digits_are_single_tokens(tokenizer) -> None:
    ids = tokenizer.encode("1234567890", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == list("1234567890")
    # Also inside text, next to spaces and punctuation: no token mixes a digit with anything else.
    text = "Compute 47 + 38 - 1009.\n<think>\n7 + 8 = 15, carry 1\n</think>\n<answer>85</answer>"
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]
    assert "".join(pieces) == text
    for piece in pieces:
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, f"token {piece!r} mixes a digit with other characters"


def test_r1_tags_are_single_tokens(tokenizer) -> None:
    tag_ids = []
    for tag in FORMAT_TAGS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, (tag, ids)
        tag_ids.append(ids[0])
    assert len(set(tag_ids)) == 4
    text = "<think>\n1 + 2 = 3\n</think>\n<answer>3</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert [ids.count(i) for i in tag_ids] == [1, 1, 1, 1]
    # Not special tokens: decoding with skip_special_tokens (as the trainer does) keeps them.
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<s>"
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}) == 3
    assert tokenizer.padding_side == "left"


# ---------------------------------------------------------------------------------------------
# The model folders


def _check_model_folder(folder: Path, model_type: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == model_type
    assert model.config.vocab_size == len(tok)
    assert model.config.tie_word_embeddings
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 5_000_000, n_params
    ids = tok("Compute 12 + 34.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    return tok


def test_tiny_llama_loads_with_auto_classes(tiny_model_dir: Path) -> None:
    _check_model_folder(tiny_model_dir, "llama")
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert not [n for n in names if n.startswith(".")], names
    assert not [p.name for p in tiny_model_dir.parent.iterdir() if ".tmp-" in p.name]


def test_tiny_qwen2_loads_with_auto_classes(tiny_model_dir: Path) -> None:
    folder = Path(resolve_model("builtin:tiny-qwen2"))
    assert folder != tiny_model_dir and folder.parent == tiny_model_dir.parent
    tok = _check_model_folder(folder, "qwen2")
    from transformers import AutoTokenizer

    # Both architectures share one (deterministically trained) tokenizer.
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()


def test_resolve_model_builds_once_into_the_cache(tiny_model_dir: Path) -> None:
    assert Path(os.environ["R1_GRPO_CACHE"]) == cache_root()
    assert tiny_model_dir.is_relative_to(cache_root())
    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("builtin:tiny") == str(tiny_model_dir)
    assert resolve_model("builtin:tiny-llama") == str(tiny_model_dir)
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_resolve_model_other_names() -> None:
    assert resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_model("/models/mine") == "/models/mine"
    with pytest.raises(
        ValueError, match="'builtin:huge': unknown built-in model; built-in models: builtin:tiny"
    ):
        resolve_model("builtin:huge")
    assert is_builtin_model("builtin:tiny") and is_builtin_model("builtin:tiny-qwen2")
    assert not is_builtin_model("builtin:arith") and not is_builtin_model("tiny")


def test_build_tiny_cli_refuses_an_existing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert builtin.main(["--output_dir", str(tmp_path)]) == 2
    assert f"--output_dir {tmp_path}: already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        builtin.main(["--output_dir", str(tmp_path / "new"), "--arch", "gpt2"])
    assert e.value.code == 2
    assert "invalid choice: 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
