"""The shared-prompt packed forward: a GRPO group as one sequence, `[prompt | completion_1 | ... | completion_G]`.

The prompt runs once per group and completions carry no padding. For Llama/Qwen2 on transformers 4.x the
attention computes only the blocks that exist (the prompt causally, each completion against its prompt and
itself) through an attention function registered in transformers' registry; elsewhere a block mask.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from trainer.rl.head_logprobs import hidden_token_logprobs
from trainer.rl.logprobs import (
    DEFAULT_CHUNK_ROWS,
    _forward_parameters,
    _logits_of,
    token_logprobs,
    unwrap_model,
)

# --------------------------------------------------------------------------------------------------
# Shared-prompt forward: one prompt, G completions, one packed sequence
# --------------------------------------------------------------------------------------------------
# A GRPO rollout holds G completions of each prompt. Scoring them as G separate rows runs the prompt
# G times and pads every completion to the longest; packing a group as ``[prompt | c_1 | ... | c_G]``
# (real tokens only) with a block mask (each completion sees the prompt and itself, never another
# completion) and positions that restart after the prompt runs the prompt once and no padding. The
# linear layers - most of the compute - then see n + sum(len_i) tokens instead of G*(P + T); the masked
# attention sees the square of that instead of G*(P + T)^2, so long completions can make it a loss:
# `shared_prompt_plan` compares both costs and the mask's memory, and returns None when the plain
# forward is the better (or the only valid) choice.
#
# Split attention: a masked full block computes (n + sum(len_i))^2 attention pairs, most of them masked
# (CPU kernels do not skip masked blocks). Where the model's attention layers dispatch through
# transformers' attention registry, the packed forward swaps in `_split_attention` instead: prompt
# tokens attend causally among the first ``P`` positions, and the completions, gathered into
# ``[groups * G, C]`` slots, attend to their group's prompt keys and their own keys only - about
# n^2 / 2 + sum(len_i * (n + len_i)) pairs. Same values; the linear layers still see the packed rows.
SHARED_PROMPT_ATTENTION = ("sdpa", "eager")  # kernels that take an arbitrary additive 4-D mask
SHARED_PROMPT_MASK_BYTES = 256 * 2**20  # per forward
SPLIT_ATTENTION_NAME = "r1_grpo_split"  # registered in transformers' AttentionInterface on first use
# Model families whose attention modules take (query, key, value) from the registry after RoPE and
# return [B, L, H, hd] (transformers 4.48+ Llama/Qwen2 style; Qwen3 normalises q/k before, which is the
# same to the attention function). Gemma 3 (sliding-window layers, its own masks) and DeepSeek-V3 keep the
# block mask.
SPLIT_ATTENTION_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class SharedPromptPlan:
    def __init__(self, groups_per_forward: int, cost_ratio: float, split_attention: bool = False):
        self.groups_per_forward = groups_per_forward
        self.cost_ratio = cost_ratio  # packed / plain, estimated
        self.split_attention = split_attention  # attention via `_split_attention` (no block mask)


def _real_lengths(attention_mask: Tensor, t: int) -> tuple[int, int]:
    """Width of the prompt region that any row attends to, and of the completion region likewise."""
    length = attention_mask.shape[1]
    prompt = attention_mask[:, : length - t].bool().any(dim=0)
    first = int(prompt.long().argmax()) if bool(prompt.any()) else length - t - 1
    completion = attention_mask[:, length - t :].bool().any(dim=0)
    last = int(completion.nonzero().max()) + 1 if bool(completion.any()) else 1
    return length - t - min(first, length - t - 1), last


def _packed_lengths(attention_mask: Tensor, t: int, group_size: int) -> Tensor:
    """Tokens of each group's packed sequence: its prompt once plus every completion's real tokens."""
    length = attention_mask.shape[1]
    prompt = attention_mask[::group_size, : length - t].long().sum(1)
    completions = attention_mask[:, length - t :].long().sum(1).view(-1, group_size).sum(1)
    return prompt + completions


def shared_prompt_plan(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, t: int, group_size: int, batch_size: int
) -> SharedPromptPlan | None:
    """Whether (and how) to score ``input_ids`` with the shared-prompt forward; None: use the plain one."""
    n, length = input_ids.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or n % group_size:
        return None
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if attn not in SHARED_PROMPT_ATTENTION or "logits_to_keep" not in _forward_parameters(model):
        return None  # flash-attention takes no arbitrary mask; old forwards cannot keep chosen positions
    reason = sliding_window_reason(config)
    if reason is not None:
        _log_plain_once(inner, reason)
        return None
    prompt_ids = input_ids[:, : length - t].view(n // group_size, group_size, -1)
    prompt_mask = attention_mask[:, : length - t].view(n // group_size, group_size, -1)
    if not (
        torch.equal(prompt_ids, prompt_ids[:, :1].expand_as(prompt_ids))
        and torch.equal(prompt_mask, prompt_mask[:, :1].expand_as(prompt_mask))
    ):
        return None  # rows of a group do not share one prompt
    if int(prompt_mask[:, 0].sum(-1).min()) < 1:
        return None  # an empty prompt: no position to predict the first completion token from
    comp_mask = attention_mask[:, length - t :].long()
    if bool((comp_mask[:, 1:] > comp_mask[:, :-1]).any()) or not bool(comp_mask[:, 0].all()):
        return None  # a completion with a hole, or an empty one: not one run of >= 1 tokens
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    if hidden <= 0 or layers <= 0:
        return None
    embeddings = {id(m.weight) for m in inner.modules() if isinstance(m, nn.Embedding)}
    out = getattr(inner, "get_output_embeddings", lambda: None)()
    if out is not None:
        embeddings.add(id(out.weight))
    linear = 2.0 * sum(w.numel() for w in inner.parameters() if id(w) not in embeddings)  # FLOPs per token
    pair = 4.0 * hidden * layers  # QK^T and AV per (query, key) pair
    p, c = _real_lengths(attention_mask, t)
    n_groups = n // group_size
    plain = n_groups * group_size * (linear * (p + c) + pair * (p + c) ** 2)
    width = int(_packed_lengths(attention_mask, t, group_size).max())  # rows of a forward pad to the longest
    if split_attention_supported(model):
        # Prompt causal block plus each completion slot against [prompt | itself]; small masks.
        packed = n_groups * (linear * width + pair * (p * p + group_size * c * (p + c)))
        if packed >= plain:
            return None
        return SharedPromptPlan(
            max(1, min(n_groups, batch_size // group_size)), packed / plain, split_attention=True
        )
    packed = n_groups * (linear * width + pair * width**2)
    element = torch.finfo(next(inner.parameters()).dtype).bits // 8
    if packed >= plain or width * width * element > SHARED_PROMPT_MASK_BYTES:
        return None
    groups = max(
        1, min(n_groups, batch_size // group_size, SHARED_PROMPT_MASK_BYTES // (width * width * element))
    )
    return SharedPromptPlan(groups, packed / plain)


def sliding_window_reason(config: Any) -> str | None:
    """Why a model with sliding-window layers cannot take the packed forward (its layers window the key
    columns of the packed row, not token positions: Gemma 3, Mistral, Qwen with use_sliding_window), or None.
    """
    window = getattr(config, "sliding_window", None)
    model_type = getattr(config, "model_type", None)
    if window is None or (
        model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False)
    ):
        return None
    return f"{model_type!r} has sliding-window attention layers (window {window})"


_LOGGED_PLAIN: set[str] = set()


def _log_plain_once(inner: nn.Module, reason: str) -> None:
    name = type(inner).__name__
    if name not in _LOGGED_PLAIN:
        _LOGGED_PLAIN.add(name)
        logging.getLogger(__name__).info("training forward: one row per completion for %s (%s)", name, reason)


def split_attention_supported(model: nn.Module) -> bool:
    """Whether the packed forward can run `_split_attention` in ``model``'s attention layers.

    Needs transformers' attention registry (4.48+; 5.x builds its masks differently, so it keeps the
    block mask there), a Llama/Qwen2 model whose every ``self_attn`` forward looks its kernel up in that
    registry (a Colossal-AI shardformer policy replaces those forwards), and no gradient checkpointing
    (its recomputation would run outside the forward that selects the split kernel).
    """
    try:
        import transformers
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: F401
    except ImportError:
        return False
    if int(transformers.__version__.split(".")[0]) != 4:
        return False
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in SPLIT_ATTENTION_MODEL_TYPES or getattr(
        inner, "is_gradient_checkpointing", False
    ):
        return False
    if getattr(config, "use_sliding_window", False):
        return False  # Qwen sliding-window layers pass a window `_split_attention` does not apply
    layers = [m for name, m in inner.named_modules() if name.endswith("self_attn")]
    if len(layers) != int(getattr(config, "num_hidden_layers", -1)):
        return False
    return all(
        "ALL_ATTENTION_FUNCTIONS" in getattr(getattr(type(m).forward, "__code__", None), "co_names", ())
        for m in layers
    )


class _SplitLayout:
    """Where each token of a packed forward ``[B groups, L]`` goes in `_split_attention`.

    ``prompt_width`` P: the longest prompt of the forward (group ``b``'s prompt is its first ``n_b <= P``
    positions); ``completion_width`` C: the longest completion. ``completion_src`` [B*G*C]: flat index
    into ``B*L`` of each completion slot's token (padding slots repeat the completion's last token;
    they are masked as keys and never read back). ``output_src`` [B*L]: for each packed position, its
    row in ``cat(prompt outputs [B*P], completion slot outputs [B*G*C])``. ``allowed`` [B*G, C, P+C]:
    which keys a completion slot sees (its group's real prompt tokens, its own tokens up to itself).
    """

    def __init__(
        self, prompt_lens: list[int], completion_lens: list[int], group_size: int, width: int, device
    ):
        B, G = len(prompt_lens), group_size
        P, C = max(prompt_lens), max(completion_lens)
        self.group_size, self.prompt_width, self.completion_width = G, P, C
        n_prompt = torch.tensor(prompt_lens, device=device)
        lens = torch.tensor(completion_lens, device=device).view(B, G)
        starts = n_prompt[:, None] + torch.cumsum(lens, 1) - lens  # [B, G] first position in the row
        j = torch.arange(C, device=device)
        row = torch.arange(B, device=device)[:, None, None] * width
        within = torch.minimum(j[None, None, :], lens[:, :, None] - 1)  # [B, G, C]
        self.completion_src = (row + starts[:, :, None] + within).reshape(-1)
        output = torch.zeros(B * width, dtype=torch.long, device=device)
        prompt_pos = torch.arange(P, device=device)
        real_prompt = prompt_pos[None, :] < n_prompt[:, None]  # [B, P]
        prompt_flat = (torch.arange(B, device=device)[:, None] * width + prompt_pos[None, :])[real_prompt]
        output[prompt_flat] = (torch.arange(B, device=device)[:, None] * P + prompt_pos[None, :])[real_prompt]
        real_slot = (j[None, None, :] < lens[:, :, None]).reshape(-1)
        output[self.completion_src[real_slot]] = B * P + torch.arange(B * G * C, device=device)[real_slot]
        self.output_src = output
        own = (j[None, :] <= j[:, None])[None] & (j[None, None, :] < lens.reshape(-1, 1, 1))  # [B*G, C, C]
        prompt_keys = real_prompt.repeat_interleave(G, dim=0)[:, None, :].expand(B * G, C, P)
        self.allowed = torch.cat([prompt_keys, own], dim=-1)
        self._bias: dict[tuple[torch.dtype, int], Tensor] = {}
        self.calls = 0

    def bias(self, dtype: torch.dtype, n_rep: int) -> Tensor:
        """Additive mask [B*G, 1, n_rep*C, P+C]: query rows are (repeat, slot), as `_split_attention` folds them."""
        key = (dtype, n_rep)
        if key not in self._bias:
            bias = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            bias.masked_fill_(~self.allowed, float("-inf"))
            self._bias[key] = bias.repeat(1, n_rep, 1)[:, None]
        return self._bias[key]


_ACTIVE_SPLIT_LAYOUT: list[_SplitLayout] = []  # set for the duration of one packed forward


def _split_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of one packed forward (see `_SplitLayout`); the transformers attention-function signature.

    ``query`` [B, H, L, hd], ``key``/``value`` [B, KV, L, hd] (after RoPE, KV heads not repeated);
    returns [B, L, H, hd]. ``attention_mask`` (a placeholder) is not read.
    """
    from transformers.integrations.sdpa_attention import repeat_kv

    if not _ACTIVE_SPLIT_LAYOUT:
        raise RuntimeError(f"attention {SPLIT_ATTENTION_NAME!r} called outside a shared-prompt forward")
    layout = _ACTIVE_SPLIT_LAYOUT[-1]
    F = torch.nn.functional
    B, H, L, hd = query.shape
    KV = key.shape[1]
    n_rep = H // KV
    G, P, C = layout.group_size, layout.prompt_width, layout.completion_width
    # Prompt tokens: causal over the first P positions. Where a group's prompt is shorter than P, the
    # positions after it hold completion tokens; real prompt queries never reach them (causality), and
    # the outputs at those positions are taken from the completion slots below.
    key_p, value_p = key[:, :, :P], value[:, :, :P]
    out_prompt = F.scaled_dot_product_attention(
        query[:, :, :P],
        repeat_kv(key_p, n_rep),
        repeat_kv(value_p, n_rep),
        dropout_p=dropout,
        is_causal=True,
        scale=scaling,
    )

    def slots(x: Tensor) -> Tensor:  # [B, h, L, hd] -> [B*G, C, h, hd]
        heads = x.shape[1]
        flat = x.transpose(1, 2).reshape(B * L, heads, hd)
        return flat.index_select(0, layout.completion_src).view(B * G, C, heads, hd)

    # Completion slots: the n_rep query heads of a KV head are folded into one [n_rep*C] query block,
    # against [its group's prompt keys | its own keys] (no repeated K/V, one mask for all heads).
    q = slots(query).view(B * G, C, KV, n_rep, hd).permute(0, 2, 3, 1, 4).reshape(B * G, KV, n_rep * C, hd)
    k = torch.cat(
        [key_p[:, None].expand(B, G, KV, P, hd).reshape(B * G, KV, P, hd), slots(key).transpose(1, 2)], dim=2
    )
    v = torch.cat(
        [value_p[:, None].expand(B, G, KV, P, hd).reshape(B * G, KV, P, hd), slots(value).transpose(1, 2)],
        dim=2,
    )
    out_slots = F.scaled_dot_product_attention(
        q, k, v, attn_mask=layout.bias(q.dtype, n_rep), dropout_p=dropout, scale=scaling
    )
    out_slots = out_slots.view(B * G, KV, n_rep, C, hd).permute(0, 3, 1, 2, 4).reshape(B * G * C, H, hd)
    out = torch.cat([out_prompt.transpose(1, 2).reshape(B * P, H, hd), out_slots]).index_select(
        0, layout.output_src
    )
    layout.calls += 1
    return out.view(B, L, H, hd), None


class _split_attention_forward:
    """Context: the model's attention layers run `_split_attention` with ``layout`` for one forward."""

    def __init__(self, inner: nn.Module, layout: _SplitLayout):
        self.config, self.layout = inner.config, layout

    def __enter__(self) -> _SplitLayout:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if SPLIT_ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(SPLIT_ATTENTION_NAME, _split_attention)
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = SPLIT_ATTENTION_NAME
        _ACTIVE_SPLIT_LAYOUT.append(self.layout)
        return self.layout

    def __exit__(self, *exc: object) -> None:
        _ACTIVE_SPLIT_LAYOUT.pop()
        self.config._attn_implementation = self.previous


def grouped_completion_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    t: int,
    group_size: int,
    groups_per_forward: int,
    temperature: float,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    split_attention: bool = False,
    head: tuple[nn.Module, Tensor] | None = None,
) -> Tensor:
    """`completion_logprobs` with each group's prompt run once (see `shared_prompt_plan` for when).

    Group row: ``[prompt (n real tokens) | c_1 | ... | c_G | padding]``, completions at their real
    lengths. Completion ``i`` token ``j`` has position ``n + j`` (as in its own row) and sees the prompt
    and its own tokens ``<= j`` (padding at the row's end sees the prompt and itself; nothing reads it).
    The last prompt position predicts every completion's first token; token ``j > 0`` is predicted at
    the completion's position ``j - 1``. Only the real completion tokens' logits are gathered.
    With ``split_attention`` (see `split_attention_supported`) the attention layers compute only those
    blocks (`_split_attention`) instead of the masked full block; same values.
    With ``head`` (:func:`trainer.rl.head_logprobs.lm_head_of` of ``model``) the forward computes no logits:
    the hidden states at the predicting positions go through the lm-head in chunks (`completion_logprobs`'
    ``fused_head``).
    """
    n_rows, length = input_ids.shape
    G = group_size
    device = input_ids.device
    prompt_region = length - t
    comp_lens = attention_mask[:, prompt_region:].long().sum(1).tolist()
    if min(comp_lens) < 1:
        raise ValueError("every completion needs at least one token for the shared-prompt forward")
    prompt_cols = [
        attention_mask[r, :prompt_region].nonzero().flatten().tolist() for r in range(0, n_rows, G)
    ]
    inner = unwrap_model(model)
    dtype = next(inner.parameters()).dtype
    min_value = torch.finfo(dtype).min
    sdpa = inner.config._attn_implementation == "sdpa"
    flat_ids = input_ids.reshape(-1)
    out: Tensor | None = None

    def forward(pred: list[int], targets: Tensor, width: int, keep: int, **inputs: Any) -> Tensor:
        """Log-probs of ``targets`` predicted at the flattened positions ``pred`` ([B * width])."""
        if head is not None:
            rows = torch.tensor(pred, device=device)
            return hidden_token_logprobs(model, head, rows, targets, temperature, **inputs)
        logits = _logits_of(model(**inputs, logits_to_keep=keep, use_cache=False))
        if logits.shape[1] != keep:
            raise ValueError(
                f"model returned logits for {logits.shape[1]} positions, asked for logits_to_keep={keep}"
            )
        # Rows of the kept logits: position q of row r is r * keep + q - (width - keep).
        flat = torch.tensor([p // width * keep + p % width - (width - keep) for p in pred], device=device)
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, flat)  # backward: one index_add
        return token_logprobs(picked, targets, temperature, chunk_rows=chunk_rows)  # [tokens]

    for g0 in range(0, n_rows // G, groups_per_forward):
        g1 = min(n_rows // G, g0 + groups_per_forward)
        # Index lists in plain Python (a few thousand ints), then one tensor op each.
        sources, slots, positions = [], [], []
        pred_row, pred_pos, out_row, out_col = [], [], [], []  # one entry per completion token
        for k, g in enumerate(range(g0, g1)):
            r0 = g * G
            cols = prompt_cols[g]
            n_prompt = len(cols)
            src = [r0 * length + col for col in cols]
            slot, pos, offset = [-1] * n_prompt, list(range(n_prompt)), n_prompt
            for i in range(G):
                n_i = comp_lens[r0 + i]
                start = (r0 + i) * length + prompt_region
                src += range(start, start + n_i)
                slot += [i] * n_i
                pos += range(n_prompt, n_prompt + n_i)
                # Token j is predicted at the last prompt position (j = 0) or at its own position j - 1.
                pred_pos += [n_prompt - 1, *range(offset, offset + n_i - 1)]
                pred_row += [k] * n_i
                out_row += [r0 + i] * n_i
                out_col += range(n_i)
                offset += n_i
            sources.append(src)
            slots.append(slot)
            positions.append(pos)
        width = max(len(x) for x in sources)
        pad = [width - len(x) for x in sources]
        ids = flat_ids[
            torch.tensor([x + [x[-1]] * k for x, k in zip(sources, pad, strict=True)], device=device)
        ]
        pos = torch.tensor([x + [0] * k for x, k in zip(positions, pad, strict=True)], device=device)
        first_kept = min(len(prompt_cols[g]) for g in range(g0, g1)) - 1  # earliest last-prompt position
        keep = width - first_kept
        rows_t = torch.tensor(out_row, device=device)
        cols_t = torch.tensor(out_col, device=device)
        targets = input_ids[rows_t, prompt_region + cols_t]
        pred = [r * width + q for r, q in zip(pred_row, pred_pos, strict=True)]
        inputs = {"input_ids": ids, "position_ids": pos}
        if split_attention:
            layout = _SplitLayout(
                [len(prompt_cols[g]) for g in range(g0, g1)], comp_lens[g0 * G : g1 * G], G, width, device
            )
            # A 4-D mask is passed through as is; the attention layers compute only the needed blocks.
            placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
            with _split_attention_forward(inner, layout):
                values = forward(pred, targets, width, keep, attention_mask=placeholder, **inputs)
            if layout.calls != inner.config.num_hidden_layers:
                raise RuntimeError(
                    f"split attention ran in {layout.calls} of {inner.config.num_hidden_layers} layers"
                )
        else:
            slot = torch.tensor(
                [x + [-2] * k for x, k in zip(slots, pad, strict=True)], device=device
            )  # -2 padding
            col = torch.arange(width, device=device)
            causal = col[None, :] <= col[:, None]  # [q, k]
            key_slot, query_slot = slot[:, None, :], slot[:, :, None]
            allowed = causal[None] & ((key_slot == -1) | (key_slot == query_slot)) & (key_slot != -2)
            allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]  # no query row may be empty
            if sdpa:  # a boolean mask goes to the kernel as is
                mask = allowed[:, None]
            else:
                mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
                    ~allowed, min_value
                )[:, None]
            values = forward(pred, targets, width, keep, attention_mask=mask, **inputs)
        if out is None:
            out = values.new_zeros(n_rows, t)
        out = out.index_put((rows_t, cols_t), values)  # out of place: autograd keeps every chunk's values
    assert out is not None
    return out
