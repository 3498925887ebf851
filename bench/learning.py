"""Learning in the same wall-clock budget: this project's GRPO stage vs TRL's GRPOTrainer.

    .venv/bin/python bench/learning.py                     # 60 s of GRPO each, seeds 42 and 43, from the SFT model
    .venv/bin/python bench/learning.py --budget_s 120 --seeds 1 2 3

From the same SFT checkpoint on the built-in task (`--sft_dir`, the default pipeline's SFT stage, run here if
the folder holds no verified one), each trainer runs GRPO with equal settings (see `grpo_bench.Settings`;
checked on the effective configs) for `--budget_s` seconds of its training loop, then both final models
are scored on the held-out test split with the same greedy evaluation. Prints a table of held-out accuracy
before and after, steps done and the gain, and writes `<out>/learning.png` (reward over wall time and
held-out accuracy) plus `<out>/learning.json` and `<out>/learning.md`.
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
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--sft_dir", default="runs/bench/sft", help="SFT stage folder to start from (built here if missing)")
    p.add_argument("--out", default="runs/bench/learning", help="results folder")
    p.add_argument("--budget_s", type=float, default=60.0, help="seconds of GRPO training loop per trainer and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43], help="one run of each trainer per seed")
    p.add_argument("--max_eval_samples", type=int, default=None, help="held-out problems (default: the whole test split)")
    defaults = Settings(model="")
    for name in ("prompts_per_step", "num_generations", "logits_forward_batch_size", "max_completion_length",
                 "temperature", "beta", "learning_rate", "threads"):
        value = getattr(defaults, name)
        p.add_argument(f"--{name}", type=type(value), default=value, help=f"default {value}")
    a = p.parse_args(argv)
    if a.budget_s <= 0:
        p.error("--budget_s must be > 0")
    return a


def plot(runs: dict[str, list[dict]], before: float, after: dict[str, list[float]], budget: float, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"ours": "tab:blue", "trl": "tab:orange"}
    labels = {"ours": "r1-grpo", "trl": f"TRL {version('trl')}"}
    for name, results in runs.items():
        for i, res in enumerate(results):
            t, elapsed = [], 0.0
            for s in res["steps"]:
                elapsed += s["wall_s"]
                t.append(elapsed)
            ax_r.plot(t, [s.get("accuracy", float("nan")) for s in res["steps"]], color=colors[name], alpha=0.8,
                      label=labels[name] if i == 0 else None)
    ax_r.set_xlabel("training wall time (s)")
    ax_r.set_ylabel("rollout accuracy (sampled)")
    ax_r.set_ylim(0, 1.02)
    ax_r.set_title(f"Rollout accuracy within the {budget:.0f} s budget")
    ax_r.grid(alpha=0.3)
    ax_r.legend(loc="lower right")
    names = list(after)
    means = [statistics.mean(after[n]) for n in names]
    ax_a.bar(["SFT (start)"] + [labels[n] for n in names], [before, *means],
             color=["tab:gray"] + [colors[n] for n in names])
    for n_i, n in enumerate(names):
        ax_a.scatter([n_i + 1] * len(after[n]), after[n], color="black", zorder=3, s=12)
    ax_a.set_ylim(0, 1.02)
    ax_a.set_ylabel("held-out accuracy (greedy)")
    ax_a.set_title("Held-out accuracy before / after")
    ax_a.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    out = Path(opts.out)
    started = time.time()

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        sft_dir = ensure_sft(Path(opts.sft_dir), log)
        base = dict(model=str(sft_dir), steps=100_000, lr_scheduler_type="constant", max_train_seconds=opts.budget_s,
                    **{k: getattr(opts, k) for k in ("prompts_per_step", "num_generations", "logits_forward_batch_size",
                                                     "max_completion_length", "temperature", "beta", "learning_rate", "threads")})
        # The prompt list TRL is given must cover the steps it can do in the budget (< 20 steps/s here).
        base["steps"] = max(100, int(opts.budget_s * 20))
        eval_len = base["max_completion_length"]
        log(f"[eval] SFT model {sft_dir}")
        before = held_out_accuracy(str(sft_dir), "builtin:arith", opts.max_eval_samples, eval_len)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        after: dict[str, list[dict]] = {"ours": [], "trl": []}
        for i, seed in enumerate(opts.seeds):
            settings = Settings(**base, seed=seed)
            settings.validate()
            order = ["ours", "trl"] if i % 2 == 0 else ["trl", "ours"]
            for name in order:
                res = run_worker(name, settings, out / f"seed{seed}", log)
                runs[name].append(res)
                log(f"[eval] {name} after {len(res['steps'])} steps")
                after[name].append(held_out_accuracy(res["model_dir"], "builtin:arith", opts.max_eval_samples, eval_len))
            diffs = compare_effective(runs["ours"][-1]["effective"], runs["trl"][-1]["effective"])
            if diffs:
                raise BenchError("the two trainers did not run with the same settings:\n  " + "\n  ".join(diffs))
    except BenchError as e:
        print(f"learning: error: {e}", file=sys.stderr)
        return 1

    labels = {"ours": "r1-grpo", "trl": f"TRL {version('trl')}"}
    rows = []
    for name in ("ours", "trl"):
        accs = [m["accuracy"] for m in after[name]]
        steps = [len(r["steps"]) for r in runs[name]]
        loop = [sum(s["wall_s"] for s in r["steps"]) for r in runs[name]]
        rows.append({"trainer": labels[name], "steps": statistics.mean(steps), "loop_s": statistics.mean(loop),
                     "before": before["accuracy"], "after": statistics.mean(accs), "after_each": accs,
                     "gain": statistics.mean(accs) - before["accuracy"],
                     "format": statistics.mean(m["format_rate"] for m in after[name]),
                     "peak_rss_mib": statistics.mean(r["peak_rss_mib"] for r in runs[name])})
    print(f"\nGRPO for {opts.budget_s:.0f} s of training loop each from {sft_dir}, seeds {opts.seeds}; "
          f"held-out greedy accuracy on the test split")
    head = f"{'trainer':<12}{'steps':>8}{'loop s':>8}{'before':>9}{'after':>9}{'gain':>9}{'format':>9}{'RSS MiB':>9}"
    print(head)
    md = ["| trainer | GRPO steps in budget | held-out before | held-out after | gain | format after | peak RSS (MiB) |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        each = " / ".join(f"{a:.1%}" for a in r["after_each"]) if len(r["after_each"]) > 1 else f"{r['after']:.1%}"
        print(f"{r['trainer']:<12}{r['steps']:>8.0f}{r['loop_s']:>8.0f}{r['before']:>9.1%}{r['after']:>9.1%}"
              f"{r['gain']:>+9.1%}{r['format']:>9.1%}{r['peak_rss_mib']:>9.0f}")
        md.append(f"| {r['trainer']} | {r['steps']:.0f} | {r['before']:.1%} | {each} | {r['gain']:+.1%} | "
                  f"{r['format']:.1%} | {r['peak_rss_mib']:.0f} |")
    ours, trl = rows
    print(f"\naccuracy gain: r1-grpo {ours['gain']:+.1%} vs TRL {trl['gain']:+.1%}; "
          f"steps in the budget: {ours['steps'] / max(trl['steps'], 1):.2f}x TRL's")
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, before["accuracy"], {n: [m["accuracy"] for m in after[n]] for n in after}, opts.budget_s, out / "learning.png")
    (out / "learning.md").write_text("\n".join(md) + "\n")
    (out / "learning.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "machine": machine_line(), "budget_s": opts.budget_s, "seeds": opts.seeds,
         "settings": asdict(Settings(**base)), "before": before, "after": after, "rows": rows,
         "effective": runs["ours"][0]["effective"], "bench_wall_s": time.time() - started,
         "runs": {n: [{"steps": r["steps"], "peak_rss_mib": r["peak_rss_mib"]} for r in runs[n]] for n in runs}}, indent=1))
    print(f"\nmachine: {machine_line()}\nwrote {out / 'learning.png'}, {out / 'learning.md'}, {out / 'learning.json'}"
          f"\nbench wall time {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
