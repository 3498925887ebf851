"""Small random-init models of the families people train R1-style models from, with their real tokenizers.

For each family: the transformers 4.51 architecture of its released models at a tiny size (hidden 64, two
layers), saved with the family's real tokenizer (:mod:`tests.support.real_tokenizers`) and its real
generation config (the eos list, bos and pad ids of the released checkpoints' ``generation_config.json``):

* ``qwen3``: ``Qwen3ForCausalLM`` (q/k RMSNorm, no qkv bias, tied embeddings as Qwen3-0.6B); eos
  ``<|im_end|>`` and ``<|endoftext|>`` as Qwen3's post-trained models ship them.
* ``llama3_1``: ``LlamaForCausalLM`` with Llama 3.1's ``llama3`` rope scaling; eos 128001/128008/128009.
* ``deepseek_v3``: ``DeepseekV3ForCausalLM`` (multi-head latent attention, one dense layer then a routed
  MoE layer with a shared expert), DeepSeek-V3/R1's tokenizer; eos 1 as DeepSeek-R1 ships it.
* ``gemma3``: ``Gemma3ForCausalLM`` with a ``Gemma3TextConfig`` (the text model of Gemma 3 1B: scaled
  embeddings, sandwich norms, a sliding-window layer then a global one); eos ``<eos>`` and
  ``<end_of_turn>``.

The weights are random: these models test plumbing (tokenization, stopping, the stage chain), not
learning. ``python -m tests.support.families FAMILY DIR`` builds one into DIR.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.real_tokenizers import tokenizer_dir


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the transformers class the released checkpoints load as
    vocab_size: int  # the released embedding size (>= len(tokenizer))
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # generation_config.eos_token_id of the released model
    pad_token_id: int | None
    tie_word_embeddings: bool


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("qwen3", "Qwen3ForCausalLM", 151936, 151643, (151645, 151643), 151643, True),
        Family("llama3_1", "LlamaForCausalLM", 128256, 128000, (128001, 128008, 128009), None, True),
        Family("deepseek_v3", "DeepseekV3ForCausalLM", 129280, 0, (1,), None, False),
        Family("gemma3", "Gemma3ForCausalLM", 262208, 2, (1, 106), 0, True),
    )
}


# DeepSeek-V3's own parts at toy size: multi-head latent attention (q/kv low-rank projections, a rotary part
# of each head) and, after one dense layer, a routed MoE layer with a shared expert.
TINY_DEEPSEEK_V3 = dict(
    num_key_value_heads=4,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    rope_scaling=None,
)


def model_config(family: Family) -> Any:
    """The tiny config of ``family``'s architecture (random init; sizes chosen for CPU tests)."""
    import transformers

    ids = dict(
        vocab_size=family.vocab_size,
        bos_token_id=family.bos_token_id,
        eos_token_id=list(family.eos_token_ids),
        pad_token_id=family.pad_token_id,
        tie_word_embeddings=family.tie_word_embeddings,
        max_position_embeddings=2048,
    )
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if family.name == "qwen3":
        # sliding_window None as the released configs have it (use_sliding_window false).
        return transformers.Qwen3Config(
            **ids, **small, num_key_value_heads=2, head_dim=16, rope_theta=1e6, sliding_window=None
        )
    if family.name == "llama3_1":
        rope = dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=512,
        )
        return transformers.LlamaConfig(
            **ids, **small, num_key_value_heads=2, rope_theta=5e5, rope_scaling=rope, rms_norm_eps=1e-5
        )
    if family.name == "deepseek_v3":
        return transformers.DeepseekV3Config(**ids, **small, **TINY_DEEPSEEK_V3)
    if family.name == "gemma3":
        return transformers.Gemma3TextConfig(
            **ids,
            **small,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=512,
            sliding_window_pattern=2,
            query_pre_attn_scalar=16,
        )
    raise KeyError(family.name)


def build(family_name: str, output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save ``family_name``'s tiny model, real tokenizer and real generation config into ``output_dir``
    (written under a temporary name, then renamed)."""
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    family = FAMILIES[family_name]
    output_dir = Path(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(family_name))
    if len(tokenizer) > family.vocab_size:
        raise ValueError(f"{family_name}: {len(tokenizer)} tokens do not fit vocab_size {family.vocab_size}")
    torch.manual_seed(seed)
    model = getattr(transformers, family.architecture)(model_config(family))
    model.generation_config = GenerationConfig(
        bos_token_id=family.bos_token_id,
        eos_token_id=list(family.eos_token_ids),
        pad_token_id=family.pad_token_id,
    )
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, output_dir)
    return output_dir


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in FAMILIES:
        sys.exit(f"usage: python -m tests.support.families {{{','.join(FAMILIES)}}} OUTPUT_DIR")
    print(build(sys.argv[1], sys.argv[2]))
