"""GRPO's side of ``--reward_module`` (:mod:`trainer.r1.reward_module` runs the functions): the helpers
started before the stage, what each rollout's metrics and the run's ``r1_stage.json`` say of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer.r1.reward_module import RewardModule, RewardModuleError, check_specs
from trainer.r1.rewards import REWARD_FUNCS
from trainer.runtime import ArgsError, all_reduce_

_COUNTERS = ("calls", "timeouts", "errors")


def check_flags(reward_funcs: Sequence[str], specs: Sequence[str] | None, timeout_s: float) -> None:
    """--reward_funcs with --reward_module and its timeout, checked without starting anything: every name
    built in or a module's (named by its function), every module used, no name twice (ArgsError)."""
    try:
        modules = check_specs(list(specs or []), set(REWARD_FUNCS))
    except RewardModuleError as e:
        raise ArgsError(str(e)) from None
    if not timeout_s > 0:
        raise ArgsError(f"--reward_module_timeout_seconds must be > 0, got {timeout_s}")
    unknown = [n for n in reward_funcs if n not in REWARD_FUNCS and n not in modules]
    if unknown or not reward_funcs:
        raise ArgsError(
            f"--reward_funcs {unknown or '(empty)'}: known reward functions are "
            f"{', '.join([*REWARD_FUNCS, *modules])} (a --reward_module is named by its function)"
        )
    for spec, name in zip(specs or [], modules, strict=True):
        if name not in reward_funcs:
            raise ArgsError(
                f"--reward_module {spec}: add {name!r} to --reward_funcs (and its weight to --reward_weights) "
                "to use it"
            )
    if len(set(reward_funcs)) != len(reward_funcs):
        raise ArgsError(f"--reward_funcs {list(reward_funcs)}: a reward function is listed twice")


def start_modules(specs: Sequence[str], timeout_s: float) -> dict[str, RewardModule]:
    """The ``--reward_module`` functions by name, each helper started and its function checked; a bad one
    is :class:`~trainer.runtime.ArgsError` (exit 2) naming the flag and the file."""
    modules: dict[str, RewardModule] = {}
    for spec in specs:
        module = RewardModule(spec, timeout_s)
        try:
            module.start()
        except RewardModuleError as e:
            raise ArgsError(str(e)) from None
        modules[module.name] = module
    return modules


class RolloutCounts:
    """One rollout's module rewards: their sum over every completion scored (dynamic-sampling refills
    included) and the timeouts and errors among those calls, as ``module:<name>:<what>`` entries of
    ``Rollout.stats``, which the step's metrics sum over the ranks (:func:`step_metrics`)."""

    def __init__(self, modules: dict[str, RewardModule]):
        self.modules = modules
        self.before = {name: (m.stats.timeouts, m.stats.errors) for name, m in modules.items()}
        self.sums = {name: [0.0, 0.0] for name in modules}  # reward sum, completions scored

    def add(self, per_func: dict[str, list[float]]) -> None:
        for name, sums in self.sums.items():
            sums[0] += sum(per_func[name])
            sums[1] += len(per_func[name])

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, m in self.modules.items():
            out[f"module:{name}:sum"], out[f"module:{name}:scored"] = self.sums[name]
            out[f"module:{name}:timeouts"] = float(m.stats.timeouts - self.before[name][0])
            out[f"module:{name}:errors"] = float(m.stats.errors - self.before[name][1])
        return out


def step_metrics(summed: dict[str, float]) -> dict[str, float]:
    """``reward_<name>_mean``, ``_timeouts`` and ``_errors`` from the rank-summed :class:`RolloutCounts`."""
    out: dict[str, float] = {}
    for name in sorted({k.split(":")[1] for k in summed if k.startswith("module:")}):
        out[f"reward_{name}_mean"] = summed[f"module:{name}:sum"] / max(summed[f"module:{name}:scored"], 1.0)
        out[f"reward_{name}_timeouts"] = summed[f"module:{name}:timeouts"]
        out[f"reward_{name}_errors"] = summed[f"module:{name}:errors"]
    return out


def run_totals(modules: dict[str, RewardModule]) -> dict[str, float]:
    """``reward_<name>_{calls,timeouts,errors}_total`` of this run, summed over the ranks (every rank calls
    it: a collective)."""
    if not modules:
        return {}
    import torch

    counts = [float(getattr(m.stats, c)) for m in modules.values() for c in _COUNTERS]
    summed = all_reduce_(torch.tensor(counts, dtype=torch.float64)).tolist()
    keys = [f"reward_{name}_{c}_total" for name in modules for c in _COUNTERS]
    return dict(zip(keys, summed, strict=True))


def inputs_record(modules: dict[str, RewardModule]) -> dict[str, Any]:
    """``inputs.reward_modules`` of r1_stage.json: each function's flag value and its file's sha256."""
    from trainer.contract.output import sha256_file

    return {name: {"spec": m.spec, "sha256": sha256_file(m.path)} for name, m in modules.items()}
