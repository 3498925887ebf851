"""The README's main job (`r1-grpo pipeline run`, the built-in default) for several seeds, as a new user runs it.

For each seed (and each torch CPU kernel path asked for) it runs the whole pipeline into its own release
folder, `runs/bench-demo/seed<S>-<kernels>`, and reads that run's `summary.json`. Then it prints one table:
seed, kernel path, held-out greedy accuracy after SFT and after GRPO, the gain (GRPO - SFT, in points, the
baseline being the SFT model of the same run), wall time per stage and in all, and the machine's CPU model.
A finished run is not repeated (the pipeline skips complete stages); `--fresh` moves old runs aside first.

    python bench/demo.py [--seeds 1 2 3] [--kernels native avx2] [--root runs/bench-demo] [--fresh]
                         [--config pipeline.yaml]

`--kernels`: `native` leaves torch's choice (the widest the CPU has); `avx2` or `default` sets
ATEN_CPU_CAPABILITY, so one machine checks the recipe against another rounding behaviour (an AVX-512 machine
running its AVX2 kernels, an AVX2 machine its non-vectorised ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.contract.output import move_aside  # noqa: E402

KERNELS = ("native", "avx2", "avx512", "default")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_env(kernels: str) -> dict[str, str]:
    """This process's environment with torch's CPU kernel path set to `kernels` (`native`: torch's choice)."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if kernels != "native":
        env["ATEN_CPU_CAPABILITY"] = kernels
    return env


def torch_capability(kernels: str) -> str:
    """The kernel path torch really uses under `kernels` (it falls back when the CPU lacks one)."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run(
        [sys.executable, "-c", probe], env=kernel_env(kernels), capture_output=True, text=True, check=True
    ).stdout.strip()


def run_pipeline(root: Path, release: str, seed: int, kernels: str, fresh: bool, config: str | None) -> dict:
    folder = root / release
    if fresh and folder.exists():
        print(f"moved {folder} to {move_aside(folder)}", flush=True)
    cli = Path(sys.executable).with_name("r1-grpo")
    cmd = [str(cli), "pipeline", "run", "--root", str(root), "--release", release, "--seed", str(seed)]
    cmd += ["--config", config] if config else []
    print(
        f"$ {'ATEN_CPU_CAPABILITY=' + kernels + ' ' if kernels != 'native' else ''}{' '.join(cmd)}",
        flush=True,
    )
    started = time.time()
    proc = subprocess.run(cmd, env=kernel_env(kernels), cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"bench/demo.py: the pipeline for seed {seed} ({kernels}) exited {proc.returncode}")
    summary = json.loads((folder / "summary.json").read_text())
    summary["bench_wall_s"] = round(time.time() - started, 1)
    return summary


def table(rows: list[dict]) -> str:
    head = ("seed", "kernels", "SFT acc", "GRPO acc", "gain (pts)", "sft s", "grpo s", "eval s", "total s")
    lines = [head]
    for r in rows:
        s = r["summary"]
        sft, grpo = s["stages"]["sft"]["accuracy"], s["stages"]["grpo"]["accuracy"]
        wall = s.get("stage_wall_s", {})
        lines.append(
            (
                str(r["seed"]),
                r["kernels"],
                f"{sft:.1%}",
                f"{grpo:.1%}",
                f"{100 * (grpo - sft):+.1f}",
                *(f"{wall[k]:.0f}" if k in wall else "skipped" for k in ("sft", "grpo", "eval")),
                f"{s['wall_s']:.0f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=["native"])
    parser.add_argument("--root", default="runs/bench-demo")
    parser.add_argument("--config", help="pipeline YAML (default: the built-in one, the README's main job)")
    parser.add_argument("--fresh", action="store_true", help="move earlier runs of these seeds aside first")
    args = parser.parse_args(argv)
    root = (REPO / args.root).resolve()
    rows = []
    for kernels in args.kernels:
        capability = torch_capability(kernels)
        for seed in args.seeds:
            summary = run_pipeline(root, f"seed{seed}-{kernels}", seed, kernels, args.fresh, args.config)
            rows.append({"seed": seed, "kernels": f"{kernels} ({capability})", "summary": summary})
    print()
    print(
        f"r1-grpo demo, {len(rows)} runs on {cpu_model()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}"
    )
    print(table(rows))
    gains = [
        r["summary"]["stages"]["grpo"]["accuracy"] - r["summary"]["stages"]["sft"]["accuracy"] for r in rows
    ]
    worst = min(rows, key=lambda r: r["summary"]["stages"]["grpo"]["accuracy"])
    print(
        f"worst GRPO accuracy {worst['summary']['stages']['grpo']['accuracy']:.1%} (seed {worst['seed']}, "
        f"{worst['kernels']}); smallest gain {100 * min(gains):+.1f} points; GRPO/SFT accuracy ratio "
        + ", ".join(
            f"{r['summary']['stages']['grpo']['accuracy'] / max(r['summary']['stages']['sft']['accuracy'], 1e-9):.2f}"
            for r in rows
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
