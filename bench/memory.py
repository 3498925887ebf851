"""Memory that scales with the model, not the vocabulary (issue 21): peak RSS per rank and time of an SFT
step, a GRPO step and the SFT eval-loss forward, against an analytic floor, for random-init Qwen3 models of
about 10M, 100M and 0.5B parameters with the real Qwen3 tokenizer (151,669 tokens), sequences of 1024.

    python bench/memory.py --tokenizer DIR            # make bench-memory passes the Qwen3 tokenizer's folder
    python bench/memory.py --tokenizer DIR --sizes 10m --stages eval
    python bench/memory.py --plan                     # the same accounting for 1.5B / 7B on 8 x 80 GB GPUs

SFT and GRPO run as a user runs them (`torchrun -m trainer.sft|grpo`, ddp on CPU, one optimizer step,
GRPO with --beta 0.04 so the KL reference is loaded); the eval figure is `trainer.sft.eval_loss` at the
default `--per_device_eval_batch_size` (16) in one process. Peak RSS is the largest of the run's processes
(each rank; from wait4's rusage). Two ranks where 2 x the SFT floor fits `--memory_budget_gib`, else one.

The floor of a process: its RSS after imports (measured) + weights + gradients + AdamW states (float32 on
ddp: 4 + 4 + 8 bytes per parameter; eval: weights only; GRPO: + the float32 reference) + the activations
autograd keeps for one micro-batch (per token and layer: 6 hidden + 5 KV + 4 intermediate float32 values)
+ two chunks of float32 logits (the chunk and its softmax; GRPO's chunk holds just the completion
positions). Ratio = measured / floor.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30
SEQ = 1024
COMPLETION = 64  # GRPO: new tokens per completion; prompt + completion <= SEQ
CHUNK_BYTES = 256 * 2**20  # trainer.rl.head_logprobs.DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int
    train_batch: int  # SFT rows per rank per micro-step (sequence length SEQ)
    eval_batch: int = 16  # the default --per_device_eval_batch_size
    vocab: int = 151_936  # Qwen3's embedding rows (the tokenizer's 151,669 tokens, padded)

    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + 2 * self.head_dim  # q, k, v, o projections, q/k norms
        mlp = 3 * h * self.intermediate
        return self.vocab * h + self.layers * (attn + mlp + 2 * h) + h  # tied embeddings


SIZES = {
    "10m": Size(
        "10m", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, head_dim=16, train_batch=8
    ),
    "100m": Size(
        "100m", hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536, head_dim=64, train_batch=2
    ),
    # Qwen2.5-0.5B's shape; eval at 4 rows: 16 x 1024 tokens through 0.5B is ~16 TFLOP, too slow here.
    "0.5b": Size(
        "0.5b",
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        head_dim=64,
        train_batch=1,
        eval_batch=4,
    ),
}
PLAN_SIZES = {  # Qwen2.5-0.5B, -1.5B (tied) and -7B (untied): params, hidden, layers, KV width, intermediate
    "0.5b": (494_032_768, 896, 24, 128, 4864),
    "1.5b": (1_543_714_304, 1536, 28, 256, 8960),
    "7b": (7_615_616_512, 3584, 28, 512, 18944),
}


# --------------------------------------------------------------------------------------------------
# The analytic floor
# --------------------------------------------------------------------------------------------------
def activation_bytes(size: Size, tokens: int) -> int:
    """float32 values autograd keeps per micro-batch: per token and layer ~6 hidden, 5 KV, 4 intermediate."""
    kv = size.kv_heads * size.head_dim
    per_token_layer = 6 * size.hidden + 5 * kv + 4 * size.intermediate
    return 4 * tokens * (size.layers * per_token_layer + 2 * size.hidden)


def logits_bytes(size: Size) -> int:
    rows = max(1, CHUNK_BYTES // (4 * size.vocab))
    return 2 * rows * size.vocab * 4


def floor_bytes(size: Size, stage: str, imports: int) -> dict[str, int]:
    p = size.params()
    if stage == "eval":  # no grad: one layer's transient values, not all layers'
        tokens = size.eval_batch * SEQ
        parts = {
            "weights": 4 * p,
            "activations": 4 * tokens * (3 * size.hidden + 3 * size.intermediate),
        }
    elif stage == "sft":
        parts = {"weights": 4 * p, "grads": 4 * p, "adam": 8 * p}
        parts["activations"] = activation_bytes(size, size.train_batch * SEQ)
    else:  # grpo: 2 completions of one prompt, trained as one chunk; the reference beside the policy
        parts = {"weights": 4 * p, "reference": 4 * p, "grads": 4 * p, "adam": 8 * p}
        # The shared-prompt forward packs the group: its prompt once, then both completions.
        parts["activations"] = activation_bytes(size, SEQ - COMPLETION + 2 * COMPLETION)
    if stage == "grpo":  # the fused head's chunk: logits of the 2 x 65 predicting positions, and their exp
        parts["logits"] = 2 * 2 * (COMPLETION + 1) * size.vocab * 4
    else:
        parts["logits"] = logits_bytes(size)
    parts["imports"] = imports
    return parts


# --------------------------------------------------------------------------------------------------
# Inputs: the model folder and the data
# --------------------------------------------------------------------------------------------------
def qwen3_config(size: Size, **extra: Any):
    """The Qwen3 config of ``size`` (tied embeddings, no sliding window); ``extra`` adds token ids."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        sliding_window=None,
        **extra,
    )


