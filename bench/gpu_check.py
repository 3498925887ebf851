"""The bf16 GPU check (issue 15): the paths users run on GPU node pools, on a tiny Qwen2-shaped model.

    python3 bench/gpu_check.py                      # on a GPU machine: zero2 and ddp, about 3-5 minutes
    python3 bench/gpu_check.py --device cpu --plugins ddp --sft_steps 2 --grpo_steps 2   # the CPU parts

1. For each `--plugins` entry: SFT then GRPO (`torchrun --nproc_per_node=1 -m trainer.sft|grpo`) with
   `--bf16`, flash-attention if `flash_attn` imports (else sdpa), `--beta 0.04`, `--num_iterations 2`;
   read back from `metrics.jsonl`: the KL at step 0 (0 when the reference model is the policy's dtype,
   attention and forward), the sampler-vs-trainer log-prob gap, the ratio of the reused rollout's second
   pass, the rollout tokens/s and peak GPU memory.
2. In this process, on the same weights in bfloat16: tokens/s of the rollout sampler (`sample_groups`)
   against `model.generate` on the same prompts (no EOS, so both make exactly prompts x G x N tokens),
   and the log-prob gap of bf16 weights measured directly, with peak GPU memory.
3. Memory (`--memory_sizes`, default 1.5b on cuda): one SFT and one GRPO step with --bf16 and
   gradient checkpointing per `--memory_plugins` (zero2, gemini) on a random-init Qwen2.5-shaped model;
   peak GPU memory and host RSS beside bench/memory.py's plan for one rank (docs/memory.md).

Prints a summary and writes it as JSON to `--out` (default: `$OUT`, when set). Exit code 0 when every
stage ran and the step-0 KL was 0, 1 otherwise. bench/README.md says how to run it on a lent GPU machine
with `bench/gpu_wheels.sh`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLUGINS = ("zero2", "ddp")
# Qwen2.5 shapes for the memory check (bench/memory.py's PLAN_SIZES has their parameter counts):
# hidden, layers, heads, KV heads, intermediate, tied embeddings.
MEMORY_SHAPES = {"0.5b": (896, 24, 14, 2, 4864, True), "1.5b": (1536, 28, 12, 2, 8960, True)}
MEMORY_BATCH = {"sft": 4, "grpo": 2}  # rows of bench/memory.py's SEQ tokens per micro-step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--plugins", nargs="+", choices=PLUGINS, default=list(PLUGINS))
    p.add_argument("--attn", choices=("flash_attention_2", "sdpa", "eager"), default=None)
    p.add_argument("--workdir", default=None, help="Stage folders (default: a temporary folder)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="Folder for gpu_check.json")
    p.add_argument("--sft_steps", type=int, default=40)
    p.add_argument("--grpo_steps", type=int, default=4, help="Even: each rollout is reused once")
    p.add_argument("--max_completion_length", type=int, default=64)
    p.add_argument("--prompts", type=int, default=16, help="Throughput: prompts per call")
    p.add_argument("--generations", type=int, default=8, help="Throughput: G")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stage_timeout", type=float, default=180.0, help="Seconds per stage run")
    p.add_argument(
        "--memory_sizes",
        nargs="*",
        choices=tuple(MEMORY_SHAPES),
        default=None,
        help="3. memory: random-init Qwen2.5-shaped models to run (default: 1.5b on cuda, none on cpu)",
    )
    p.add_argument("--memory_plugins", nargs="+", choices=("zero2", "gemini"), default=["zero2", "gemini"])
    args = p.parse_args(argv)
    for name in ("sft_steps", "grpo_steps", "max_completion_length", "prompts", "generations"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.grpo_steps % 2:
        p.error(f"--grpo_steps must be even (--num_iterations 2), got {args.grpo_steps}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.device == "cpu" and "zero2" in args.plugins:
        p.error("--plugins zero2 needs CUDA; on CPU use --plugins ddp")
    if args.device == "cpu" and args.memory_sizes:
        p.error("--memory_sizes runs zero2/gemini, which need CUDA; on CPU leave it out")
    if args.attn is None:
        flash = args.device == "cuda" and importlib.util.find_spec("flash_attn") is not None
        args.attn = "flash_attention_2" if flash else "sdpa"
    return args


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("colossalai", "flash_attn"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - reported, the stages will show what it breaks
            out[name] = f"not importable: {type(e).__name__}: {e}"[:200]
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ---------------------------------------------------------------------------------------------
# 1. The stages, as a user runs them


def stage_command(module: str, flags: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        module,
        *flags,
    ]


def sft_flags(args: argparse.Namespace, plugin: str, model: Path, out: Path) -> list[str]:
    return [
        *("--model_name_or_path", str(model), "--dataset_name", "builtin:arith", "--output_dir", str(out)),
        *("--max_steps", str(args.sft_steps), "--per_device_train_batch_size", "16"),
        *("--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--save_steps", "0"),
        *("--logging_steps", "10", "--report_to", "none", "--seed", "0"),
        *("--bf16", "--plugin", plugin, "--attn_implementation", args.attn),
    ]


def grpo_flags(args: argparse.Namespace, plugin: str, model: Path, out: Path) -> list[str]:
    return [
        *("--model_name_or_path", str(model), "--dataset_name", "builtin:arith", "--output_dir", str(out)),
        *("--max_steps", str(args.grpo_steps), "--num_iterations", "2", "--beta", "0.04"),
        *("--per_device_train_batch_size", "8", "--num_generations", "8", "--inference_batch_size", "8"),
        *("--max_completion_length", str(args.max_completion_length), "--learning_rate", "1e-5"),
        *("--save_steps", "0", "--logging_steps", "1", "--report_to", "none", "--seed", "0"),
        *("--bf16", "--plugin", plugin, "--attn_implementation", args.attn),
    ]


def run_stage(cmd: list[str], timeout: float, log: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "4")
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )
        code, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        code, output = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    log.write_text(output)
    return {"exit_code": code, "wall_s": round(time.perf_counter() - start, 1), "output_tail": output[-1500:]}


def grpo_summary(folder: Path) -> dict[str, Any]:
    """What the GRPO run logged: step-0 KL and log-prob gap (first record), the reused rollout's ratio (second)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [r for r in map(json.loads, path.read_text().splitlines()) if "reward_mean" in r]
    if not records:
        return {}
    first = records[0]
    out = {
        "kl_step0": first.get("kl"),
        **{k: first.get(k) for k in ("logprob_gap_mean", "logprob_gap_max", "logprob_gap_off_fraction")},
        "rollout_tokens_per_s": max(r.get("rollout_tokens_per_s", 0.0) for r in records),
        "gpu_memory_peak_gib": max((r.get("gpu_memory_peak_gib", 0.0) for r in records), default=0.0),
    }
    if len(records) > 1:
        out["ratio_mean_pass2"] = records[1].get("ratio_mean")
        out["clip_ratio_pass2"] = records[1].get("clip_ratio")
    return out


