"""`r1-grpo launch`, the stage pods' first process, with real torchrun and real worker processes.

A pod is stopped by SIGTERM to its first process and SIGKILL `terminationGracePeriodSeconds` later. The
workers here (tests/support/slow_stop_worker.py) take a set time to stop after SIGTERM, as a trainer's
last step and checkpoint do, and leave `saved-<rank>` only when they were allowed to finish. The trainer
itself is run through the launcher in tests/test_sft.py (SIGTERM, checkpoint, resume).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.launch import TERMINATED_EXIT_CODE, worker_wait_seconds

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER = REPO / "tests" / "support" / "slow_stop_worker.py"
TORCHRUN_KILLS_AFTER_S = 30  # torch 2.5's PContext.close(timeout=30)


def launch_argv(grace_s: int) -> list[str]:
    return [str(BIN / "r1-grpo"), "launch", f"--termination-grace-period-seconds={grace_s}", "--"]


def torchrun_argv(folder: Path, stop_s: float, nproc: int = 2) -> list[str]:
    return [
        str(BIN / "torchrun"),
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        str(folder),
        str(stop_s),
    ]


def env() -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(name, None)
    return out


@dataclass
class Stopped:
    returncode: int
    seconds: float  # from SIGTERM to the first process's exit
    log: str
    folder: Path

    def marks(self, kind: str) -> list[str]:
        return sorted(p.name for p in self.folder.glob(f"{kind}-*"))


class Pod:
    """The first process of a pod (its own session, as in a container), stopped the way the kubelet does."""

    def __init__(self, argv: list[str], folder: Path, nproc: int = 2):
        folder.mkdir(parents=True)
        self.folder, self.nproc = folder, nproc
        self.log_path = folder.parent / f"{folder.name}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                argv, cwd=folder, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 120) -> list[int]:
        """The workers' pids, once each has written ready-<rank> (its SIGTERM handler is installed)."""
        deadline = time.monotonic() + timeout
        ready = [self.folder / f"ready-{rank}" for rank in range(self.nproc)]
        while not all(p.exists() and p.read_text() for p in ready):
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.log_path.read_text()}"
            assert time.monotonic() < deadline, (
                f"workers not ready in {timeout} s:\n{self.log_path.read_text()}"
            )
            time.sleep(0.1)
        return [int(p.read_text()) for p in ready]

    def sigterm(self) -> float:
        self.proc.send_signal(signal.SIGTERM)  # to the first process only, as the kubelet sends it
        return time.monotonic()

    def wait(self, since: float, timeout: float = 120) -> Stopped:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return Stopped(rc, time.monotonic() - since, self.log_path.read_text(), self.folder)


def test_workers_get_the_pods_grace_period_where_torchrun_alone_kills_them_at_30_s(tmp_path: Path) -> None:
    """The same two workers, needing 40 s to stop; SIGTERM to each pod's first process at the same time."""
    stop_s, grace_s = 40, 60
    assert TORCHRUN_KILLS_AFTER_S < stop_s < worker_wait_seconds(grace_s)
    plain = Pod(torchrun_argv(tmp_path / "plain", stop_s), tmp_path / "plain")
    launched = Pod(launch_argv(grace_s) + torchrun_argv(tmp_path / "launched", stop_s), tmp_path / "launched")
    plain.wait_ready()
    workers = launched.wait_ready()
    t_plain, t_launched = plain.sigterm(), launched.sigterm()
    a, b = plain.wait(t_plain), launched.wait(t_launched)
    print(f"SIGTERM to exit: torchrun alone {a.seconds:.1f} s, through the launcher {b.seconds:.1f} s")

    # torchrun alone: the workers got SIGTERM, began to save and were SIGKILLed 30 s later.
    assert a.marks("stopping") == ["stopping-0", "stopping-1"], a.log
    assert a.marks("saved") == [], a.log
    # (killed before their 40 s were up: no saved-* above; a lower bound cannot flake on a loaded machine)
    assert a.returncode != 0 and a.seconds > TORCHRUN_KILLS_AFTER_S - 1, (a.seconds, a.log)
    assert "via 15, forcefully exiting via 9" in a.log, a.log  # torchrun: SIGTERM, then SIGKILL

    # Through the launcher: the workers finished (40 s) and exited 143; the pod exits 143, terminated.
    assert b.marks("saved") == ["saved-0", "saved-1"], b.log
    assert b.returncode == TERMINATED_EXIT_CODE, b.log
    # Not killed at the launcher's deadline (45 s): no "still running" and no SIGKILL in the log, below.
    assert stop_s <= b.seconds, (b.seconds, b.log)
    wait_s = worker_wait_seconds(grace_s)
    assert (
        f"r1-grpo launch: SIGTERM: passed on to workers {sorted(workers)}; they have {wait_s:.0f} s" in b.log
    )
    assert "exitcode  : 143" in b.log  # torchrun's own summary: its workers exited 143, not killed
    assert "SIGKILL" not in b.log and "still running" not in b.log, b.log


