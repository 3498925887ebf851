"""What ends a completion: the model's end-of-sequence ids, and stop strings matched on the decoded text.

End-of-sequence ids: :func:`eos_token_ids`, the union of the tokenizer's ``eos_token_id`` and the model's
``generation_config.eos_token_id`` (a list for most released models: Qwen ends a turn with ``<|im_end|>``
and a document with ``<|endoftext|>``; Llama 3.1 ships 128001/128008/128009; Gemma 3 ``<eos>`` and
``<end_of_turn>``). Every sampler call (rollouts, evaluation, the pipeline's summary) uses it.

Stop strings: :class:`StopStrings`. A stop string such as ``</answer>`` cannot be matched as one token-id
sequence: BPE vocabularies merge it with the character before it (Qwen3, Llama 3 and Gemma 3 all have
``}</``, ``)</``, ``.</`` and `` </`` tokens), so the same text has many tokenizations. A row stops at the
first token after which its decoded text contains the string, as Hugging Face's stop strings and vLLM's
``stop`` decide; the completion keeps that whole token (and whatever text it carries after the string), so
the text the reward scores and the tokens the loss trains on are the same.

Decoding every row at every step would cost a tokenizer call per row and step, so the check is filtered on
the device first: a token can complete a stop string only if a prefix of its text is a suffix of the string
(or its text contains the string), a property of the token alone. Those *candidate* tokens are computed once
per tokenizer from the vocabulary (a few thousand at most, usually a handful); only rows whose newest token
is a candidate decode a short tail window (enough tokens to hold the string) with the tokenizer.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch

# Tokens decoded per candidate row beyond the stop string's UTF-8 length: every token that carries text
# adds at least one byte, so ``len(utf8) + 2`` tokens hold the whole string plus one token before it (a
# partial UTF-8 character or a leading space a SentencePiece decoder strips from the window's start).
_WINDOW_SLACK = 2
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Sorted union of ``tokenizer.eos_token_id`` and ``model.generation_config.eos_token_id`` (int or list;
    wrapped models are unwrapped). Empty only when neither names one."""
    ids: set[int] = set()
    ids.update(_ids(getattr(tokenizer, "eos_token_id", None)))
    if model is not None:
        from trainer.rl.logprobs import unwrap_model

        generation = getattr(unwrap_model(model), "generation_config", None)
        ids.update(_ids(getattr(generation, "eos_token_id", None)))
    return sorted(ids)


