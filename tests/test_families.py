"""Stopping and greedy decoding with the real tokenizers of Qwen3, Llama 3.1, DeepSeek-V3 and Gemma 3.

Scripted-logit probes (a model whose logits put all mass on a chosen token sequence) show that
``</answer>`` ends a completion whatever character precedes it - the families' vocabularies merge ``}</``,
``)</``, ``.</`` and `` </`` into single tokens - and that every eos id of the family's generation config
ends one. The families' small random-init models (:mod:`tests.support.families`) show that the sampler's
greedy tokens equal HF ``generate``'s, alone and left-padded in a batch.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.support.families import FAMILIES
from tests.support.real_tokenizers import tokenizer_dir
from trainer.r1.format import ANSWER_CLOSE, STOP_STRINGS
from trainer.rl.sampling import sample_groups
from trainer.rl.stopping import StopStrings, eos_token_ids

FAMILY_NAMES = list(FAMILIES)


@functools.cache
def tokenizer(family: str):
    return AutoTokenizer.from_pretrained(tokenizer_dir(family))


class ScriptedLM(nn.Module):
    """A causal LM that emits ``script`` token by token after a prompt of ``prompt_len`` tokens (the
    shape of an HF model as the sampler's generic decoder drives it: config, embeddings, a KV cache)."""

    def __init__(self, vocab_size: int, script: list[int], prompt_len: int, eos: list[int]):
        super().__init__()
        self.config = SimpleNamespace(model_type="scripted", vocab_size=vocab_size)
        self.generation_config = GenerationConfig(eos_token_id=eos)
        self.embed = nn.Embedding(vocab_size, 1)
        self.script, self.prompt_len = script, prompt_len

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        past = (
            past_key_values[0][0] if past_key_values is not None else input_ids.new_zeros(len(input_ids), 0)
        )
        seen = torch.cat([past, input_ids], dim=1)  # the "cache": every token fed so far
        step = seen.shape[1] - self.prompt_len  # completion tokens fed so far: emit script[step]
        logits = torch.full((len(input_ids), 1, self.config.vocab_size), -1e4)
        logits[:, :, self.script[min(step, len(self.script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=((seen, seen),))


assert "position_ids" in inspect.signature(ScriptedLM.forward).parameters


def run_script(family: str, script: list[int], **options):
    tok = tokenizer(family)
    prompt = tok.encode("What is 2 + 3?", add_special_tokens=False)
    model = ScriptedLM(max(len(tok), *script) + 1, script, len(prompt), list(FAMILIES[family].eos_token_ids))
    return sample_groups(
        model,
        [prompt],
        num_generations=2,
        max_new_tokens=len(script) + 4,
        temperature=0.0,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        **options,
    )


# The characters a MATH-style answer ends with before its closing tag.
ANSWER_ENDINGS = {
    "brace": "\\boxed{5}",
    "paren": "(1, 2)",
    "period": "5.",
    "space": "5 ",
    "newline": "5\n",
    "digit": "55",
}


@pytest.mark.parametrize("ending", list(ANSWER_ENDINGS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_answer_tag_stops_after_any_character(family: str, ending: str) -> None:
    tok = tokenizer(family)
    head = f"<think>\nsum\n</think>\n<answer>{ANSWER_ENDINGS[ending]}{ANSWER_CLOSE}"
    script = tok.encode(head + " and then more text that must not be sampled", add_special_tokens=False)
    out = run_script(
        family, script, eos_token_ids=[], stop_strings=StopStrings.for_tokenizer(tok, STOP_STRINGS)
    )
    for row in range(2):
        n = int(out.completion_lengths[row])
        ids = out.completion_ids[row, :n].tolist()
        assert ids == script[:n] and not bool(out.truncated[row])
        # The completion ends with the token that completes the tag: the reward's text and the trained
        # tokens agree (the mask covers exactly these n tokens).
        assert ANSWER_CLOSE in tok.decode(ids, skip_special_tokens=True)
        assert ANSWER_CLOSE not in tok.decode(ids[:-1], skip_special_tokens=True)
        assert int(out.completion_mask[row].sum()) == n
        assert tok.decode(ids, skip_special_tokens=True).startswith(head)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merged_tag_tokens_are_what_token_matching_missed(family: str) -> None:
    """The reason for matching text: the tag's own token ids are not a suffix of these tokenizations."""
    tok = tokenizer(family)
    tag = tok.encode(ANSWER_CLOSE, add_special_tokens=False)
    missed = [
        e
        for e, text in ANSWER_ENDINGS.items()
        if tok.encode(text + ANSWER_CLOSE, add_special_tokens=False)[-len(tag) :] != tag
    ]
    assert {"brace", "paren", "period", "space"} <= set(missed), missed


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_generation_config_eos_ends_a_completion(family: str) -> None:
    tok = tokenizer(family)
    spec = FAMILIES[family]
    before = tok.encode("<think>\nsum", add_special_tokens=False)
    after = tok.encode(" text after the end", add_special_tokens=False)
    for eos in spec.eos_token_ids:
        model_eos = list(spec.eos_token_ids)
        out = run_script(
            family, before + [eos] + after, eos_token_ids=eos_token_ids(tok, model_with(model_eos))
        )
        for row in range(2):
            n = int(out.completion_lengths[row])
            assert out.completion_ids[row, :n].tolist() == before + [eos], (
                eos,
                out.completion_ids[row].tolist(),
            )
            assert not bool(out.truncated[row])
            assert tok.decode(out.completion_ids[row, :n], skip_special_tokens=True) == "<think>\nsum"


def model_with(eos: list[int]) -> nn.Module:
    holder = nn.Module()
    holder.generation_config = GenerationConfig(eos_token_id=eos)
    return holder


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_eos_ids_are_the_tokenizer_and_generation_config_union(family: str) -> None:
    tok = tokenizer(family)
    spec = FAMILIES[family]
    assert eos_token_ids(tok, model_with(list(spec.eos_token_ids))) == sorted(
        {tok.eos_token_id, *spec.eos_token_ids}
    )
    assert eos_token_ids(tok) == [tok.eos_token_id]


@pytest.fixture(scope="module")
def family_model(family_models):
    """(model, tokenizer) of a family's small random-init model, loaded once per family."""
    loaded = {}

    def get(family: str):
        if family not in loaded:
            path = family_models(family)
            loaded[family] = (
                AutoModelForCausalLM.from_pretrained(path).eval(),
                AutoTokenizer.from_pretrained(path),
            )
        return loaded[family]

    return get


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_tokens_equal_hf_generate_alone_and_left_padded(family: str, family_model) -> None:
    model, tok = family_model(family)
    eos = eos_token_ids(tok, model)
    assert eos == sorted({tok.eos_token_id, *FAMILIES[family].eos_token_ids})
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    texts = ["What is 2 + 3?", "Hi", "Compute the sum of the first ten odd numbers, please."]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    new = 10
    out = sample_groups(
        model,
        prompts,
        num_generations=2,
        max_new_tokens=new,
        temperature=0.0,
        eos_token_ids=eos,
        pad_token_id=pad,
        keep_logits=True,
    )
    ours = [out.completion_ids[r, : int(out.completion_lengths[r])].tolist() for r in range(len(prompts) * 2)]
    assert ours[0::2] == ours[1::2]  # greedy: both samples of a prompt agree

    def cut(ids: list[int]) -> list[int]:  # HF pads after the first eos; ours stops there
        for i, t in enumerate(ids):
            if t in eos:
                return ids[: i + 1]
        return ids

    def agree(row: int, theirs: list[int]) -> None:
        """Same tokens, except that a random tiny model can meet a near-tie (batch shapes change the float
        rounding): there both tokens' logits must be within 1e-4, and the comparison ends."""
        mine = ours[2 * row]
        for t, (a, b) in enumerate(zip(mine, theirs, strict=False)):
            if a != b:
                logits = out.logits[2 * row, t]
                assert float(logits[a] - logits[b]) < 1e-4, (row, t, mine, theirs)
                return
        assert len(mine) == len(theirs), (row, mine, theirs)

    # Two tokens more than ours, cut back: transformers 4.51's Gemma 3 `generate` picks a different last
    # token at exactly max_new_tokens (its HybridCache sized to the end) than its own uncached forward does.
    config = dict(max_new_tokens=new + 2, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    for row, p in enumerate(prompts):
        alone = model.generate(
            torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **config
        )
        agree(row, cut(alone[0, len(p) : len(p) + new].tolist()))
        # And the uncached forward over prompt + our tokens (teacher forcing) predicts each of our tokens.
        mine = ours[2 * row]
        full = model(torch.tensor([p + mine[:-1]])).logits[0, len(p) - 1 :]
        for t, token in enumerate(mine):
            assert float(full[t].max() - full[t, token]) < 1e-4, (row, t, mine)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    padded = model.generate(ids, attention_mask=mask, **config)[:, width : width + new].tolist()
    for row, theirs in enumerate(padded):
        agree(row, cut(theirs))