def build_model(size: Size, tokenizer_dir: Path, folder: Path) -> Path:
    """A random-init Qwen3 of ``size`` saved (float32, the ddp training dtype) with the tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = qwen3_config(size, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def write_data(tokenizer_dir: Path, path: Path, rows: int, question_tokens: int) -> Path:
    """Rows in the built-in schema: questions of ``question_tokens`` tokens and reasoning that fills SEQ
    (SFT truncates the rest); words drawn from a fixed list with a fixed seed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = [
        "the",
        "of",
        "and",
        "a",
        "to",
        "in",
        "is",
        "that",
        "for",
        "it",
        "as",
        "with",
        "was",
        "on",
        "be",
        "by",
        "this",
        "are",
        "from",
        "at",
        "an",
        "or",
        "have",
    ]
    words += [
        "number",
        "sum",
        "value",
        "step",
        "answer",
        "total",
        "first",
        "second",
        "result",
        "equals",
        "compute",
        "check",
        "carry",
    ]
    rng = random.Random(0)

    def text(n_tokens: int) -> str:
        out: list[str] = []
        while len(tok(" ".join(out)).input_ids) < n_tokens:
            out += rng.choices(words, k=max(8, (n_tokens - len(out)) // 2))
        ids = tok(" ".join(out)).input_ids[:n_tokens]
        return tok.decode(ids)

    lines = []
    for i in range(rows):
        lines.append(
            json.dumps(
                {"question": f"Q{i}: " + text(question_tokens), "reasoning": text(SEQ), "answer": str(i % 10)}
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------
# The kernel carries a process's RSS high-water mark into its ru_maxrss across exec (exec_mmap keeps
# the old mm's peak), so a command spawned straight from a large process (pytest after importing torch,
# the bench after building a model) reports at least its parent's size. This launcher, started small,
# spawns the command itself and reports its children's peak, which is then the command tree's own.
_LAUNCHER = """
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
with open(sys.argv[1], "w") as f:
    json.dump({"exit_code": rc, "peak_rss": peak}, f)
"""


def run_measured(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd``; its exit code, wall time and the peak RSS of its largest process, descendants
    included (RUSAGE_CHILDREN covers the processes the launcher waited for and theirs: torchrun's
    ranks). A run past ``timeout`` is killed with its whole process group."""
    report = log.with_name(log.name + ".peak.json")
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(report), *cmd],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = round(time.perf_counter() - start, 1)
    if report.is_file():
        measured = json.loads(report.read_text())
        report.unlink()
        return {"exit_code": measured["exit_code"], "wall_s": wall, "peak_rss": measured["peak_rss"]}
    # Killed (timeout) before the launcher could report: no peak to trust.
    return {"exit_code": proc.returncode, "wall_s": wall, "peak_rss": 0}


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun(nproc: int, module: str, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + [
        "-m",
        module,
        *flags,
    ]


def stage_flags(stage: str, size: Size, model: Path, data: Path, out: Path) -> list[str]:
    common = [
        *("--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out)),
        *("--max_steps", "1", "--save_steps", "0", "--report_to", "none", "--logging_steps", "1"),
    ]
    if stage == "sft":
        return common + [
            *("--per_device_train_batch_size", str(size.train_batch), "--max_seq_length", str(SEQ)),
        ]
    return common + [
        *("--per_device_train_batch_size", "1", "--num_generations", "2", "--inference_batch_size", "1"),
        *("--logits_forward_batch_size", "2", "--max_prompt_length", str(SEQ - COMPLETION)),
        *("--max_completion_length", str(COMPLETION), "--beta", "0.04", "--stop_at_answer_tag", "false"),
    ]


def eval_worker(model: str, data: str, batch: int) -> None:
    """One process: imports, the model (trainer.modeling), then `trainer.sft.eval_loss` on one batch of
    `batch` rows; prints peak RSS after imports, after loading and after the forward (clear_refs resets
    the high-water mark between them)."""
    import torch

    from trainer.modeling import load_model_and_tokenizer
    from trainer.r1.data import DataArgs
    from trainer.runtime import Dist
    from trainer.sft import SFTArgs, eval_loss, tokenize_examples

    def hwm() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    imports = hwm()
    args = SFTArgs(model_name_or_path=model, output_dir="unused", per_device_eval_batch_size=batch)
    net, tokenizer = load_model_and_tokenizer(model, args, torch.device("cpu"))
    examples, report = DataArgs(dataset_name=data).load_train(seed=0, require_solutions=True)
    rows, _ = tokenize_examples(examples[:batch], tokenizer, SEQ, report=report)
    loaded = hwm()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the forward's own peak
    start = time.perf_counter()
    loss = eval_loss(net, rows, args, Dist(), tokenizer.pad_token_id, torch.device("cpu"))
    took = time.perf_counter() - start
    status = Path("/proc/self/status").read_text().splitlines()
    peak = int(next(ln for ln in status if ln.startswith("VmHWM")).split()[1]) * 1024
    tokens = sum(len(r.input_ids) for r in rows)
    print(
        json.dumps(
            {"imports": imports, "loaded": loaded, "peak": peak, "s": took, "loss": loss, "tokens": tokens}
        )
    )


def imports_rss(env: dict[str, str]) -> int:
    """Peak RSS of a process that imported what a training rank imports (the floor's first term). Its
    own mm's VmHWM: ru_maxrss would carry this (model-building) process's size across the exec."""
    code = (
        "import colossalai, transformers, trainer.sft, trainer.grpo; "
        "status = open('/proc/self/status').read().splitlines(); "
        "print(int(next(ln for ln in status if ln.startswith('VmHWM')).split()[1]) * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def grpo_step_s(out: Path) -> float | None:
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "train_s" in record:
            return round(record.get("rollout_s", 0.0) + record["train_s"], 1)
    return None


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # SFT and eval: a 200-token question, the rest of the 1024 is completion. GRPO: the prompt fills
    # what the completion leaves (the chat template and the R1 system prompt take ~60 tokens).
    datasets = {"sft": work / "sft-rows.jsonl", "grpo": work / "grpo-rows.jsonl"}
    for stage, question in (("sft", 200), ("grpo", SEQ - COMPLETION - 140)):
        if not datasets[stage].exists():
            write_data(Path(args.tokenizer), datasets[stage], rows=32, question_tokens=question)
    results = []
    for name in args.sizes:
        size = SIZES[name]
        model = build_model(size, Path(args.tokenizer), work / f"qwen3-{name}")
        env1 = child_env(args.threads)
        imports = imports_rss(env1)
        sft_floor = sum(floor_bytes(size, "sft", imports).values())
        ranks = 2 if 2 * sft_floor <= args.memory_budget_gib * GIB else 1
        for stage in args.stages:
            data = datasets["grpo" if stage == "grpo" else "sft"]
            floor = floor_bytes(size, stage, imports)
            row: dict[str, Any] = {"size": name, "params": size.params(), "stage": stage}
            if stage == "eval":
                cmd = [sys.executable, str(Path(__file__).resolve()), "--eval_worker", str(model), str(data)]
                cmd.append(str(size.eval_batch))
                log = work / f"{name}-eval.log"
                run = run_measured(cmd, env1, log, args.timeout)
                lines = log.read_text().strip().splitlines()
                if run["exit_code"] == 0:
                    report = json.loads(lines[-1])
                    row.update(ranks=1, peak_rss=report["peak"], step_s=round(report["s"], 1))
                    row["batch"] = f"{size.eval_batch} x {report['tokens'] // size.eval_batch}"
            else:
                out = work / f"{name}-{stage}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                threads = max(1, args.threads // ranks)
                cmd = torchrun(ranks, f"trainer.{stage}", stage_flags(stage, size, model, data, out))
                run = run_measured(cmd, child_env(threads), work / f"{name}-{stage}.log", args.timeout)
                row.update(ranks=ranks, peak_rss=run["peak_rss"], wall_s=run["wall_s"])
                row["batch"] = f"{size.train_batch} x {SEQ}" if stage == "sft" else f"2 x <= {SEQ}"
                if stage == "grpo":
                    row["step_s"] = grpo_step_s(out)
            row["exit_code"] = run["exit_code"]
            row["floor"] = sum(floor.values())
            row["floor_parts"] = floor
            if "peak_rss" in row and run["exit_code"] == 0:
                row["ratio"] = round(row["peak_rss"] / row["floor"], 2)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "floor_parts"}), flush=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params | stage | ranks | batch | peak RSS / rank | floor | measured / floor | time (s) |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ok = "peak_rss" in r and r["exit_code"] == 0
        peak = f"{r['peak_rss'] / GIB:.2f} GiB" if ok else f"failed (exit {r['exit_code']})"
        t = r.get("step_s") or r.get("wall_s")
        timing = f"{t}" + (f" (run {r['wall_s']})" if r.get("step_s") and r.get("wall_s") else "")
        lines.append(
            f"| qwen3-{r['size']} | {r['params'] / 1e6:.1f}M | {r['stage']} | {r.get('ranks', 1)} | "
            f"{r.get('batch', '')} | {peak} | {r['floor'] / GIB:.2f} GiB | {r.get('ratio', '-')} | {timing} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The plan for GPUs: 1.5B and 7B, 8 x 80 GB per node, bf16
# --------------------------------------------------------------------------------------------------
def gpu_plan(
    name: str, plugin: str, gpus: int, micro_batch: int = 4, stage: str = "grpo"
) -> dict[str, float]:
    """Bytes per GPU rank under --bf16 with gradient checkpointing (activations: each layer's bf16 input
    kept, one layer's float32 values recomputed at a time) for a PLAN_SIZES model on ``gpus`` ranks."""
    p, hidden, layers, kv, inter = PLAN_SIZES[name]
    tokens = micro_batch * SEQ
    parts = {
        "weights": 2 * p if plugin == "zero2" else 2 * p / gpus,  # gemini shards the bf16 params too
        "grads": 2 * p / gpus,
        "optimizer": 12 * p / gpus,  # float32 master + Adam m, v, sharded
        "reference": 2 * p if stage == "grpo" else 0,  # a bf16 replica per rank (not sharded)
        "activations": 2 * tokens * hidden * layers + 4 * tokens * (6 * hidden + 5 * kv + 4 * inter),
        "logits": 2 * (CHUNK_BYTES // (4 * 151_936)) * 151_936 * 4,  # the fused head's chunk (zero2)
    }
    if plugin == "gemini":  # no fused head: the bf16 logits of every trained position (at most all tokens)
        # kept for the backward, and their gradient; GRPO's shared-prompt forward gathers a copy of them too
        parts["logits"] = (3 if stage == "grpo" else 2) * 2 * tokens * 151_936
    parts["total"] = sum(parts.values())
    return parts


def plan(gpus: int = 8, host_per_rank_gib: float = 3.0) -> str:
    """GPU memory per rank and host RAM per node for 1.5B and 7B under zero2 and gemini (docs/memory.md)."""
    lines = [
        "| model | plugin | GPU per rank (GiB) | weights / grads / optimizer / reference / "
        "activations+logits | host RAM per node (GiB), before -> now |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    for name in ("1.5b", "7b"):
        p = PLAN_SIZES[name][0]
        for plugin in ("zero2", "gemini"):
            g = {k: v / GIB for k, v in gpu_plan(name, plugin, gpus).items()}
            before = gpus * (4 * p / GIB + host_per_rank_gib)  # every rank a float32 model in host RAM
            now = 2 * p / GIB + gpus * host_per_rank_gib  # one page-cache copy of the bf16 files + processes
            lines.append(
                f"| {name} | {plugin} | {g['total']:.1f} | {g['weights']:.1f} / {g['grads']:.1f} / "
                f"{g['optimizer']:.1f} / {g['reference']:.1f} / {g['activations'] + g['logits']:.1f} | "
                f"{before:.0f} -> {now:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/memory.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", help="The Qwen3 tokenizer's folder (make bench-memory passes it)")
    p.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    p.add_argument("--stages", nargs="+", choices=("sft", "grpo", "eval"), default=["eval", "sft", "grpo"])
    p.add_argument("--workdir", default=str(ROOT / "runs" / "bench" / "memory"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all")
    p.add_argument("--memory_budget_gib", type=float, default=12.0, help="Two ranks when 2 x floor fits")
    p.add_argument("--timeout", type=float, default=3600.0, help="Seconds per run")
    p.add_argument("--out", default=None, help="Write the results as JSON here")
    p.add_argument("--plan", action="store_true", help="Print the GPU accounting for 1.5B and 7B and exit")
    p.add_argument("--eval_worker", nargs=3, metavar=("MODEL", "DATA", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.eval_worker:
        eval_worker(args.eval_worker[0], args.eval_worker[1], int(args.eval_worker[2]))
        return 0
    if args.plan:
        print(plan())
        return 0
    if not args.tokenizer:
        p.error("--tokenizer DIR is required (the Qwen3 tokenizer's folder)")
    results = measure(args)
    print(table(results))
    if args.out:
        tmp = Path(tempfile.mkstemp(dir=Path(args.out).parent)[1])
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.out)
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
