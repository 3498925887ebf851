"""Rollout throughput: HF ``generate`` vs ``trainer.rl.sampling.sample_groups`` vs the CPU FLOP bound.

    python bench/rollout.py --prompts 16 --generations 8 --prompt-len 64 --new-tokens 128 --threads 2

Every method generates exactly ``--new-tokens`` tokens per sample (no EOS: HF ``generate`` gets
``eos_token_id=None``, ``sample_groups`` an empty EOS list), for the same prompts, on the same tiny random
Llama, in the same process. The bound is the measured dense-matmul rate ([B*G, hidden] x [hidden,
4*hidden]) divided by the matmul FLOPs of one token (2 * non-embedding params + 2 * hidden * vocab);
attention over the cache is not counted, so the bound is optimistic for long sequences.

``--tokenizer DIR`` (a tokenizer folder, e.g. ``python -m tests.support.real_tokenizers qwen3``) sizes the
model's vocabulary to it and also times ``sample_groups`` checking the ``</answer>`` stop string on the
decoded text at every step (random tokens never complete it, so every method still generates the same
tokens): the cost of the stop-string check against the same sampler without it, in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.rl.sampling import sample_groups


@dataclass(frozen=True)
class BenchConfig:
    prompts: int
    generations: int
    prompt_len: int
    new_tokens: int
    threads: int
    repeats: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seed: int
    skip_generate: bool
    compare_layouts: bool
    tokenizer: str | None = None


def _positive(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--prompts", type=_positive("--prompts"), default=16, help="B: prompts per call (trainer default)"
    )
    p.add_argument("--generations", type=_positive("--generations"), default=8, help="G: samples per prompt")
    p.add_argument("--prompt-len", type=_positive("--prompt-len"), default=64)
    p.add_argument("--new-tokens", type=_positive("--new-tokens"), default=128)
    p.add_argument("--threads", type=_positive("--threads"), default=torch.get_num_threads())
    p.add_argument(
        "--repeats", type=_positive("--repeats"), default=3, help="timed rounds (each runs every method)"
    )
    p.add_argument("--hidden", type=_positive("--hidden"), default=256)
    p.add_argument("--layers", type=_positive("--layers"), default=4)
    p.add_argument("--heads", type=_positive("--heads"), default=4)
    p.add_argument("--kv-heads", type=_positive("--kv-heads"), default=2)
    p.add_argument("--intermediate", type=_positive("--intermediate"), default=688)
    p.add_argument("--vocab", type=_positive("--vocab"), default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-generate", action="store_true", help="do not time HF generate (slow)")
    p.add_argument(
        "--compare-layouts",
        action="store_true",
        help="also time sample_groups with the prompt cache copied G times",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder: time the </answer> stop-string check")
    a = p.parse_args(argv)
    if a.hidden % a.heads or a.heads % a.kv_heads:
        p.error(f"--hidden ({a.hidden}) must divide by --heads ({a.heads}), which must divide by --kv-heads")
    return BenchConfig(
        prompts=a.prompts,
        generations=a.generations,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        threads=a.threads,
        repeats=a.repeats,
        hidden=a.hidden,
        layers=a.layers,
        heads=a.heads,
        kv_heads=a.kv_heads,
        intermediate=a.intermediate,
        vocab=a.vocab,
        seed=a.seed,
        skip_generate=a.skip_generate,
        compare_layouts=a.compare_layouts,
        tokenizer=a.tokenizer,
    )


def generate_exactly(model, prompts: torch.Tensor, G: int, N: int) -> int:
    """`model.generate` sampling G completions of exactly N tokens per prompt (no EOS, temperature 1,
    full distribution): the baseline; returns the number of tokens generated (B * G * N)."""
    out = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        num_return_sequences=G,
        max_new_tokens=N,
        min_new_tokens=N,
        eos_token_id=None,
        pad_token_id=0,
    )
    return (out.shape[1] - prompts.shape[1]) * out.shape[0]


def sample_exactly(model, prompts: torch.Tensor, G: int, N: int, generator: torch.Generator, **options):
    """`sample_groups` under the same conditions as :func:`generate_exactly` (no EOS: B * G * N tokens)."""
    return sample_groups(
        model,
        prompts.tolist(),
        num_generations=G,
        max_new_tokens=N,
        temperature=1.0,
        eos_token_ids=[],
        pad_token_id=0,
        generator=generator,
        **options,
    )


def build_model(cfg: BenchConfig) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.prompt_len + cfg.new_tokens + 8,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def matmul_gflops(rows: int, hidden: int, repeats: int = 5) -> float:
    """Best-of measured rate of a [rows, hidden] x [hidden, 4*hidden] float32 matmul."""
    a, b = torch.randn(rows, hidden), torch.randn(hidden, 4 * hidden)
    flops = 2.0 * rows * hidden * 4 * hidden
    iters = max(10, int(2e9 / flops))  # ~2 GFLOP per measurement
    best = 0.0
    for _ in range(repeats):
        torch.matmul(a, b)
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        best = max(best, flops * iters / (time.perf_counter() - start) / 1e9)
    return best


@dataclass
class Method:
    name: str
    run: Callable[[], int]  # returns the number of generated tokens
    seconds: list[float]


def run_rounds(methods: list[Method], cfg: BenchConfig, expected: int) -> list[float]:
    """Interleave the methods and the matmul probe round by round, so that load from other processes on
    the machine hits all of them alike; returns the matmul GFLOP/s of every round."""
    rows = cfg.prompts * cfg.generations
    for m in methods:  # warm-up (allocator, kernel selection)
        m.run()
    gflops = []
    for _ in range(cfg.repeats):
        gflops.append(matmul_gflops(rows, cfg.hidden))
        for m in methods:
            start = time.perf_counter()
            tokens = m.run()
            m.seconds.append(time.perf_counter() - start)
            if tokens != expected:
                raise RuntimeError(f"{m.name} produced {tokens} tokens, expected {expected}")
    return gflops


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    tokenizer = None
    if cfg.tokenizer is not None:
        import dataclasses

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        cfg = dataclasses.replace(cfg, vocab=len(tokenizer))
    torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    B, G, P, N = cfg.prompts, cfg.generations, cfg.prompt_len, cfg.new_tokens
    prompts = torch.randint(3, cfg.vocab, (B, P), generator=torch.Generator().manual_seed(cfg.seed + 1))
    expected = B * G * N

    embed_params = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    non_embed = sum(p.numel() for p in model.parameters()) - embed_params
    flops_per_token = 2 * non_embed + 2 * cfg.hidden * cfg.vocab

    def run_generate() -> int:
        return generate_exactly(model, prompts, G, N)

    def run_sampler(share_prefix: bool | None) -> int:
        generator = torch.Generator().manual_seed(cfg.seed + 2)
        return sample_exactly(model, prompts, G, N, generator, share_prefix=share_prefix).num_generated_tokens

    methods = [] if cfg.skip_generate else [Method("HF generate", run_generate, [])]
    methods.append(Method("sample_groups", lambda: run_sampler(None), []))
    if tokenizer is not None:
        from trainer.r1.format import STOP_STRINGS
        from trainer.rl.stopping import StopStrings

        stops = StopStrings.for_tokenizer(tokenizer, STOP_STRINGS)

        def run_with_stops() -> int:
            generator = torch.Generator().manual_seed(cfg.seed + 2)
            return sample_exactly(model, prompts, G, N, generator, stop_strings=stops).num_generated_tokens

        methods.append(Method("sample_groups + </answer> stop-string check", run_with_stops, []))
    if cfg.compare_layouts:
        methods.append(Method("sample_groups, prompt cache copied G times", lambda: run_sampler(False), []))
        methods.append(Method("sample_groups, prompt cache shared", lambda: run_sampler(True), []))
    gflops = run_rounds(methods, cfg, expected)

    print(
        f"model: hidden {cfg.hidden}, layers {cfg.layers}, heads {cfg.heads}/{cfg.kv_heads} kv, "
        f"intermediate {cfg.intermediate}, vocab {cfg.vocab}; {non_embed / 1e6:.2f}M non-embedding params, "
        f"{flops_per_token / 1e6:.2f} MFLOP/token"
    )
    print(
        f"batch: {B} prompts x {G} generations, prompt {P} tokens, {N} new tokens ({expected} per run); "
        f"threads {cfg.threads}; {cfg.repeats} interleaved rounds"
    )
    print(
        f"matmul [{B * G}, {cfg.hidden}] x [{cfg.hidden}, {4 * cfg.hidden}]: best {max(gflops):.1f}, "
        f"median {statistics.median(gflops):.1f} GFLOP/s"
    )
    print()
    for label, pick_time, pick_gflops in (
        ("best run (least disturbed by other load)", min, max),
        ("median run", statistics.median, statistics.median),
    ):
        bound = pick_gflops(gflops) * 1e9 / flops_per_token
        rates = [(m.name, expected / pick_time(m.seconds)) for m in methods]
        rates.append(("CPU FLOP bound", bound))
        base = None if cfg.skip_generate else rates[0][1]
        width = max(len(name) for name, _ in rates)
        print(f"{label}:")
        print(f"  {'method':<{width}}  {'tokens/s':>10}  {'x generate':>10}  {'% of bound':>10}")
        for name, rate in rates:
            ratio = f"{rate / base:10.2f}" if base else f"{'-':>10}"
            print(f"  {name:<{width}}  {rate:10,.0f}  {ratio}  {100 * rate / bound:9.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
