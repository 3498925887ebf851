"""Learning in the same wall-clock budget: this project's GRPO stage vs TRL's GRPOTrainer.

    .venv/bin/python bench/learning.py                     # budgets 10, 20, 40 s; seeds 42, 43; from the SFT model
    .venv/bin/python bench/learning.py --budget_s 30 60 --seeds 1 2 3 --learning_rate 3e-4

From the same SFT checkpoint on the built-in task (`--sft_dir`, the default pipeline's SFT stage, run here if
the folder holds no verified one), each trainer runs GRPO with equal settings (see `grpo_bench.Settings`;
checked on the effective configs) for each `--budget_s` seconds of its training loop (a fresh run from the
SFT model per budget and seed, constant learning rate), then every final model is scored on the held-out
test split with the same greedy evaluation. Prints held-out accuracy before and after per budget, the GRPO
steps each trainer fitted in it and the gain, and writes `<out>/learning.png` (held-out accuracy against
the budget; rollout accuracy over wall time) plus `<out>/learning.json` and `<out>/learning.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_bench import (  # noqa: E402
    BenchError,
    Settings,
    compare_effective,
    ensure_sft,
    held_out_accuracy,
    machine_line,
    run_worker,
    warm_up,
)

from trainer.executors.local import save_figure

NAMES = ("ours", "trl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--sft_dir", default="runs/bench/sft", help="SFT stage folder to start from (built here if missing)"
    )
    p.add_argument("--out", default="runs/bench/learning", help="results folder")
    # 10 s is the shortest budget that measures learning rather than start-up; by 40 s (about 230 of our
    # steps, 100 of TRL's at 3e-5) both have levelled off on the default SFT model (docs/benchmarks.md).
    p.add_argument(
        "--budget_s",
        type=float,
        nargs="+",
        default=[10.0, 20.0, 40.0],
        help="seconds of GRPO training loop per run (one run per budget, trainer and seed)",
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[42, 43], help="one run of each trainer per seed and budget"
    )
    p.add_argument(
        "--warm_up",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run 3 untimed steps of each trainer first (--no-warm_up skips it)",
    )
    p.add_argument(
        "--max_eval_samples", type=int, default=None, help="held-out problems (default: the whole test split)"
    )
    defaults = Settings(model="", learning_rate=3e-5)  # constant: stable for the 230 steps of a 40 s run
    for name in (
        "prompts_per_step",
        "num_generations",
        "logits_forward_batch_size",
        "max_completion_length",
        "temperature",
        "beta",
        "learning_rate",
        "threads",
    ):
        value = getattr(defaults, name)
        p.add_argument(f"--{name}", type=type(value), default=value, help=f"default {value}")
    a = p.parse_args(argv)
    if min(a.budget_s) <= 0:
        p.error("--budget_s values must be > 0")
    return a


def plot(
    results: dict[float, dict[str, list[dict]]], before: float, labels: dict[str, str], out_png: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"ours": "tab:blue", "trl": "tab:orange"}
    budgets = sorted(results)
    for name in NAMES:
        means = [statistics.mean(r["accuracy"] for r in results[b][name]) for b in budgets]
        ax_a.plot([0, *budgets], [before, *means], "o-", color=colors[name], label=labels[name])
        for b in budgets:
            ax_a.scatter(
                [b] * len(results[b][name]),
                [r["accuracy"] for r in results[b][name]],
                color=colors[name],
                s=10,
                alpha=0.5,
            )
    ax_a.set_xlabel("GRPO training budget (s of wall time)")
    ax_a.set_ylabel("held-out accuracy (greedy)")
    ax_a.set_ylim(0, 1.02)
    ax_a.set_title("Held-out accuracy after the budget (0 s = SFT model)")
    ax_a.grid(alpha=0.3)
    ax_a.legend(loc="lower right")
    longest = budgets[-1]
    for name in NAMES:
        for i, run in enumerate(results[longest][name]):
            t, elapsed = [], 0.0
            for s in run["steps"]:
                elapsed += s["wall_s"]
                t.append(elapsed)
            ax_r.plot(
                t,
                [s.get("accuracy", float("nan")) for s in run["steps"]],
                color=colors[name],
                alpha=0.7,
                label=labels[name] if i == 0 else None,
            )
    ax_r.set_xlabel("training wall time (s)")
    ax_r.set_ylabel("rollout accuracy (sampled)")
    ax_r.set_ylim(0, 1.02)
    ax_r.set_title(f"Rollout accuracy, {longest:g} s runs")
    ax_r.grid(alpha=0.3)
    ax_r.legend(loc="lower right")
    save_figure(fig, out_png)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    out = Path(opts.out)
    started = time.time()
    labels = {"ours": "r1-grpo", "trl": f"TRL {version('trl')}"}

    def log(msg: str) -> None:
        print(msg, flush=True)

    # results[budget][trainer] = one record per seed: steps, loop time, held-out metrics, per-step curve
    results: dict[float, dict[str, list[dict]]] = {}
    try:
        sft_dir = ensure_sft(Path(opts.sft_dir), log)
        common = {
            k: getattr(opts, k)
            for k in (
                "prompts_per_step",
                "num_generations",
                "logits_forward_batch_size",
                "max_completion_length",
                "temperature",
                "beta",
                "learning_rate",
                "threads",
            )
        }
        eval_len = opts.max_completion_length
        log(f"[eval] SFT model {sft_dir}")
        before = held_out_accuracy(str(sft_dir), "builtin:arith", opts.max_eval_samples, eval_len)
        effective = None
        run_index = 0
        if opts.warm_up:
            warm_up(Settings(model=str(sft_dir), **common), out, log)
        for budget in opts.budget_s:
            results[budget] = {n: [] for n in NAMES}
            for seed in opts.seeds:
                # The prompt list TRL is given must cover every step that fits in the budget (< 20 steps/s here).
                settings = Settings(
                    model=str(sft_dir),
                    steps=max(100, int(budget * 20)),
                    lr_scheduler_type="constant",
                    max_train_seconds=budget,
                    seed=seed,
                    **common,
                )
                settings.validate()
                order = NAMES if run_index % 2 == 0 else NAMES[::-1]  # alternate who goes first
                run_index += 1
                pair = {}
                for name in order:
                    res = run_worker(name, settings, out / f"budget{budget:g}-seed{seed}", log)
                    metrics = held_out_accuracy(
                        res["model_dir"], "builtin:arith", opts.max_eval_samples, eval_len
                    )
                    log(
                        f"[eval] {name}: {len(res['steps'])} steps in {budget:g} s -> held-out {metrics['accuracy']:.1%}"
                    )
                    pair[name] = res
                    results[budget][name].append(
                        {
                            "seed": seed,
                            "steps_done": len(res["steps"]),
                            "loop_s": sum(s["wall_s"] for s in res["steps"]),
                            "accuracy": metrics["accuracy"],
                            "format_rate": metrics["format_rate"],
                            "peak_rss_mib": res["peak_rss_mib"],
                            "steps": res["steps"],
                        }
                    )
                diffs = compare_effective(pair["ours"]["effective"], pair["trl"]["effective"])
                if diffs:
                    raise BenchError(
                        "the two trainers did not run with the same settings:\n  " + "\n  ".join(diffs)
                    )
                effective = pair["ours"]["effective"]
    except BenchError as e:
        print(f"learning: error: {e}", file=sys.stderr)
        return 1

    print(
        f"\nGRPO from {sft_dir} (held-out {before['accuracy']:.1%}), seeds {opts.seeds}, constant lr "
        f"{opts.learning_rate:g}; held-out greedy accuracy on the test split (mean over seeds)"
    )
    print(f"{'budget':>7}  {'trainer':<12}{'steps':>7}{'after':>9}{'gain':>9}{'format':>9}   per seed")
    md = [
        "| budget | trainer | GRPO steps | held-out after | gain | format | per seed |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    summary = []
    for budget in opts.budget_s:
        gains = {}
        for name in NAMES:
            recs = results[budget][name]
            acc = statistics.mean(r["accuracy"] for r in recs)
            steps = statistics.mean(r["steps_done"] for r in recs)
            fmt = statistics.mean(r["format_rate"] for r in recs)
            gains[name] = acc - before["accuracy"]
            each = " / ".join(f"{r['accuracy']:.1%}" for r in recs)
            print(
                f"{budget:>6g}s  {labels[name]:<12}{steps:>7.0f}{acc:>9.1%}{gains[name]:>+9.1%}{fmt:>9.1%}   {each}"
            )
            md.append(
                f"| {budget:g} s | {labels[name]} | {steps:.0f} | {acc:.1%} | {gains[name]:+.1%} | {fmt:.1%} | {each} |"
            )
            summary.append(
                {
                    "budget_s": budget,
                    "trainer": name,
                    "steps": steps,
                    "accuracy": acc,
                    "gain": gains[name],
                    "format_rate": fmt,
                }
            )
        print(f"{'':>9}gain r1-grpo - TRL: {gains['ours'] - gains['trl']:+.1%}")
    rss = {n: statistics.mean(r["peak_rss_mib"] for b in results for r in results[b][n]) for n in NAMES}
    print(f"peak RSS (mean): r1-grpo {rss['ours']:.0f} MiB, TRL {rss['trl']:.0f} MiB")
    out.mkdir(parents=True, exist_ok=True)
    plot(results, before["accuracy"], labels, out / "learning.png")
    (out / "learning.md").write_text("\n".join(md) + "\n")
    (out / "learning.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine_line(),
                "budgets_s": opts.budget_s,
                "seeds": opts.seeds,
                "settings": asdict(Settings(model=str(sft_dir), **common)),
                "before": before,
                "summary": summary,
                "effective": effective,
                "peak_rss_mib": rss,
                "bench_wall_s": time.time() - started,
                "results": {str(b): results[b] for b in results},
            },
            indent=1,
        )
    )
    print(
        f"\nmachine: {machine_line()}\nwrote {out / 'learning.png'}, {out / 'learning.md'}, {out / 'learning.json'}"
        f"\nbench wall time {time.time() - started:.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
