"""Shared test fixtures: an isolated cache, the tiny model, a small local dataset and stage runners.

Every cache the code under test can write to (`R1_GRPO_CACHE` for the built-in model, `HF_HOME` for the
`datasets` Arrow cache) points into one temporary folder for the whole session, so tests never touch
`~/.cache`. The variables are set in `pytest_configure`, before any test module is imported, because
`datasets` reads its cache location at import time.

The stage runners start the real CLIs in subprocesses (`torchrun --standalone --nproc_per_node=N -m
trainer.<stage>` or a plain `python -m trainer.<stage>`), one thread per process: the machine running the
suite has few cores and the processes of one run share them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

_ISOLATED_ENV = ("R1_GRPO_CACHE", "HF_HOME")
_saved_env: dict[str, str | None] = {}
_session_root: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _session_root
    _session_root = Path(tempfile.mkdtemp(prefix="r1-grpo-tests-"))
    for name in _ISOLATED_ENV:
        _saved_env[name] = os.environ.get(name)
    os.environ["R1_GRPO_CACHE"] = str(_session_root / "r1-grpo-cache")
    os.environ["HF_HOME"] = str(_session_root / "hf-home")


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if _session_root is not None:
        shutil.rmtree(_session_root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Running the stage CLIs


@dataclass
class StageResult:
    returncode: int
    output: str  # stdout and stderr together, in order
    command: list[str]

    def describe(self) -> str:
        tail = self.output[-6000:]
        return f"$ {' '.join(self.command)}\nexit code {self.returncode}\n--- output (tail) ---\n{tail}"


class StageRunner:
    """Builds and runs stage commands the way a user (or a PyTorchJob pod) would."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.bin = Path(sys.executable).parent

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # One thread per process: runs are small and several processes share few cores.
        env.update(
            OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"
        )
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)  # a leftover from the calling process would make a plain run join a group
        return env

    def command(self, module: str, argv: list[str], nproc: int | None = None) -> list[str]:
        if nproc is None:
            return [sys.executable, "-m", module, *argv]
        torchrun = self.bin / "torchrun"
        launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
        # --standalone: a private rendezvous on a free port, so concurrent runs cannot collide.
        return [*launcher, "--standalone", f"--nproc_per_node={nproc}", "-m", module, *argv]

    def run(
        self, module: str, argv: list[str], nproc: int | None = None, timeout: float = 600
    ) -> StageResult:
        """Run to the end; past ``timeout`` seconds the run is stopped, its workers too, and the test fails
        with its output (a hang is a failure, not a stuck suite)."""
        cmd = self.command(module, argv, nproc)
        proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            output = _stop_tree(proc)
            tail = output[-6000:]
            raise AssertionError(
                f"$ {' '.join(cmd)}\nstill running after {timeout:g} s: stopped\n--- output (tail) ---\n{tail}"
            ) from None
        return StageResult(proc.returncode, output, cmd)

    def run_script(self, script: str, argv: list[str], timeout: float = 600) -> StageResult:
        """A console script installed with the package (e.g. `r1-grpo`)."""
        cmd = [str(self.bin / script), *argv]
        proc = subprocess.run(
            cmd,
            cwd=self.workdir,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        return StageResult(proc.returncode, proc.stdout, cmd)


def _stop_tree(proc: subprocess.Popen) -> str:
    """SIGKILL a run and every process under it (torchrun starts its workers in sessions of their own, so
    they would outlive it); its output so far."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    output, _ = proc.communicate()
    return output


@pytest.fixture(scope="session")
def stage_runner(tmp_path_factory: pytest.TempPathFactory) -> StageRunner:
    # Runs start in an empty folder, so a relative path in a command cannot write into the repository.
    return StageRunner(tmp_path_factory.mktemp("stage-cwd"))


# ---------------------------------------------------------------------------------------------
# Models and data


def addition_rows() -> list[dict[str, str]]:
    """Single-digit additions in the built-in schema: short enough to fit 24 completion tokens."""
    return [
        {"question": f"Compute {a} + {b}.", "reasoning": f"{a} + {b} = {a + b}", "answer": str(a + b)}
        for a in range(1, 10)
        for b in range(1, 10)
    ]


@pytest.fixture(scope="session")
def arith_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local .jsonl file (built-in schema, 81 rows); one file serves both splits."""
    path = tmp_path_factory.mktemp("data") / "additions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in addition_rows()), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """`builtin:tiny`, built once by `trainer.r1.builtin.build_tiny_model` into the session's cache."""
    from trainer.r1.builtin import cache_root, resolve_model

    path = Path(resolve_model("builtin:tiny"))
    assert path.is_relative_to(cache_root()), path
    return path


@pytest.fixture(scope="session")
def warm_model_dir(
    tiny_model_dir: Path,
    arith_jsonl: Path,
    stage_runner: StageRunner,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The tiny model after a short single-process SFT on the additions: it writes the R1 format often
    but not always, so GRPO groups get rewards that differ (a random model scores 0 everywhere, which
    makes every advantage zero and leaves the weights untouched)."""
    out = tmp_path_factory.mktemp("warm") / "sft"
    result = stage_runner.run(
        "trainer.sft",
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset_name",
            str(arith_jsonl),
            "--output_dir",
            str(out),
            "--max_steps",
            "60",
            "--per_device_train_batch_size",
            "16",
            "--learning_rate",
            "3e-3",
            "--lr_scheduler_type",
            "constant",
            "--save_steps",
            "0",
            "--logging_steps",
            "20",
            "--report_to",
            "none",
            "--seed",
            "0",
        ],
    )
    assert result.returncode == 0, result.describe()
    return out


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory):
    """``get(family)``: the folder of that family's small random-init model with its real tokenizer and
    generation config (:mod:`tests.support.families`), built once per session on first use."""
    from tests.support import families

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = families.build(family, tmp_path_factory.mktemp("families") / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def controlplane_build() -> Path:
    """The test control plane's build (tests/controlplane/build.sh): binaries and the operator's manifests.

    Built from the pinned Go modules on first use and cached outside the repository (`make test` builds
    it before pytest starts). R1_GRPO_SKIP_CLUSTER=1 skips the tests that need it; without that, a machine
    that cannot build it fails them, saying why.
    """
    from tests.controlplane.cluster import ensure_binaries

    return _cached_build(
        ensure_binaries, "the test control plane (and the operator's CRD)", "tests/controlplane"
    )


@pytest.fixture(scope="session")
def jobapi_build() -> Path:
    """The job-API controllers of the test control plane (tests/controlplane-jobs/build.sh): the JobSet
    controller, the Kubeflow Trainer v2 controller manager and Kueue, with their CRDs, webhook
    configurations and the Trainer's runtimes, from the pinned Go modules; built on first use and cached
    apart from controlplane_build. R1_GRPO_SKIP_CLUSTER=1 skips the tests that need it."""
    from tests.controlplane.cluster import ensure_job_binaries

    return _cached_build(
        ensure_job_binaries, "the job-API controllers (and their CRDs)", "tests/controlplane-jobs"
    )


def _cached_build(ensure, what: str, folder: str) -> Path:
    """``ensure()``'s build folder; skipped with R1_GRPO_SKIP_CLUSTER=1, else a failed build fails the test
    saying what it needs."""
    if os.environ.get("R1_GRPO_SKIP_CLUSTER") == "1":
        pytest.skip(f"R1_GRPO_SKIP_CLUSTER=1: {what}: not built")
    try:
        return ensure()
    except subprocess.CalledProcessError as e:
        build_error = e.returncode
    pytest.fail(
        f"{what} could not be built ({folder}/build.sh exited {build_error}; its message is above): it needs "
        "Go >= 1.26 and the Go module proxy the first time. Set R1_GRPO_SKIP_CLUSTER=1 to skip the tests "
        "that need it.",
        pytrace=False,
    )


# The session's control plane is stopped right after the last test that uses it: its idle apiserver, etcd
# and controllers take ~20% of a core, which the training tests after it (half the suite) would pay for.
_session_planes: list = []
_LAST_PLANE_USER = pytest.StashKey[str]()


def _build_tier(module_fixtures: set[str]) -> int:
    """0: a module that needs no control-plane build, 1: the Kubernetes binaries, 2: also the job-API ones."""
    if "jobapi_build" in module_fixtures:
        return 2
    return 1 if "controlplane_build" in module_fixtures else 0


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: the last test that really runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Whole modules in build order (stable otherwise): on a cold machine tests/run_suite.sh builds the control
    # plane in the background while the modules that need no cluster run; module-scoped fixtures stay whole.
    module_fixtures: dict[str, set[str]] = {}
    for item in items:
        module_fixtures.setdefault(item.nodeid.split("::")[0], set()).update(
            getattr(item, "fixturenames", ())
        )
    items.sort(key=lambda item: _build_tier(module_fixtures[item.nodeid.split("::")[0]]))
    users = [item.nodeid for item in items if "control_plane" in getattr(item, "fixturenames", ())]
    config.stash[_LAST_PLANE_USER] = users[-1] if users else ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield
    if item.nodeid == item.config.stash.get(_LAST_PLANE_USER, "") and _session_planes:
        _session_planes.pop().stop()  # the fixture's own stop at the session's end is then a no-op


@pytest.fixture(scope="session")
def control_plane(controlplane_build: Path, request: pytest.FixtureRequest):
    """A real Kubernetes control plane on loopback (tests/controlplane), started once per session from
    `controlplane_build`. The processes' logs are kept (path printed) when any test of the session failed.
    """
    for cp in _running_control_plane(request, "r1-grpo-controlplane-"):
        _session_planes.append(cp)
        yield cp


@pytest.fixture(scope="module")  # stopped after its module: idle controllers cost CPU
def jobs_plane(jobapi_build: Path, controlplane_build: Path, request: pytest.FixtureRequest):
    """A control plane of its own with the job-API controllers (JobSet, Trainer v2, Kueue) and a 64-GPU
    node `tj-gpu-0`; the shared `control_plane` stays without them, so its tests do not pay for them."""
    yield from _running_control_plane(request, "r1-grpo-controlplane-jobs-", jobs=True, timeout=240, gpus=64)


def _running_control_plane(
    request: pytest.FixtureRequest, prefix: str, jobs: bool = False, timeout=120.0, gpus=0
):
    from tests.controlplane.cluster import ControlPlane

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    cp = ControlPlane(workdir, jobs=jobs).start(timeout=timeout)
    try:
        if gpus:
            cp.create_gpu_node("tj-gpu-0", gpus=gpus)
        yield cp
    finally:
        cp.stop()
        if request.session.testsfailed:
            print(f"\ncontrol plane logs kept in {cp.log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def k8s_namespace(control_plane, request: pytest.FixtureRequest) -> str:
    """A fresh namespace per test (tests share the control plane, never each other's objects)."""
    import hashlib

    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    name = f"t-{digest}-{os.getpid() % 10000}"
    control_plane.create_namespace(name)
    return name
