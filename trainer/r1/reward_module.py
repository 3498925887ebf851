"""A user reward function loaded from a file (``--reward_module path/to/file.py:function``), run guarded.

The function has the built-in rewards' signature (:data:`trainer.r1.rewards.REWARD_FUNCS`)::

    def my_reward(response: str, ground_truth: str) -> float: ...

``response`` is the whole response text the built-in rewards see (the prompt's ``<think>`` prefill, if
any, then the completion); ``ground_truth`` is the example's answer. It returns a real number (``bool``,
``int`` and numpy scalars count). It is named by the function's name in ``--reward_funcs`` and weighted
by ``--reward_weights`` like the built-in ones.

The guards are those of the built-in rewards' math-verify: the function never runs in the trainer
process. A helper process per trainer process (:class:`RewardModule`) imports the file (its folder first on
``sys.path``, as for a script) and answers one request per completion over a pipe, so

* a call that raises, returns something that is not a finite number, or kills the helper gives reward 0
  and is counted in ``stats.errors`` (the first one of each kind is logged with its message);
* a call that takes longer than ``timeout_s`` gives reward 0, is counted in ``stats.timeouts``, and the
  helper is killed (SIGKILL: a C-level loop cannot ignore it) and a fresh one started;
* what the function prints goes to the trainer's stderr (the pipe's stdout is kept for the protocol);
* a helper that cannot be started again (its import now fails or hangs) raises: training on zeros from a
  reward that is gone would be silent, a failed stage is retried by the controller.

A bad ``--reward_module`` -- no such file, no such function, not a function of (response, ground_truth),
an import that fails -- is :class:`~trainer.runtime.ArgsError` naming the flag and the file, found by
:meth:`RewardModule.start` before the stage loads a model.

This module imports only the standard library at top level: it is also the helper's entry point
(``python -P trainer/r1/reward_module.py --reward-module-worker FILE FUNCTION``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_WORKER_FLAG = "--reward-module-worker"
FLAG = "--reward_module"
# Importing the user's file may import heavy libraries (sympy, numpy): seconds on a loaded machine.
STARTUP_TIMEOUT_S = 120.0


class RewardModuleError(ValueError):
    """A ``--reward_module`` that cannot be used; the message names the flag and the file."""


def parse_spec(spec: str) -> tuple[Path, str]:
    """``path/to/file.py:function`` -> (path, function name); :class:`RewardModuleError` when malformed."""
    path, sep, function = spec.strip().rpartition(":")
    if not sep or not path or not function:
        raise RewardModuleError(f"{FLAG} {spec!r}: expected path/to/file.py:function")
    if not function.isidentifier():
        raise RewardModuleError(f"{FLAG} {spec!r}: {function!r} is not a Python function name")
    if not path.endswith(".py"):
        raise RewardModuleError(f"{FLAG} {spec!r}: {path} is not a .py file")
    return Path(os.path.expanduser(path)), function


def check_specs(specs: list[str], builtin_names: set[str]) -> list[str]:
    """The reward names of ``specs`` (their function names), after the checks that need no process: each
    well formed, its file present, no name twice or equal to a built-in reward's. Raises
    :class:`RewardModuleError`."""
    names: list[str] = []
    for spec in specs:
        path, function = parse_spec(spec)
        if not path.is_file():
            raise RewardModuleError(f"{FLAG} {spec}: {path}: no such file")
        if function in builtin_names:
            raise RewardModuleError(
                f"{FLAG} {spec}: {function!r} is the name of a built-in reward; rename the function"
            )
        if function in names:
            raise RewardModuleError(f"{FLAG} {spec}: a second reward module function named {function!r}")
        names.append(function)
    return names


@dataclass
class RewardModuleStats:
    """Counters of one :class:`RewardModule` in this process."""

    calls: int = 0
    timeouts: int = 0  # past timeout_s: reward 0, helper killed and replaced
    errors: int = 0  # raised, returned a non-number, or the helper died: reward 0
    restarts: int = 0  # helpers started after the first


class RewardModule:
    """A ``file.py:function`` reward, called in a killable helper process; see the module docstring.

    Calling it scores one (response, ground truth) pair. :meth:`start` starts the helper and checks the
    function; without it the first call does (and raises the same error). Thread-safe (calls are
    serialised), and a forked child starts its own helper.
    """

    def __init__(self, spec: str, timeout_s: float = 5.0, *, startup_timeout_s: float = STARTUP_TIMEOUT_S):
        if not timeout_s > 0 or not startup_timeout_s > 0:
            raise ValueError("timeout_s and startup_timeout_s must be > 0")
        self.spec = spec.strip()
        self.path, self.name = parse_spec(spec)
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.stats = RewardModuleStats()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = os.getpid()
        self._buf = b""
        self._next_id = 0
        self._started_once = False
        self._logged: set[str] = set()

    def __repr__(self) -> str:
        return f"RewardModule({self.spec!r})"

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and getattr(self, "_pid", None) == os.getpid():
            with contextlib.suppress(Exception):  # may run during interpreter shutdown
                proc.kill()

    # -- public -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the helper and wait until it has imported the file and checked the function; raises
        :class:`RewardModuleError` naming the flag and the file when it cannot."""
        with self._lock:
            self._ensure_ready()

    def __call__(self, response: str, ground_truth: str) -> float:
        with self._lock:
            self.stats.calls += 1
            self._ensure_ready()
            assert self._proc is not None and self._proc.stdin is not None
            self._next_id += 1
            request_id = self._next_id
            line = json.dumps({"id": request_id, "response": response, "ground_truth": ground_truth})
            try:
                os.write(self._proc.stdin.fileno(), line.encode() + b"\n")
                deadline = time.monotonic() + self.timeout_s
                while True:
                    raw = self._read_line(deadline)
                    if raw is None:
                        self.stats.timeouts += 1
                        self._note("timeout", f"took over {self.timeout_s:g}s; the helper is restarted")
                        self._stop()
                        return 0.0
                    reply = json.loads(raw)
                    if reply.get("id") == request_id:
                        break
            except (EOFError, OSError, ValueError) as e:  # died (exit, OOM kill) or wrote garbage
                self.stats.errors += 1
                self._note("died", f"the helper process died ({type(e).__name__}: {e}); it is restarted")
                self._stop()
                return 0.0
            if "error" in reply:
                self.stats.errors += 1
                self._note(f"error:{reply['error'].split(':', 1)[0]}", reply["error"])
                return 0.0
            return float(reply["reward"])

    def close(self) -> None:
        """Stop the helper (a later call starts a new one)."""
        with self._lock:
            self._stop()

    # -- helper management (under self._lock) -----------------------------------------------------

    def _note(self, kind: str, message: str) -> None:
        """Log the first failure of each kind (they are all counted in ``stats``)."""
        if kind not in self._logged:
            self._logged.add(kind)
            logger.warning("%s %s: %s (reward 0; counted, later ones not logged)", FLAG, self.spec, message)

    def _ensure_ready(self) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's helper and pipes are not ours
            self._proc, self._pid, self._buf = None, os.getpid(), b""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._stop()
        cmd = [sys.executable, "-P", os.path.abspath(__file__), _WORKER_FLAG, str(self.path), self.name]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        except OSError as e:
            raise RewardModuleError(f"{FLAG} {self.spec}: cannot start its helper process: {e}") from e
        if self._started_once:
            self.stats.restarts += 1
        try:
            raw = self._read_line(time.monotonic() + self.startup_timeout_s)
            hello = (
                json.loads(raw)
                if raw is not None
                else {"error": f"importing it took over {self.startup_timeout_s:g}s"}
            )
        except (EOFError, OSError, ValueError):
            hello = {"error": "the helper exited while importing the file (see the log above)"}
        if hello.get("ready") is not True:
            self._stop()
            raise RewardModuleError(f"{FLAG} {self.spec}: {hello.get('error', hello)}")
        self._started_once = True

    def _stop(self) -> None:
        proc, self._proc, self._buf = self._proc, None, b""
        # Imported here, not at the top: this file is also the helper's stdlib-only entry point.
        from trainer.r1 import helper_io

        helper_io.stop(proc)

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the helper, or None at the deadline; EOFError when it exited."""
        assert self._proc is not None
        from trainer.r1 import helper_io  # not at the top: see _stop

        line, self._buf = helper_io.read_line(self._proc, self._buf, deadline, "reward module helper")
        return line


def stats_dict(modules: list[RewardModule]) -> dict[str, dict[str, int]]:
    return {m.name: asdict(m.stats) for m in modules}


# --------------------------------------------------------------------------------------------------
# The helper process
# --------------------------------------------------------------------------------------------------


def _load_function(path: str, name: str):
    """The function ``name`` of the file ``path``, checked; ``(None, why)`` when unusable."""
    import importlib.util
    import inspect

    file = Path(path).resolve()
    sys.path.insert(0, str(file.parent))  # its sibling modules import, as when run as a script
    module_name = f"r1_grpo_reward_{file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        return None, f"{path}: cannot be imported as a Python file"
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # noqa: BLE001 - SyntaxError, ImportError, SystemExit: all one verdict
        return None, f"{path}: importing it failed: {type(e).__name__}: {e}"
    func = getattr(module, name, None)
    if func is None:
        defined = sorted(
            n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
        )
        return None, f"{path} has no function {name!r} (functions: {', '.join(defined) or 'none'})"
    if not callable(func):
        return None, f"{path}: {name} is a {type(func).__name__}, not a function"
    if inspect.iscoroutinefunction(func):
        return None, f"{path}: {name} is async; a reward function returns its value"
    with contextlib.suppress(ValueError, TypeError):  # some builtins have no signature: call them as they are
        signature = inspect.signature(func)
        try:
            signature.bind("response", "ground_truth")
        except TypeError as e:
            return None, (
                f"{path}: {name}{signature} cannot be called as {name}(response, ground_truth) ({e})"
            )
    return func, ""


def _worker_main(path: str, name: str) -> int:
    """JSON lines ``{"id", "response", "ground_truth"}`` on stdin -> ``{"id", "reward"}`` or ``{"id",
    "error"}``; the first line out is ``{"ready": true}`` or ``{"error": why}``."""
    import numbers

    # The protocol keeps the real stdout; the user's prints go to stderr (the trainer's log).
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        out.write(json.dumps(obj).encode() + b"\n")

    func, why = _load_function(path, name)
    if func is None:
        send({"error": why})
        return 0
    send({"ready": True})
    for raw in sys.stdin.buffer:
        request = json.loads(raw)
        reply: dict = {"id": request["id"]}
        try:
            value = func(request["response"], request["ground_truth"])
        except Exception as e:  # noqa: BLE001 - any failure of the user's code is reward 0, counted
            reply["error"] = f"{type(e).__name__}: {e}"[:500]
        else:
            if not isinstance(value, numbers.Real):
                reply["error"] = f"returned {type(value).__name__} {value!r:.80}, not a number"
            elif not math.isfinite(float(value)):
                reply["error"] = f"returned {float(value)}, not a finite number"
            else:
                reply["reward"] = float(value)
        send(reply)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == _WORKER_FLAG:
        sys.exit(_worker_main(sys.argv[2], sys.argv[3]))
    print(f"usage: python {sys.argv[0]} {_WORKER_FLAG} FILE FUNCTION", file=sys.stderr)
    sys.exit(2)
