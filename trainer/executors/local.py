"""`r1-grpo pipeline run`: the local twin of the Kubernetes controller.

Reads a pipeline YAML (default: trainer/pipeline.yaml), plans the enabled stages (`prepare` when enabled
→ `sft` → `grpo` → `eval`, output folders `<root>/<release>/<stage>`), and runs each as `torchrun -m trainer.<stage>` with
the flags rendered from its `args` map — the same stage list, argument rendering and hand-off
verification the chart and controller use; only the executor differs. A stage whose folder already
holds a valid `r1_stage.json` is skipped; an interrupted one is re-run and resumes from its last complete
checkpoint. At the end it prints accuracy and format rate after each stage and plots the GRPO curves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer.contract.output import (
    StageManifest,
    StageOutputError,
    atomic_write_json,
    move_aside,
    verify_stage_output,
)
from trainer.contract.prepared import rewrite_dataset_name
from trainer.contract.stages import (
    STAGE_MODULES,
    TRAINING_STAGES,
    ConfigError,
    StagePlan,
    args_to_cli,
    load_config,
    plan,
)


def torchrun_command(run: StagePlan) -> list[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [
        *launcher,
        "--standalone",
        f"--nproc_per_node={run.nproc_per_node}",
        "-m",
        STAGE_MODULES[run.name],
        *run.cli_args(),
    ]


def run_stage(run: StagePlan, log: Any) -> StageManifest:
    cmd = torchrun_command(run)
    log(f"[{run.name}] {' '.join(cmd)}")
    env = {**os.environ, **run.env}  # the plan's: the hub offline after a prepare stage
    # torchrun sets OMP_NUM_THREADS=1 per process; spread the machine's cores over the processes instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // run.nproc_per_node)))
    started = time.time()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise StageFailed(
            f"stage {run.name} exited with code {proc.returncode} after {time.time() - started:.0f}s; "
            f"re-run the same command to resume from {run.output_dir}'s last checkpoint"
        )
    manifest = verify_stage_output(run.output_dir, run.name)  # the hand-off: nothing downstream trusts less
    log(f"[{run.name}] done in {time.time() - started:.0f}s → {run.output_dir}")
    return manifest


class StageFailed(RuntimeError):
    pass


def changed_args(manifest: StageManifest, planned: dict[str, Any]) -> list[str]:
    """The planned flags a finished stage was run with other values of (`--seed 3 → 5`), as the CLI
    renders them; flags its manifest does not record are not compared."""
    recorded = manifest.inputs.get("args") or {}
    changes = []
    for key in sorted(planned):
        if key not in recorded:
            continue
        was, now = args_to_cli({key: recorded[key]})[1:], args_to_cli({key: planned[key]})[1:]
        if was != now:
            changes.append(f"--{key} {' '.join(was) or 'unset'} → {' '.join(now) or 'unset'}")
    return changes


def stage_accuracy(model_dir: str, dataset: str, eval_args: dict[str, Any]) -> dict[str, float]:
    """Greedy accuracy/format rate of a model folder on the eval split (in-process, for the table)."""
    from trainer.quiet import silence_notices

    silence_notices()  # before transformers loads
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.r1.builtin import resolve_model
    from trainer.r1.data import DataArgs
    from trainer.r1.prompt import PromptArgs, resolve_prompt
    from trainer.r1.scoring import evaluate_model

    path = resolve_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    examples, _ = DataArgs.from_stage_args({"dataset_name": dataset, **eval_args}).load_eval()
    result = evaluate_model(
        model,
        tokenizer,
        examples,
        # The prompt the eval stage would use on this folder (its record; the eval flags win).
        prompter=resolve_prompt(PromptArgs.from_stage_args(eval_args), model_dir, tokenizer),
        max_new_tokens=int(eval_args.get("max_completion_length", 256)),
        batch_size=int(eval_args.get("inference_batch_size", 64)),
    )
    return result.metrics


def plot_grpo(grpo_dir: Path, out_png: Path, start_accuracy: float | None = None) -> Path | None:
    """Reward and accuracy over GRPO steps; `start_accuracy` (the input model's) is drawn at step 0."""
    path = grpo_dir / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    if start_accuracy is not None:
        evals.insert(0, {"step": 0, "eval_accuracy": start_accuracy})
    if not train:
        return None
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    ax_r.plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="reward (mean)")
    ax_r.set_xlabel("GRPO step")
    ax_r.set_ylabel("reward (0 / 1 / 10)")
    ax_r.set_title("Rollout reward")
    ax_r.grid(alpha=0.3)
    ax_a.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="rollout accuracy (sampled)")
    ax_a.plot(
        [r["step"] for r in train], [r["format_rate"] for r in train], label="rollout format rate", alpha=0.6
    )
    if evals:
        ax_a.plot(
            [r["step"] for r in evals],
            [r["eval_accuracy"] for r in evals],
            "o-",
            label="held-out accuracy (greedy)",
        )
    ax_a.set_xlabel("GRPO step")
    ax_a.set_ylim(0, 1.02)
    ax_a.set_title("Accuracy")
    ax_a.grid(alpha=0.3)
    ax_a.legend(loc="lower right")
    return save_figure(fig, out_png, dpi=110)


