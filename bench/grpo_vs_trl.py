"""GRPO step throughput: this project's `trainer.grpo` vs TRL's `GRPOTrainer`, same settings, one run.

    .venv/bin/python bench/grpo_vs_trl.py                  # 20 steps each from the SFT model (built if missing)
    .venv/bin/python bench/grpo_vs_trl.py --steps 10 --rounds 2 --model builtin:tiny

Both start from the same weights (the default pipeline's SFT stage output, `--sft_dir`; or `--model`), the
same tokenizer and prompts (TRL gets the prompts in the order our stage draws them), the same group size,
prompt/completion lengths, batch, rows per forward/backward, temperature, learning rate, beta, clip range,
loss aggregation, reward (the R1 0/1/10 reward), optimizer and schedule — and the script stops if the
effective settings read back from the two trainers differ. Each side runs in its own process with the same
torch thread count, back to back (`--rounds N` alternates the order). It prints per-step wall time split
into generation / scoring / training (medians, the first two steps excluded as warm-up), completion tokens/s, peak
RSS and ratios ours ÷ TRL (after an untimed 3-step warm-up of each; the headline speed-up is the median of
the per-round ratios), and writes `<out>/grpo_vs_trl.png` (reward curves), `<out>/grpo_vs_trl.json`
and `<out>/grpo_vs_trl.md` (the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, fields
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_bench import (  # noqa: E402
    BenchError,
    Settings,
    compare_effective,
    ensure_sft,
    machine_line,
    run_worker,
    summarize,
    warm_up,
)

from trainer.executors.local import save_figure

ROWS = [  # (label, key, format, higher is better)
    ("step wall time (median, s)", "step_s", "{:.3f}", False),
    ("  generation (s)", "generate_s", "{:.3f}", False),
    ("  scoring (s)", "score_s", "{:.3f}", False),
    ("  training (s)", "train_s", "{:.3f}", False),
    ("  other (s)", "other_s", "{:.3f}", False),
    ("GRPO steps / min", "steps_per_min", "{:.1f}", True),
    ("completion tokens / s (step)", "tokens_per_s", "{:.0f}", True),
    ("completion tokens / s (generation)", "gen_tokens_per_s", "{:.0f}", True),
    ("mean completion length (tokens)", "completion_len", "{:.1f}", None),
    ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}", False),
]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--sft_dir", default="runs/bench/sft", help="SFT stage folder to start from (built here if missing)"
    )
    p.add_argument(
        "--model", default=None, help="start from this model instead (a stage folder or builtin:tiny)"
    )
    p.add_argument("--out", default="runs/bench/grpo_vs_trl", help="results folder")
    p.add_argument(
        "--warm_up",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run 3 untimed steps of each trainer first (--no-warm_up skips it)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="repeat both sides, alternating which goes first; medians over rounds",
    )
    defaults = Settings(model="")
    for f in fields(Settings):
        if f.name in ("model", "reward_funcs", "max_train_seconds"):
            continue
        value = getattr(defaults, f.name)
        kind = {bool: lambda t: t.lower() in ("1", "true", "yes")}.get(type(value), type(value))
        p.add_argument(f"--{f.name}", type=kind, default=value, help=f"default {value}")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    values = {
        f.name: getattr(a, f.name) for f in fields(Settings) if hasattr(a, f.name) and f.name != "model"
    }
    return a, Settings(model=a.model or a.sft_dir, **values)


def median_summary(summaries: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in summaries) for k in summaries[0]}


def table(ours: dict[str, float], trl: dict[str, float]) -> list[tuple[str, str, str, str]]:
    rows = []
    for label, key, fmt, _ in ROWS:
        ratio = ours[key] / trl[key] if trl[key] else float("nan")
        rows.append((label, fmt.format(ours[key]), fmt.format(trl[key]), f"{ratio:.2f}"))
    return rows


def plot(results: dict[str, list[dict]], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"ours": "r1-grpo", "trl": f"TRL {version('trl')}"}
    for name, runs in results.items():
        # Same seed, same rewards per step in every round (CPU runs are deterministic): draw the median round.
        order = sorted(range(len(runs)), key=lambda i: summarize(runs[i])["step_s"])
        for run in [runs[order[len(order) // 2]]]:
            steps = run["steps"]
            label = labels[name]
            ax_r.plot(
                [s["step"] for s in steps], [s.get("reward_mean", float("nan")) for s in steps], label=label
            )
            t, elapsed = [], 0.0
            for s in steps:
                elapsed += s["wall_s"]
                t.append(elapsed)
            ax_t.plot(t, [s.get("reward_mean", float("nan")) for s in steps], label=label)
    ax_r.set_xlabel("GRPO step")
    ax_r.set_ylabel("mean reward (0 / 1 / 10)")
    ax_r.set_title("Reward per step")
    ax_t.set_xlabel("training wall time (s)")
    ax_t.set_title("Reward over wall time (median round)")
    for ax in (ax_r, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    save_figure(fig, out_png)


def main(argv: list[str] | None = None) -> int:
    opts, settings = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        settings.validate()
        if opts.model is None:
            ensure_sft(Path(opts.sft_dir), log)
        out = Path(opts.out)
        results: dict[str, list[dict]] = {"ours": [], "trl": []}
        started = time.time()
        if opts.warm_up:
            warm_up(settings, out, log)
        for r in range(opts.rounds):
            order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
            for name in order:
                results[name].append(run_worker(name, settings, out / f"round{r + 1}", log))
        for i in range(opts.rounds):
            diffs = compare_effective(results["ours"][i]["effective"], results["trl"][i]["effective"])
            if diffs:
                raise BenchError(
                    "the two trainers did not run with the same settings:\n  " + "\n  ".join(diffs)
                )
    except BenchError as e:
        print(f"grpo_vs_trl: error: {e}", file=sys.stderr)
        return 1

    ours = median_summary([summarize(x) for x in results["ours"]])
    trl = median_summary([summarize(x) for x in results["trl"]])
    rows = table(ours, trl)
    header = ("", "r1-grpo", f"TRL {version('trl')}", "ours ÷ TRL")
    width = max(len(r[0]) for r in rows) + 2
    print(
        f"\n{settings.steps} GRPO steps each, {settings.prompts_per_step} prompts x {settings.num_generations} "
        f"completions per step, max {settings.max_completion_length} new tokens, {settings.num_threads} threads, "
        f"{opts.rounds} round(s); medians exclude steps 1-2"
    )
    print(f"{header[0]:<{width}}{header[1]:>12}{header[2]:>14}{header[3]:>12}")
    for label, a, b, ratio in rows:
        print(f"{label:<{width}}{a:>12}{b:>14}{ratio:>12}")
    # Paired per round (the two ran minutes apart, under the same load): the headline is their median.
    paired = [
        summarize(t)["step_s"] / summarize(o)["step_s"]
        for o, t in zip(results["ours"], results["trl"], strict=True)
    ]
    speedup = statistics.median(paired)
    print(
        f"\nGRPO step throughput: r1-grpo is {speedup:.2f}x TRL (median of the rounds: "
        f"{', '.join(f'{x:.2f}' for x in paired)}); medians of all rounds: step {trl['step_s'] / ours['step_s']:.2f}x, "
        f"generation {trl['generate_s'] / max(ours['generate_s'], 1e-9):.2f}x, "
        f"training {trl['train_s'] / max(ours['train_s'], 1e-9):.2f}x"
    )
    ours_steps = [st for run in results["ours"] for st in run["steps"]]
    trained = statistics.mean(st["trained_fraction"] for st in ours_steps)
    zero_std = statistics.mean(st["zero_std_fraction"] for st in ours_steps)
    print(
        f"r1-grpo's policy update ran forward/backward on {trained:.0%} of the completions: {zero_std:.0%} of the "
        f"groups had equal rewards (zero advantage, exactly zero gradient) and were "
        f"{'skipped' if settings.skip_zero_advantage_groups else 'computed anyway (--skip_zero_advantage_groups false)'}"
    )
    final = {
        n: statistics.mean(s.get("reward_mean", 0.0) for s in results[n][0]["steps"][-5:]) for n in results
    }
    print(f"mean reward over the last 5 steps: r1-grpo {final['ours']:.2f}, TRL {final['trl']:.2f}")

    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "grpo_vs_trl.png")
    md = [f"| | r1-grpo | {header[2]} | ours ÷ TRL |", "| --- | ---: | ---: | ---: |"]
    md += [f"| {label.strip()} | {a} | {b} | {ratio} |" for label, a, b, ratio in rows]
    (out / "grpo_vs_trl.md").write_text("\n".join(md) + "\n")
    (out / "grpo_vs_trl.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine_line(),
                "settings": asdict(settings),
                "rounds": opts.rounds,
                "summary": {"ours": ours, "trl": trl},
                "speedup_per_round": paired,
                "speedup": speedup,
                "ours_trained_fraction": trained,
                "zero_std_fraction": zero_std,
                "effective": results["ours"][0]["effective"],
                "bench_wall_s": time.time() - started,
                "results": results,
            },
            indent=1,
        )
    )
    print(
        f"\nmachine: {machine_line()}\nwrote {out / 'grpo_vs_trl.png'}, {out / 'grpo_vs_trl.md'}, {out / 'grpo_vs_trl.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