def test_workers_still_running_after_the_wait_are_killed(tmp_path: Path) -> None:
    grace_s = 8  # the workers get 6 s (a quarter kept back) and need 60
    pod = Pod(launch_argv(grace_s) + torchrun_argv(tmp_path / "w", 60), tmp_path / "w")
    workers = pod.wait_ready()
    stopped = pod.wait(pod.sigterm())
    assert stopped.marks("stopping") == ["stopping-0", "stopping-1"] and stopped.marks("saved") == []
    assert stopped.returncode == TERMINATED_EXIT_CODE, stopped.log
    # Killed at 6 s (the log line below); torchrun, seeing them gone, ends by itself: a hang guard only,
    # well under the workers' 60 s (torchrun's and the launcher's exit take ~1 s on an idle machine).
    assert worker_wait_seconds(grace_s) <= stopped.seconds < 40, (stopped.seconds, stopped.log)
    assert f"workers {sorted(workers)} still running 6 s after SIGTERM: killing them" in stopped.log
    for pid in workers:  # gone, not left behind as orphans
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.parametrize(("on_sigterm_exit", "launcher_exit"), [(143, 143), (1, 143), (0, 0)])
def test_a_command_without_workers_gets_the_sigterm_itself(
    tmp_path: Path, on_sigterm_exit: int, launcher_exit: int
) -> None:
    """Before torchrun has started its workers there is nothing to save: the SIGTERM goes to torchrun. The
    launcher exits 143 after a SIGTERM unless the command succeeded (a stage that finished just then)."""
    script = (
        "import os, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda s, f: os._exit({on_sigterm_exit}))\n"
        "open('ready-0', 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    pod = Pod(launch_argv(600) + [sys.executable, "-c", script], tmp_path / "c", nproc=1)
    (pid,) = pod.wait_ready()
    stopped = pod.wait(pod.sigterm())
    assert stopped.returncode == launcher_exit, stopped.log
    assert f"SIGTERM: passed on to {sys.executable} (no workers yet)" in stopped.log
    # It exited on the SIGTERM, not after its 60 s sleep (30 s: a hang guard with a loaded machine's margin).
    assert f"{sys.executable} exited {on_sigterm_exit} " in stopped.log and stopped.seconds < 30


@pytest.mark.parametrize(
    ("script", "code"),
    [
        ("raise SystemExit(0)", 0),
        ("raise SystemExit(3)", 3),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137),
    ],
)
def test_exit_code_is_the_commands_without_sigterm(tmp_path: Path, script: str, code: int) -> None:
    proc = subprocess.run(
        launch_argv(600) + [sys.executable, "-c", script],
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == code, proc.stderr
    assert "r1-grpo launch" not in proc.stderr  # nothing to say when nobody stopped it


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--termination-grace-period-seconds=600"], "no command given"),
        (["--termination-grace-period-seconds=-1", "--", "true"], "must be 0 or more, got -1"),
        (["--termination-grace-period-seconds=10m", "--", "true"], "invalid int value: '10m'"),
    ],
)
def test_bad_flags(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [str(BIN / "r1-grpo"), "launch", *argv], env=env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "r1-grpo launch: error:" in proc.stderr and message in proc.stderr, (
        proc.stderr
    )


def test_missing_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        launch_argv(30) + [str(tmp_path / "nope")], env=env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 127 and f"cannot run '{tmp_path / 'nope'}'" in proc.stderr, proc.stderr


def test_worker_wait_keeps_a_margin_for_the_launcher() -> None:
    assert worker_wait_seconds(600) == 590  # the chart's default
    assert worker_wait_seconds(30) == 22.5  # Kubernetes' default: a quarter kept back under 40 s
    assert worker_wait_seconds(0) == 0


@pytest.mark.slow
def test_a_trainer_refusing_its_flags_under_torchrun_makes_the_pod_exit_2_with_the_error_line(
    tmp_path: Path,
) -> None:
    """torchrun exits 1 whatever its workers' codes; the launcher turns the trainer's bad-input report into
    exit 2 and the container's termination message, which the controller reads to fail the run at once."""
    termination_log = tmp_path / "termination-log"
    termination_log.write_text("")  # the kubelet creates it; the launcher only writes an existing file
    argv = [
        str(BIN / "r1-grpo"), "launch", f"--termination-message-path={termination_log}", "--",
        str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--module", "trainer.sft",
        "--dataset_name", "builtin:arith", "--model_name_or_path", "builtin:tiny",
        "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "three",
    ]  # fmt: skip
    proc = subprocess.run(argv, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    error = "r1-grpo sft: error: argument --num_train_epochs/--num-train-epochs: invalid float value: 'three'"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert termination_log.read_text() == error + "\n"
    assert (
        f"r1-grpo launch: the trainer reported bad input (exit code 2, not retried): {error}" in proc.stderr
    )
    # a failure that is not bad input keeps torchrun's code, and leaves the termination message alone
    termination_log.write_text("")
    crash = [*argv[:4], sys.executable, "-c", "raise SystemExit(1)"]
    assert subprocess.run(crash, env=env(), cwd=tmp_path, capture_output=True).returncode == 1
    assert termination_log.read_text() == ""