def save_figure(fig: Any, out_png: Path, dpi: int = 100) -> Path:
    """Lay out, write to a temporary name and rename (never a half-written PNG), and close `fig`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def print_table(rows: list[tuple[str, str, dict[str, float]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="r1-grpo pipeline: held-out accuracy after each stage (greedy)")
    for col in ("stage", "model", "accuracy", "format rate", "mean reward"):
        table.add_column(col, justify="left" if col in ("stage", "model") else "right")
    for stage, model, m in rows:
        table.add_row(
            stage, model, f"{m['accuracy']:.1%}", f"{m['format_rate']:.1%}", f"{m['mean_reward']:.2f}"
        )
    Console(stderr=False).print(table)


def cmd_run(opts: argparse.Namespace) -> int:
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        cfg = load_config(opts.config, {"root": opts.root, "release": opts.release})
        runs = plan(cfg)
    except ConfigError as e:
        print(f"r1-grpo pipeline: error: {e}", file=sys.stderr)
        return 2
    if opts.seed is not None:
        for run in runs:  # every stage: data order, init, sampling
            run.args["seed"] = opts.seed
    started = time.time()
    stage_wall: dict[str, float] = {}  # stages run now (skipped ones are absent)
    upstream_finished, upstream_ran = "", False  # the previous stage: its manifest's created_at, run now?
    for run in runs:
        try:
            manifest = verify_stage_output(run.output_dir, run.name)
        except StageOutputError:
            manifest = None
        changes = changed_args(manifest, run.args) if manifest is not None else []
        if run.output_dir.exists() and (
            upstream_ran or manifest is not None and manifest.created_at < upstream_finished or changes
        ):
            # Made from an older version of its input stage's output, or with other settings: that output
            # and any checkpoints belong to another run, so the stage must start over, not be trusted or
            # resumed. Moved aside, never deleted.
            why = (
                f"run with other settings ({', '.join(changes)})"
                if changes
                else "older than its input stage's output"
            )
            stale = move_aside(run.output_dir)
            log(f"[{run.name}] {why}: moved to {stale}, re-running")
        elif manifest is not None:
            log(f"[{run.name}] complete ({run.output_dir}/r1_stage.json verified): skipped")
            upstream_finished = manifest.created_at
            continue
        try:
            if run.model_from_stage is not None:
                verify_stage_output(run.model_name_or_path, run.model_from_stage)
            stage_started = time.time()
            upstream_finished = run_stage(run, log).created_at
            stage_wall[run.name] = round(time.time() - stage_started, 1)
        except (StageFailed, StageOutputError) as e:
            print(f"r1-grpo pipeline: {e}", file=sys.stderr)
            return 1
        upstream_ran = True

    # Summary: every trained model (and the base) on the eval split, greedy.
    eval_run = next((r for r in runs if r.name == "eval"), None)
    eval_args = dict(eval_run.args) if eval_run else {}
    rows = []
    if not opts.skip_summary:
        base = runs[0].model_name_or_path if runs[0].model_from_stage is None else None
        dataset = cfg.dataset
        if runs[0].name == "prepare":  # the base model and the data as prepared, not from the hub
            base, dataset = str(runs[0].output_dir), rewrite_dataset_name(dataset, str(runs[0].output_dir))
        models = ([("base", base)] if base else []) + [
            (r.name, str(r.output_dir)) for r in runs if r.name in TRAINING_STAGES
        ]
        for stage, model in models:
            rows.append((stage, model, stage_accuracy(model, dataset, eval_args)))
        print_table(rows)
    root = Path(cfg.root) / cfg.release
    grpo_input = next((r.model_name_or_path for r in runs if r.name == "grpo"), None)
    before_grpo = next((m["accuracy"] for _, model, m in rows if model == grpo_input), None)
    png = plot_grpo(root / "grpo", root / "grpo_curves.png", start_accuracy=before_grpo)
    summary = {
        "stages": {stage: m for stage, _, m in rows},
        "seed": opts.seed,
        "wall_s": round(time.time() - started, 1),
        "stage_wall_s": stage_wall,
        "eval": json.loads((root / "eval" / "metrics.json").read_text())
        if (root / "eval" / "metrics.json").exists()
        else None,
    }
    atomic_write_json(root / "summary.json", summary)
    if png:
        log(f"GRPO curves: {png}")
    log(f"summary: {root / 'summary.json'} ({summary['wall_s']:.0f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="r1-grpo pipeline", allow_abbrev=False, description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the enabled stages in order (skipping complete ones)")
    run.add_argument("--config", help="pipeline YAML (default: the built-in trainer/pipeline.yaml)")
    run.add_argument("--root", help="override the config's root folder")
    run.add_argument("--release", help="override the config's release name")
    run.add_argument(
        "--seed",
        type=int,
        help="seed of every stage (data order, initialisation, sampling); overrides the stages' own `seed`",
    )
    run.add_argument(
        "--skip_summary", action="store_true", help="do not evaluate each stage for the summary table"
    )
    sub.add_parser("show", help="print the planned stage commands without running them")
    args = parser.parse_args(argv)
    if args.command == "show":
        for r in plan(load_config(None)):
            print(" ".join(torchrun_command(r)))
        return 0
    return cmd_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
