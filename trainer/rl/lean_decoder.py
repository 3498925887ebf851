"""The lean decoder: a hand-written Llama / Qwen2 decode step behind :func:`trainer.rl.sampling.sample_groups`.

It reads the HF module's parameters (fused q/k/v and gate/up copies are made once per call) and keeps
preallocated static KV caches, in the shared-prefix or expanded layout described in
:mod:`trainer.rl.sampling`; its output equals the model's own forward up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.rl.sampling import _Decoder, _left_pad

# (see _prefer_shared_prefix).
_SHARED_PREFIX_MIN_SAVED_BYTES_CPU = 5 << 20
_SHARED_PREFIX_MIN_SAVED_BYTES = 128 << 20
# Per-row K/V caches on CPU are stored in chunks of this many positions ([chunks, rows, KV, chunk, hd]), so
# that each complete chunk is one contiguous block across all rows: the attention then streams it instead
# of reading a short run per (row, kv head) out of a wide buffer, which wastes memory bandwidth. The
# chunk being filled lives in a position-major staging buffer ([chunk, rows, KV, hd]) so that each step's
# new K/V is one contiguous write (scattered small writes into the cache are costly), and is copied into the
# cache once complete. Elsewhere the cache is one chunk written in place (fewer kernel launches).
# Measurements: docs/log.md.
_KV_CHUNK_CPU = 32


# --------------------------------------------------------------------------------------------------------
# Lean decoder for Llama / Qwen2
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm weight over each q head (times 1/sqrt(hd)); else None
    k_norm: torch.Tensor | None  # Qwen3: RMSNorm weight over each k head
    ln_in: torch.Tensor | None  # None where folded into w_qkv
    ln_post: torch.Tensor | None  # None where folded into w_gate_up
    w_qkv: torch.Tensor  # fused q/k/v; q rows scaled by 1/sqrt(hd), input columns maybe by ln_in
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    w_gate_up: torch.Tensor  # fused gate/up; input columns maybe scaled by ln_post
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None


def _cat_bias(*linears: nn.Linear, scales: Sequence[float]) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    parts = []
    for lin, scale in zip(linears, scales, strict=True):
        b = lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
        parts.append(b * scale if scale != 1.0 else b)
    return torch.cat(parts)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # LlamaRMSNorm / Qwen2RMSNorm arithmetic: normalise in float32, scale in the model dtype. ``weight`` is
    # None where it was folded into the next matmul's weights (diag(w) @ W: equal up to rounding).
    if x.dtype == torch.float32 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one call; same arithmetic in float32
    xf = x.float()
    xf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return xf if weight is None else weight * xf


def _prefer_shared_prefix(
    device: torch.device, num_prompts: int, num_generations: int, prompt_width: int, kv_bytes_per_token: int
) -> bool:
    """Cache layout choice: share the prompt's K/V across a group or copy it into each of the G rows.

    Sharing saves reading (G - 1) copies of the prompt's K/V per layer and step but costs about ten more
    small ops per layer and step, so it pays only above a number of bytes saved per layer-step: measured on
    CPU with `bench/rollout.py --compare-layouts` (docs/log.md); on GPUs the extra kernel launches cost
    more relative to memory traffic, so the threshold there is set higher (an estimate: ~10 launches of
    ~5 us against HBM at ~2-3 TB/s).
    """
    if num_generations < 2:
        return False
    saved = num_prompts * (num_generations - 1) * prompt_width * kv_bytes_per_token
    return saved >= (
        _SHARED_PREFIX_MIN_SAVED_BYTES_CPU if device.type == "cpu" else _SHARED_PREFIX_MIN_SAVED_BYTES
    )


class _LeanDecoder(_Decoder):
    """Static-cache decode for Llama/Qwen2 reading the HF module's parameters (see the module docstring).

    Two cache layouts:
    * expanded: one cache per row, [rows, KV, P + T - 1, hd]; the prompt's K/V is copied to the G rows of
      its group once after prefill. Attention is one SDPA call on CPU, else baddbmm + softmax + bmm.
    * shared: the prompt's K/V stays [groups, KV, P, hd]; each row has its own [rows, KV, T - 1, hd].
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        num_generations: int,
        max_new_tokens: int,
        *,
        share_prefix: bool | None,
        transpose_weights: bool | None = None,
    ) -> None:
        cfg = model.config
        base = model.model
        self.prompts = prompts
        self.embed = base.embed_tokens.weight
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.num_heads = cfg.num_attention_heads
        self.num_kv = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.n_rep = self.num_heads // self.num_kv
        self.eps = float(cfg.rms_norm_eps)
        self.G = num_generations
        self.T = max_new_tokens
        self.P = max(len(p) for p in prompts)
        if share_prefix is None:
            kv_bytes = 2 * self.num_kv * self.head_dim * self.embed.element_size()
            share_prefix = _prefer_shared_prefix(self.device, len(prompts), num_generations, self.P, kv_bytes)
        self.shared = bool(share_prefix) and num_generations > 1

        # On CPU, torch.mm with a [in, out] weight is faster than F.linear with [out, in] for these
        # skinny shapes (docs/log.md), so the weights are copied transposed (a few MB per call for the models trained
        # on CPU). Elsewhere the HF weights are used as they are, except the fused q/k/v and gate/up.
        self.transposed = self.device.type == "cpu" if transpose_weights is None else transpose_weights

        def prep(weight: torch.Tensor) -> torch.Tensor:
            return weight.t().contiguous() if self.transposed else weight

        # Folded into the fused copies: 1/sqrt(head_dim) into q (RoPE is linear, so it commutes) and, in
        # float32, the RMSNorm weights into the input columns of the matmul after each norm. In 16-bit
        # dtypes w * W would add a rounding HF does not have, so the norms keep their own multiply there.
        scale = self.head_dim**-0.5
        fold = self.dtype == torch.float32
        # Qwen3 normalises q and k per head before RoPE: the scale goes into the q norm's weight instead
        # (a norm would undo it on the q rows).
        head_norms = hasattr(base.layers[0].self_attn, "q_norm") if len(base.layers) else False
        q_scale = 1.0 if head_norms else scale

        def norm_cols(weight: torch.Tensor, norm: nn.Module) -> torch.Tensor:
            return weight * norm.weight[None, :] if fold else weight

        self.layers: list[_Layer] = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            w_qkv = torch.cat([attn.q_proj.weight * q_scale, attn.k_proj.weight, attn.v_proj.weight])
            w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self.layers.append(
                _Layer(
                    q_norm=attn.q_norm.weight * scale if head_norms else None,
                    k_norm=attn.k_norm.weight if head_norms else None,
                    ln_in=None if fold else layer.input_layernorm.weight,
                    ln_post=None if fold else layer.post_attention_layernorm.weight,
                    w_qkv=prep(norm_cols(w_qkv, layer.input_layernorm)),
                    b_qkv=_cat_bias(attn.q_proj, attn.k_proj, attn.v_proj, scales=(q_scale, 1.0, 1.0)),
                    w_o=prep(attn.o_proj.weight),
                    b_o=attn.o_proj.bias,
                    w_gate_up=prep(norm_cols(w_gate_up, layer.post_attention_layernorm)),
                    b_gate_up=_cat_bias(mlp.gate_proj, mlp.up_proj, scales=(1.0, 1.0)),
                    w_down=prep(mlp.down_proj.weight),
                    b_down=mlp.down_proj.bias,
                )
            )
        self.intermediate = mlp.gate_proj.weight.shape[0] if self.layers else 0
        # lm_head is the embedding matrix itself when tied; fold the final norm only where it is copied.
        if self.transposed and fold:
            self.final_norm, self.lm_w = None, prep(norm_cols(model.lm_head.weight, base.norm))
        else:
            self.final_norm, self.lm_w = base.norm.weight, prep(model.lm_head.weight)
        self.lm_b = getattr(model.lm_head, "bias", None)

        # RoPE tables for every position this call can reach, from the model's own rotary module.
        cos, sin = self._rope_tables(model, self.P + max_new_tokens)
        half = self.head_dim // 2
        self.cos = cos
        # rotate_half(x) * sin == roll(x, half) * sin_signed, with the first half of sin negated.
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    # ----- building blocks -----------------------------------------------------------------------------
    def _rope_tables(self, model: nn.Module, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = getattr(model.model, "rotary_emb", None)
        positions = torch.arange(max_pos, device=self.device)[None, :]
        if rotary is not None:
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = rotary(probe, positions)
            return cos[0].to(self.dtype), sin[0].to(self.dtype)
        # transformers without a model-level rotary module: the default rope from the config.
        theta = float(getattr(model.config, "rope_theta", 10000.0))
        idx = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=self.device).float()
        inv_freq = 1.0 / (theta ** (idx / self.head_dim))
        freqs = positions[0].float()[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _head_norms(self, qk: torch.Tensor, L: _Layer) -> torch.Tensor:
        """Qwen3's per-head RMSNorm of q and k ([..., H + KV, hd]); identity for the other families."""
        if L.q_norm is None:
            return qk
        H = self.num_heads
        return torch.cat(
            [_rms_norm(qk[..., :H, :], L.q_norm, self.eps), _rms_norm(qk[..., H:, :], L.k_norm, self.eps)],
            dim=-2,
        )

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        return (x * cos).addcmul_(torch.roll(x, self.head_dim // 2, dims=-1), sin_signed)

    def _lin(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, w, b)
        if x.dim() == 2:
            return torch.mm(x, w) if b is None else torch.addmm(b, x, w)
        y = torch.matmul(x, w)
        return y if b is None else y + b

    def _lin_residual(self, res: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
        """res + linear(x): one addmm on CPU."""
        if self.transposed and x.dim() == 2:
            y = torch.addmm(res, x, w)
            return y if b is None else y.add_(b)
        return res + self._lin(x, w, b)

    def _mlp_residual(self, x: torch.Tensor, L: _Layer) -> torch.Tensor:
        gate_up = self._lin(_rms_norm(x, L.ln_post, self.eps), L.w_gate_up, L.b_gate_up)
        act = F.silu(gate_up[..., : self.intermediate]).mul_(gate_up[..., self.intermediate :])
        return self._lin_residual(x, act, L.w_down, L.b_down)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self._lin(_rms_norm(x, self.final_norm, self.eps), self.lm_w, self.lm_b).float()

    # ----- prefill -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        ids, plen = _left_pad(self.prompts, 0, self.device)  # pad id is irrelevant: masked everywhere
        B, P = ids.shape
        H, KV, hd, G = self.num_heads, self.num_kv, self.head_dim, self.G
        n_pad = P - plen
        col = torch.arange(P, device=self.device)
        pos = (col[None, :] - n_pad[:, None]).clamp(min=0)  # 0 at each prompt's first real token
        valid = col[None, :] >= n_pad[:, None]  # [B, P] real (non-pad) key positions
        causal = col[None, :] <= col[:, None]
        # Pad query rows may attend to themselves only (keeps them finite; nothing reads them).
        diagonal = torch.eye(P, dtype=torch.bool, device=self.device)
        allowed = (causal[None] & valid[:, None, :]) | diagonal[None]
        allowed = allowed[:, None]  # [B, 1, P, P]
        cos, sin = self.cos[pos][:, :, None, :], self.sin_signed[pos][:, :, None, :]  # [B, P, 1, hd]

        prompt_k: list[torch.Tensor] = []
        prompt_v: list[torch.Tensor] = []
        x = F.embedding(ids, self.embed)
        for L in self.layers:
            qkv = self._lin(_rms_norm(x, L.ln_in, self.eps), L.w_qkv, L.b_qkv)
            qk = self._rope(self._head_norms(qkv[..., : (H + KV) * hd].view(B, P, H + KV, hd), L), cos, sin)
            q = qk[:, :, :H].transpose(1, 2)  # [B, H, P, hd], already scaled by 1/sqrt(hd)
            k = qk[:, :, H:].transpose(1, 2).contiguous()  # [B, KV, P, hd]
            v = qkv[..., (H + KV) * hd :].view(B, P, KV, hd).transpose(1, 2).contiguous()
            prompt_k.append(k)
            prompt_v.append(v)
            k_rep = k.repeat_interleave(self.n_rep, dim=1) if self.n_rep > 1 else k
            v_rep = v.repeat_interleave(self.n_rep, dim=1) if self.n_rep > 1 else v
            o = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=allowed, scale=1.0)
            x = self._lin_residual(x, o.transpose(1, 2).reshape(B, P, H * hd), L.w_o, L.b_o)
            x = self._mlp_residual(x, L)
        logits = self._head(x[:, -1])

        # Decode state. Rows are (prompt, sample) in prompt-major order.
        n_rows = B * G
        self.row_pos = plen.repeat_interleave(G)  # position of completion token 0 of each row
        key_bias = torch.zeros(B, 1, 1, P, dtype=self.dtype, device=self.device)
        key_bias.masked_fill_(~valid[:, None, None, :], float("-inf"))
        if self.shared:
            # A group owns G consecutive "slots" of the prefix-attention batch; `slots` maps decode rows
            # to slots (identity until rows are dropped).
            self.prefix_k, self.prefix_v = prompt_k, prompt_v
            self.prefix_bias = key_bias.expand(B, KV, 1, P).reshape(B * KV, 1, P)
            self.num_groups = B
            self.slots = torch.arange(n_rows, device=self.device)
            self.slots_are_rows = True
            self.base_col, width = 0, max(self.T - 1, 1)
        else:
            self.base_col, width = P, P + max(self.T - 1, 0)
            bias = torch.zeros(n_rows, 1, 1, width, dtype=self.dtype, device=self.device)
            bias[:, :, :, :P] = key_bias.repeat_interleave(G, dim=0)
        self.width = width
        # Expanded on CPU: one SDPA call per layer and step over a contiguous per-row cache (see
        # `_LeanDecoder`), with the key bias as [rows, 1, 1, width]; elsewhere [rows * KV, 1, width].
        self.fused = not self.shared and self.device.type == "cpu"
        if self.fused:
            self.bias4 = bias
        elif not self.shared:
            self.bias = bias.expand(n_rows, KV, 1, width).reshape(n_rows * KV, 1, width)
        self.staged = self.device.type == "cpu" and not self.fused
        C = self.chunk = _KV_CHUNK_CPU if self.staged else width
        shape = (-(-width // C), n_rows, KV, C, hd)
        self.cache_k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.cache_v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        stage_shape = (C if self.staged else 0, n_rows, KV, hd)  # only used on CPU
        self.stage_k = [torch.empty(stage_shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.stage_v = [torch.empty(stage_shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        if not self.shared:  # the prompt's K/V, copied once into each of its G rows
            c0, j0 = divmod(P, C)  # the chunk the first completion token goes to, and its position there
            for cache, stage, src in (
                (self.cache_k, self.stage_k, prompt_k),
                (self.cache_v, self.stage_v, prompt_v),
            ):
                for buf, st, part in zip(cache, stage, src, strict=True):
                    for c in range(-(-P // C)):
                        lo, hi = c * C, min(P, (c + 1) * C)
                        buf[c].view(B, G, KV, C, hd)[:, :, :, : hi - lo] = part[:, None, :, lo:hi]
                    if self.staged and j0:
                        st[:j0] = buf[c0, :, :, :j0].permute(2, 0, 1, 3)
        self.filled = self.base_col
        self._chunk_views()
        return logits

    def _chunk_views(self) -> None:
        """Per layer and chunk: the 4-D chunk (for writes), K^T and V as batched matrices (for reads)."""
        hd, C = self.head_dim, self.chunk
        self.k4 = [[buf[i] for i in range(buf.shape[0])] for buf in self.cache_k]
        self.v4 = [[buf[i] for i in range(buf.shape[0])] for buf in self.cache_v]
        self.kT = [[c.view(-1, C, hd).transpose(1, 2) for c in chunks] for chunks in self.k4]
        self.v3 = [[c.view(-1, C, hd) for c in chunks] for chunks in self.v4]

    # ----- decode ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        R = tokens.shape[0]
        H, KV, hd = self.num_heads, self.num_kv, self.head_dim
        pos = self.row_pos + t
        cos, sin = self.cos[pos][:, None, :], self.sin_signed[pos][:, None, :]  # [R, 1, hd]
        col = self.base_col + t
        # Column col goes to position j of chunk c; the attention reads chunks 0..c, the last one up to j.
        c, j = divmod(col, self.chunk)
        full = j + 1 == self.chunk
        x = F.embedding(tokens, self.embed)
        for li, L in enumerate(self.layers):
            qkv = self._lin(_rms_norm(x, L.ln_in, self.eps), L.w_qkv, L.b_qkv)
            qk = self._rope(self._head_norms(qkv[:, : (H + KV) * hd].view(R, H + KV, hd), L), cos, sin)
            k_new, v_new = qk[:, H:], qkv[:, (H + KV) * hd :].view(R, KV, hd)
            if self.fused:
                o = self._attend_fused(qk[:, :H].view(R, KV, self.n_rep, hd), k_new, v_new, li, col)
            else:
                if self.staged:  # chunk c is in the staging buffer, position-major
                    sk, sv = self.stage_k[li], self.stage_v[li]
                    sk[j].copy_(k_new)
                    sv[j].copy_(v_new)
                    kT = [*self.kT[li][:c], sk[: j + 1].view(j + 1, R * KV, hd).permute(1, 2, 0)]
                    v = [*self.v3[li][:c], sv[: j + 1].view(j + 1, R * KV, hd).transpose(0, 1)]
                else:
                    self.k4[li][c].select(2, j).copy_(k_new)
                    self.v4[li][c].select(2, j).copy_(v_new)
                    kT, v = self.kT[li][: c + 1], self.v3[li][: c + 1]
                    if not full:
                        kT[c], v[c] = kT[c][:, :, : j + 1], v[c][:, : j + 1]
                q = qk[:, :H].reshape(R * KV, self.n_rep, hd)
                o = self._attend_shared(q, kT, v, li) if self.shared else self._attend_expanded(q, kT, v, col)
                if self.staged and full:  # chunk c is complete: into the cache
                    self.k4[li][c].copy_(sk.permute(1, 2, 0, 3))
                    self.v4[li][c].copy_(sv.permute(1, 2, 0, 3))
            x = self._lin_residual(x, o.reshape(R, H * hd), L.w_o, L.b_o)
            x = self._mlp_residual(x, L)
        self.filled = col + 1
        return self._head(x)

    def _attend_fused(
        self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, li: int, col: int
    ) -> torch.Tensor:
        """One SDPA call over the contiguous per-row cache; q [R, KV, n_rep, hd] (pre-scaled): the n_rep query
        heads of a KV head are its "query positions", so K/V are not repeated."""
        cache_k, cache_v = self.k4[li][0], self.v4[li][0]
        cache_k.select(2, col).copy_(k_new)
        cache_v.select(2, col).copy_(v_new)
        return F.scaled_dot_product_attention(
            q,
            cache_k[:, :, : col + 1],
            cache_v[:, :, : col + 1],
            attn_mask=self.bias4[..., : col + 1],
            scale=1.0,
        )

    # q [R*KV, n_rep, hd] (GQA: the n_rep query heads of a kv head share one matmul); kT/v: the cache's
    # chunks in order, K^T [R*KV, hd, w] and V [R*KV, w, hd] (w <= chunk).
    def _attend_expanded(
        self, q: torch.Tensor, kT: list[torch.Tensor], v: list[torch.Tensor], col: int
    ) -> torch.Tensor:
        C, P = self.chunk, self.P
        parts = [
            torch.baddbmm(self.bias[:, :, c * C : c * C + k.shape[2]], q, k) if c * C < P else torch.bmm(q, k)
            for c, k in enumerate(kT)
        ]
        s = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(self.dtype)
        return self._own_values(None, p, v)

    def _attend_shared(
        self, q: torch.Tensor, kT: list[torch.Tensor], v: list[torch.Tensor], li: int
    ) -> torch.Tensor:
        P = self.P
        s = torch.cat([self._prefix_scores(q, li), *(torch.bmm(q, k) for k in kT)], dim=-1)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(self.dtype)
        return self._own_values(self._prefix_values(p[..., :P], li), p[..., P:], v)

    def _own_values(self, o: torch.Tensor | None, p: torch.Tensor, v: list[torch.Tensor]) -> torch.Tensor:
        """o + p @ cat(v) one chunk at a time (p [R*KV, n_rep, sum of widths])."""
        start = 0
        for vv in v:
            w = vv.shape[1]
            pc = p[..., start : start + w]
            o = torch.bmm(pc, vv) if o is None else o.baddbmm_(pc, vv)
            start += w
        return o

    def _to_slots(self, x: torch.Tensor) -> torch.Tensor:
        """[R*KV, ...] per decode row -> [slots, KV, ...] (zeros in the slots of dropped rows)."""
        x = x.reshape(-1, self.num_kv, *x.shape[1:])
        if self.slots_are_rows:
            return x
        out = x.new_zeros((self.num_groups * self.G, *x.shape[1:]))
        return out.index_copy_(0, self.slots, x)

    def _from_slots(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.slots_are_rows else x.index_select(0, self.slots)
        return x.reshape(-1, *x.shape[2:])

    def _group_major(self, x: torch.Tensor) -> torch.Tensor:
        """[slots, KV, n_rep, m] -> [groups*KV, G*n_rep, m]: one matmul per (group, kv head)."""
        ng, G, KV, n_rep, m = self.num_groups, self.G, self.num_kv, self.n_rep, x.shape[-1]
        return x.reshape(ng, G, KV, n_rep, m).transpose(1, 2).reshape(ng * KV, G * n_rep, m)

    def _slot_major(self, x: torch.Tensor) -> torch.Tensor:
        ng, G, KV, n_rep, m = self.num_groups, self.G, self.num_kv, self.n_rep, x.shape[-1]
        return x.view(ng, KV, G, n_rep, m).transpose(1, 2).reshape(ng * G, KV, n_rep, m)

    def _prefix_scores(self, q: torch.Tensor, li: int) -> torch.Tensor:
        k = self.prefix_k[li].view(-1, self.P, self.head_dim)  # [groups*KV, P, hd]
        s = torch.baddbmm(self.prefix_bias, self._group_major(self._to_slots(q)), k.transpose(1, 2))
        return self._from_slots(self._slot_major(s))  # [R*KV, n_rep, P]

    def _prefix_values(self, p: torch.Tensor, li: int) -> torch.Tensor:
        v = self.prefix_v[li].view(-1, self.P, self.head_dim)
        o = torch.bmm(self._group_major(self._to_slots(p)), v)
        return self._from_slots(self._slot_major(o))  # [R*KV, n_rep, hd]

    @torch.no_grad()
    def compact(self, keep: torch.Tensor) -> bool:
        n, KV = keep.numel(), self.num_kv
        chunks, staged = divmod(self.filled, self.chunk)  # complete chunks, positions in the staging buffer
        for cache, stage in ((self.cache_k, self.stage_k), (self.cache_v, self.stage_v)):
            for li, (buf, st) in enumerate(zip(cache, stage, strict=True)):
                # Gather the filled part (a temporary), then write it into the front rows in place.
                if self.staged:
                    buf[:chunks, :n] = buf[:chunks, keep]
                    st[:staged, :n] = st[:staged, keep]
                    stage[li] = st[:, :n]
                else:  # one chunk of `width` positions, filled up to `filled`
                    buf[0, :n, :, : self.filled] = buf[0, keep, :, : self.filled]
                cache[li] = buf[:, :n]
        self._chunk_views()
        self.row_pos = self.row_pos[keep]
        if self.fused:
            self.bias4 = self.bias4.index_select(0, keep)
            return True
        if not self.shared:
            self.bias = (
                self.bias.view(-1, KV, 1, self.width).index_select(0, keep).view(n * KV, 1, self.width)
            )
            return True
        slots = self.slots[keep]
        groups = torch.div(slots, self.G, rounding_mode="floor")
        live = torch.unique(groups)  # sorted
        if live.numel() < self.num_groups:  # whole groups finished: drop their prompt cache too
            self.prefix_k = [k.index_select(0, live) for k in self.prefix_k]
            self.prefix_v = [v.index_select(0, live) for v in self.prefix_v]
            bias = self.prefix_bias.view(self.num_groups, KV, 1, self.P).index_select(0, live)
            self.prefix_bias = bias.view(-1, 1, self.P)
            slots = torch.searchsorted(live, groups) * self.G + slots % self.G
            self.num_groups = live.numel()
        self.slots = slots
        self.slots_are_rows = n == self.num_groups * self.G
        return True