def _ids(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    raise TypeError(f"eos_token_id must be an int or a list of ints, got {value!r}")


class StopStrings:
    """Stop strings decided on the text ``tokenizer.decode(ids, skip_special_tokens=True)``.

    ``candidates`` [V] bool: tokens whose text can end a stop string (see the module docstring). ``hit``
    decides one row. Build with :meth:`for_tokenizer` (cached per tokenizer object: the vocabulary scan
    takes ~0.1-1 s for a 150k-token vocabulary).
    """

    def __init__(self, tokenizer: Any, strings: Sequence[str]):
        strings = tuple(strings)
        if not strings or any(not isinstance(s, str) or not s for s in strings):
            raise ValueError(f"stop strings must be non-empty strings, got {strings!r}")
        self.strings = strings
        self._tokenizer = tokenizer
        self.window = max(len(s.encode("utf-8")) for s in strings) + _WINDOW_SLACK
        texts = token_texts(tokenizer)
        targets = [s.encode("utf-8") for s in strings]
        flags = [text is None or any(_can_end(text, s) for s in targets) for text in texts]
        self.candidates = torch.tensor(flags, dtype=torch.bool)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, strings: Sequence[str]) -> StopStrings:
        per_tokenizer = cls._cache.setdefault(tokenizer, {})
        key = tuple(strings)
        if key not in per_tokenizer:
            per_tokenizer[key] = cls(tokenizer, key)
        return per_tokenizer[key]

    def candidates_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.candidates.to(device)
        return self._on_device[device]

    def text(self, ids: Sequence[int]) -> str:
        """The decoded text the reward sees (special tokens skipped)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def hit(self, ids: Sequence[int]) -> bool:
        """Whether the completion ``ids`` (its newest token last) contains a stop string in its last
        ``window`` tokens' text: called only where the newest token is a candidate, so a match there ends
        in the newest token (an earlier one would have stopped the row before)."""
        tail = self.text(ids[-self.window :])
        return any(s in tail for s in self.strings)


def _can_end(text: bytes, target: bytes) -> bool:
    """Whether a token with ``text`` can be the one that completes ``target`` in a decoded string: it
    contains ``target``, or one of its non-empty prefixes is a suffix of ``target``. Leading spaces are
    also tried stripped (decoders may drop them: SentencePiece at the start, clean-up before punctuation)."""
    stripped = text.lstrip(b" ")
    if not stripped or (stripped[0] not in target and target not in text):
        return False  # fast path for almost every token: its first character is not in the string
    for t in {text, stripped}:
        if target in t:
            return True
        for i in range(1, min(len(t), len(target)) + 1):
            if target.endswith(t[:i]):
                return True
    return False


def token_texts(tokenizer: Any) -> list[bytes | None]:
    """Each token id's UTF-8 bytes as it contributes them to decoded text (``b""`` for special tokens,
    which decoding skips). Read from the vocabulary for byte-level BPE (GPT-2 style: Qwen, Llama 3,
    DeepSeek-V3) and SentencePiece-style (``▁`` for a space, ``<0xNN>`` byte fallback: Gemma, Llama 2)
    decoders; for any other decoder each token is decoded on its own (slower; ``None`` where that fails,
    which makes the token a candidate)."""
    size = len(tokenizer)
    # Added tokens flagged special (reserved ones included) are skipped by decode(skip_special_tokens=True).
    decoder_table = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    special |= {int(i) for i, tok in decoder_table.items() if getattr(tok, "special", False)}
    added = {int(i): tok.content for i, tok in decoder_table.items() if int(i) not in special}
    out: list[bytes | None] = [None] * size
    mapper = _piece_mapper(tokenizer)
    if mapper is not None:
        for piece, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False).items():
            if 0 <= i < size:
                out[i] = mapper(piece)
    for i in range(size):
        if i in special:
            out[i] = b""
        elif i in added:
            out[i] = added[i].encode("utf-8")
        elif out[i] is None:
            try:
                out[i] = tokenizer.decode([i], skip_special_tokens=True).encode("utf-8")
            except Exception:  # noqa: BLE001 - an undecodable id stays a candidate (None)
                out[i] = None
    return out


def _piece_mapper(tokenizer: Any):
    """A function from a vocabulary piece to its bytes, for the two decoder families read directly."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import json

    try:
        decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
    if not decoder:
        return None
    if decoder.get("type") == "ByteLevel":
        table = {ord(c): chr(b) for c, b in _byte_level_table().items()}

        def byte_level(piece: str) -> bytes | None:
            try:
                return piece.translate(table).encode("latin-1")
            except UnicodeEncodeError:  # a character outside the byte alphabet
                return None

        return byte_level
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    kinds = [d.get("type") for d in steps]
    replaces_space = any(
        d.get("type") == "Replace"
        and d.get("pattern", {}).get("String") == "\u2581"
        and d.get("content") == " "
        for d in steps
    )
    if replaces_space and set(kinds) <= {"Replace", "ByteFallback", "Fuse", "Strip"}:

        def sentencepiece(piece: str) -> bytes:
            m = _BYTE_FALLBACK.fullmatch(piece)
            return (
                bytes([int(m.group(1), 16)])
                if m and "ByteFallback" in kinds
                else piece.replace("\u2581", " ").encode("utf-8")
            )

        return sentencepiece
    return None


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is written as -> the byte.
    Printable Latin-1 bytes stand for themselves; the others are shifted to code points from 256 up."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table