def run_plugin(args: argparse.Namespace, plugin: str, base: Path, work: Path) -> dict[str, Any]:
    sft_out, grpo_out = work / f"sft-{plugin}", work / f"grpo-{plugin}"
    result: dict[str, Any] = {"plugin": plugin, "attn": args.attn}
    sft = run_stage(
        stage_command("trainer.sft", sft_flags(args, plugin, base, sft_out)),
        args.stage_timeout,
        work / f"sft-{plugin}.log",
    )
    result["sft"] = sft
    if sft["exit_code"] != 0:
        return result
    grpo = run_stage(
        stage_command("trainer.grpo", grpo_flags(args, plugin, sft_out, grpo_out)),
        args.stage_timeout,
        work / f"grpo-{plugin}.log",
    )
    result["grpo"] = {**grpo, **grpo_summary(grpo_out)}
    result["sft_model"] = str(sft_out)
    return result


# ---------------------------------------------------------------------------------------------
# 3. Memory: one SFT and one GRPO step per plugin on a Qwen2.5-shaped model, against docs/memory.md's plan


def memory_model(size: str, tokenizer_dir: Path, folder: Path) -> Path:
    """A random-init Qwen2 of ``size`` saved in bfloat16 (as the hub ships Qwen2.5) with ``tokenizer_dir``'s
    tokenizer (its ids are a subset of the model's vocabulary: enough for memory)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv_heads, inter, tied = MEMORY_SHAPES[size]
    config = Qwen2Config(
        vocab_size=151_936,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        tie_word_embeddings=tied,
        max_position_embeddings=4096,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def memory_flags(stage: str, plugin: str, size: str, model: Path, data: Path, out: Path) -> list[str]:
    import memory

    flags = memory.stage_flags(stage, memory.SIZES["10m"], model, data, out)
    if stage == "sft":
        flags[flags.index("--per_device_train_batch_size") + 1] = str(MEMORY_BATCH["sft"])
    return [*flags, "--bf16", "--gradient_checkpointing", "--plugin", plugin]


def memory_check(args: argparse.Namespace, tokenizer_dir: Path, work: Path) -> list[dict[str, Any]]:
    """Peak GPU memory (metrics.jsonl) and host RSS (bench/memory.py's launcher) of one SFT and one GRPO step per size and
    plugin on this one GPU, beside bench/memory.py's plan for one rank, and measured / plan."""
    import memory

    data = {
        "sft": memory.write_data(tokenizer_dir, work / "memory-sft.jsonl", rows=16, question_tokens=200),
        "grpo": memory.write_data(
            tokenizer_dir,
            work / "memory-grpo.jsonl",
            rows=16,
            question_tokens=memory.SEQ - memory.COMPLETION - 80,
        ),
    }
    rows = []
    for size in args.memory_sizes:
        model = memory_model(size, tokenizer_dir, work / f"qwen2-{size}")
        for plugin in args.memory_plugins:
            for stage in ("sft", "grpo"):
                out = work / f"memory-{size}-{plugin}-{stage}"
                cmd = stage_command(
                    f"trainer.{stage}", memory_flags(stage, plugin, size, model, data[stage], out)
                )
                env = dict(os.environ)
                env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
                run = memory.run_measured(
                    cmd, env, work / f"memory-{size}-{plugin}-{stage}.log", args.stage_timeout
                )
                metrics = out / "metrics.jsonl"
                records = (
                    [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
                )
                gpu = max((r.get("gpu_memory_peak_gib", 0.0) for r in records), default=0.0)
                plan = memory.gpu_plan(size, plugin, gpus=1, micro_batch=MEMORY_BATCH[stage], stage=stage)
                row = {
                    "size": size,
                    "plugin": plugin,
                    "stage": stage,
                    "exit_code": run["exit_code"],
                    "wall_s": run["wall_s"],
                    "gpu_peak_gib": round(gpu, 2),
                    "gpu_plan_gib": round(plan["total"] / memory.GIB, 2),
                    "host_peak_rss_gib": round(run["peak_rss"] / memory.GIB, 2),
                }
                row["gpu_measured_over_plan"] = round(gpu / row["gpu_plan_gib"], 2) if gpu else None
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# 2. Sampler against generate, and the gap of bf16 weights, in this process


def measure_rollout(
    model_dir: Path,
    device: str,
    attn: str,
    *,
    prompts: int,
    generations: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
) -> dict[str, Any]:
    import torch
    from rollout import generate_exactly, sample_exactly  # bench/rollout.py: the same two ways to sample
    from transformers import AutoModelForCausalLM

    from trainer.rl.logprobs import completion_logprobs
    from trainer.rl.metrics import gap_metrics, logprob_gap_sums

    dev = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.bfloat16, attn_implementation=attn
    )
    model = model.to(dev).eval()
    vocab = model.config.vocab_size
    B, G, P, N = prompts, generations, prompt_len, new_tokens
    ids = torch.randint(3, vocab, (B, P), generator=torch.Generator().manual_seed(1)).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def sampler():
        return sample_exactly(model, ids, G, N, torch.Generator(device=dev).manual_seed(2))

    def generate() -> int:
        return generate_exactly(model, ids, G, N)

    def timed(fn) -> tuple[float, Any]:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        value = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start, value

    with torch.no_grad():
        sampler(), generate()  # warm-up: allocator, kernel selection
        sampler_s, generate_s = [], []
        for _ in range(repeats):  # interleaved, so load elsewhere hits both alike
            t, batch = timed(sampler)
            sampler_s.append(t)
            t, tokens = timed(generate)
            generate_s.append(t)
        expected = B * G * N
        if batch.num_generated_tokens != expected or tokens != expected:
            raise RuntimeError(
                f"sampler {batch.num_generated_tokens}, generate {tokens} tokens; expected {expected}"
            )
        # The training forward over the sampler's last batch, on the same bf16 weights.
        prompt_rows = ids.repeat_interleave(G, dim=0)
        input_ids = torch.cat([prompt_rows, batch.completion_ids], dim=1)
        trained = completion_logprobs(
            model, input_ids, torch.ones_like(input_ids), batch.completion_ids, 1.0, 32, group_size=G
        )
        gap = gap_metrics(logprob_gap_sums(batch.logprobs, trained, batch.completion_mask))
    out = {
        "tokens_per_run": expected,
        "sampler_tokens_per_s": expected / min(sampler_s),
        "generate_tokens_per_s": expected / min(generate_s),
        **{f"bf16_weights_{k}": v for k, v in gap.items()},
    }
    out["sampler_x_generate"] = out["sampler_tokens_per_s"] / out["generate_tokens_per_s"]
    if dev.type == "cuda":
        out["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainer.r1.builtin import build_tiny_model

    started = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"versions": versions(), "device": args.device, "attn": args.attn}
    print(json.dumps(report["versions"]), flush=True)
    base = build_tiny_model(work / "base", arch="qwen2")
    report["runs"] = []
    for plugin in args.plugins:
        run = run_plugin(args, plugin, base, work)
        report["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k not in ("sft",)}, default=str)[:3000], flush=True)
    trained = next((Path(r["sft_model"]) for r in report["runs"] if "sft_model" in r), base)
    try:
        report["rollout"] = measure_rollout(
            trained,
            args.device,
            args.attn,
            prompts=args.prompts,
            generations=args.generations,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
        )
    except Exception as e:  # noqa: BLE001 - reported with the stages' results, not instead of them
        report["rollout"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    sizes = (
        args.memory_sizes if args.memory_sizes is not None else (["1.5b"] if args.device == "cuda" else [])
    )
    args.memory_sizes = sizes
    report["memory"] = memory_check(args, base, work) if sizes else []
    report["wall_s"] = round(time.perf_counter() - started, 1)

    print("\n== gpu_check summary")
    print(f"versions: {report['versions']}")
    for run in report["runs"]:
        g = run.get("grpo", {})
        print(
            f"{run['plugin']:>6} ({run['attn']}): sft exit {run['sft']['exit_code']} ({run['sft']['wall_s']} s), "
            f"grpo exit {g.get('exit_code', '-')} ({g.get('wall_s', '-')} s); step-0 KL {g.get('kl_step0')}; "
            f"log-prob gap mean {g.get('logprob_gap_mean')} max {g.get('logprob_gap_max')} "
            f"off>1% {g.get('logprob_gap_off_fraction')}; pass-2 ratio {g.get('ratio_mean_pass2')}; "
            f"rollout {g.get('rollout_tokens_per_s')} tok/s; peak GPU memory {g.get('gpu_memory_peak_gib')} GiB"
        )
    print(f"rollout (bf16 weights, in process): {report['rollout']}")
    for row in report["memory"]:
        print(f"memory: {json.dumps(row)}")
    print(f"total {report['wall_s']} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    ok = all(
        r.get("grpo", {}).get("exit_code") == 0 and r["grpo"].get("kl_step0") == 0.0 for r in report["runs"]
    ) and all(row["exit_code"] == 0 for row in report["memory"])
    return 0 if ok and "error" not in report["rollout"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
