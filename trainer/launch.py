"""`r1-grpo launch [--termination-grace-period-seconds N] -- torchrun …`: the first process of a stage pod.

Kubernetes stops a pod by sending SIGTERM to the container's first process and SIGKILL to all of its
processes `terminationGracePeriodSeconds` later. torchrun (torch 2.5) answers SIGTERM by passing it on to
its workers and SIGKILLs them 30 s later, whatever the pod allows (torch.distributed.elastic's
`PContext.close(death_sig, timeout=30)`, called by the agent's `_shutdown` with the default timeout), so
a preempted trainer whose current step and checkpoint need minutes is cut off before its checkpoint is
complete.

This launcher runs the command (torchrun) as its child. On SIGTERM it signals torchrun's workers itself,
each one's process group as torchrun would (torchrun starts every worker in a session of its own), and not
torchrun: the trainers finish their step, save and exit 143, and torchrun, seeing its workers gone, ends.
Workers still running when the grace period less a margin (:func:`worker_wait_seconds`) has passed are
killed, so the pod's log says so before the kubelet's SIGKILL; torchrun, should it outlive the whole grace
period, is killed then, as the kubelet would. A SIGTERM that comes before torchrun has started its workers
goes to torchrun (there is nothing to save yet).

Exit code: the command's; after a SIGTERM, 143 unless the command succeeded (the stage finished just
then), so a preempted pod reads as terminated (torchrun itself exits 1 when a worker exits 143). A trainer
that refused its input (trainer/contract/exits.py) makes the launcher exit 2 with the trainer's error line
as the container's termination message, so the controller fails the run instead of retrying it.
As the first process of a container it also reaps orphaned processes, which would otherwise stay zombies.
Standard library only (and trainer.contract.exits): it starts before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from trainer.contract.exits import BAD_INPUT_EXIT_CODE, BAD_INPUT_FILE_ENV

KUBERNETES_DEFAULT_GRACE_S = 30  # a pod's terminationGracePeriodSeconds when it sets none
MARGIN_S = 10.0
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM  # 143, the trainer's PREEMPTED_EXIT_CODE too
POLL_S = 0.1
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes' default terminationMessagePath


def worker_wait_seconds(grace_s: float) -> float:
    """How long the workers get after SIGTERM: the pod's grace period less 10 s (a quarter of it when it is
    under 40 s), which the launcher keeps to kill them and exit before the kubelet kills the pod."""
    return grace_s - min(MARGIN_S, grace_s / 4)


def _say(message: str) -> None:
    print(f"r1-grpo launch: {message}", file=sys.stderr, flush=True)


def children(pid: int) -> list[tuple[int, int]]:
    """(pid, process group) of each live child of ``pid``, from /proc."""
    found = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                    stat = f.read()
            except OSError:  # exited meanwhile
                continue
            # `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses, so split after the last ')'.
            state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
            if int(ppid) == pid and state != "Z":
                found.append((int(entry.name), int(pgrp)))
    return sorted(found)


def _signal(pid: int, pgrp: int, sig: int) -> None:
    try:
        if pgrp == pid:  # a session/group leader (a torchrun worker): its whole group, as torchrun does
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by a signal: 128 + its number, as a shell reports it


def run(command: Sequence[str], grace_s: float, termination_log: Path | None = None) -> int:
    """Run ``command``; on SIGTERM give its workers ``worker_wait_seconds(grace_s)``. The exit code."""
    wait_s = worker_wait_seconds(grace_s)
    terminated_at: list[float] = []  # set by the handler; acted on by the loop below

    def on_sigterm(signum: int, frame: object) -> None:
        if not terminated_at:
            terminated_at.append(time.monotonic())

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C in a terminal reaches torchrun too (same process group); the launcher waits for it to end.
    # A Python handler, not SIG_IGN: an ignored signal would stay ignored in the command after exec.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    scratch = tempfile.mkdtemp(prefix="r1-grpo-launch-")
    bad_input = Path(scratch) / "bad-input"
    try:
        proc = subprocess.Popen(list(command), env={**os.environ, BAD_INPUT_FILE_ENV: str(bad_input)})
    except OSError as e:
        _say(f"error: cannot run {command[0]!r}: {e}")
        return 127
    try:
        code = _supervise(proc, command, grace_s, wait_s, terminated_at)
        return _bad_input_verdict(code, bad_input, termination_log) if not terminated_at else code
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _bad_input_verdict(code: int, bad_input: Path, termination_log: Path | None) -> int:
    """A failed command whose trainer reported bad input exits 2 (torchrun itself exits 1 when a worker
    fails), with the trainer's error line as the container's termination message."""
    if code == 0 or not bad_input.exists():
        return code
    message = bad_input.read_text(encoding="utf-8", errors="replace").strip()
    _say(f"the trainer reported bad input (exit code {BAD_INPUT_EXIT_CODE}, not retried): {message}")
    if termination_log is not None:
        try:  # the kubelet's file for the container's termination message (at most 4 KiB are kept)
            termination_log.write_text(message[-4000:] + "\n", encoding="utf-8")
        except OSError as e:
            _say(f"cannot write the termination message to {termination_log}: {e}")
    return BAD_INPUT_EXIT_CODE


def _supervise(
    proc: subprocess.Popen, command: Sequence[str], grace_s: float, wait_s: float, terminated_at: list[float]
) -> int:
    forwarded_to: list[int] = []
    workers_killed = command_killed = False
    code: int | None = None
    while code is None:
        # Reap every child that ended, torchrun's orphans included (a container's first process must).
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == proc.pid:
                code = _exit_code(status)
                proc.returncode = code  # reaped here: Popen must not wait for it again
        if code is not None:
            break
        now = time.monotonic()
        if terminated_at and not forwarded_to:
            workers = children(proc.pid)
            targets = workers or [(proc.pid, -1)]
            for pid, pgrp in targets:
                _signal(pid, pgrp, signal.SIGTERM)
            forwarded_to = [pid for pid, _ in targets]
            whom = f"workers {forwarded_to}" if workers else f"{command[0]} (no workers yet)"
            _say(f"SIGTERM: passed on to {whom}; they have {wait_s:.0f} s to save and exit")
        if forwarded_to and not workers_killed and now - terminated_at[0] >= wait_s:
            workers = children(proc.pid)
            if workers:
                _say(
                    f"workers {[p for p, _ in workers]} still running {wait_s:.0f} s after SIGTERM: killing them"
                )
            for pid, pgrp in workers:
                _signal(pid, pgrp, signal.SIGKILL)
            workers_killed = True
        if workers_killed and not command_killed and now - terminated_at[0] >= grace_s:
            proc.kill()  # what the kubelet does now; torchrun normally ended soon after its workers
            command_killed = True
        time.sleep(POLL_S)
    if terminated_at:
        _say(f"{command[0]} exited {code} {time.monotonic() - terminated_at[0]:.1f} s after SIGTERM")
        return code if code == 0 else TERMINATED_EXIT_CODE
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="r1-grpo launch",
        description="Run a command (torchrun) so that SIGTERM gives its workers the pod's grace period to "
        "save a checkpoint and exit, instead of torchrun's fixed 30 s.",
    )
    parser.add_argument(
        "--termination-grace-period-seconds",
        type=int,
        default=KUBERNETES_DEFAULT_GRACE_S,
        metavar="N",
        help="the pod's terminationGracePeriodSeconds: the time between SIGTERM and the kubelet's SIGKILL "
        f"(default {KUBERNETES_DEFAULT_GRACE_S}, Kubernetes' default). The workers get it less "
        f"{MARGIN_S:.0f} s (a quarter of it when under {4 * MARGIN_S:.0f} s).",
    )
    parser.add_argument(
        "--termination-message-path",
        default=TERMINATION_LOG,
        metavar="FILE",
        help="where the trainer's bad-input error line goes when it exits 2 (default %(default)s, the "
        "container's terminationMessagePath; only written when the file exists, as the kubelet makes it)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after `--`")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (r1-grpo launch [flags] -- torchrun …)")
    if args.termination_grace_period_seconds < 0:
        parser.error(
            f"--termination-grace-period-seconds must be 0 or more, got {args.termination_grace_period_seconds}"
        )
    termination_log = Path(args.termination_message_path)
    return run(
        command, args.termination_grace_period_seconds, termination_log if termination_log.is_file() else None
    )


if __name__ == "__main__":
    raise SystemExit(main())
