"""math-verify in a killable helper process.

math-verify runs sympy and an ANTLR LaTeX parser that can take minutes (or all memory) on inputs such as
``10^{10^{10^{10}}}`` or deeply nested parentheses, and its own timeouts use ``SIGALRM`` which only works on
the main thread and cannot interrupt a long C-level big-integer operation. So it never runs in the calling
process: a long-lived helper process (:class:`MathVerifier`, one per trainer process, started on first use)
does the parsing and comparison, with

* input caps checked in the caller (length, bracket nesting depth) so pathological text is never sent;
* a soft per-request deadline inside the helper (``setitimer`` on the helper's main thread) that aborts
  Python-level work without restarting anything;
* a hard deadline in the caller: when no answer arrives in time the helper is killed (SIGKILL) and a fresh
  one is started in the background. The helper also limits its address space and exits by itself if it is
  stuck past the hard deadline (``faulthandler`` watchdog), so it cannot outlive a dead trainer for long.

The caller side is thread-safe (requests are serialised on a lock), fork-safe (a forked child starts its
own helper) and caches results, so the common case is a dictionary hit or one pipe round trip (about a
millisecond). Answers that are plain numbers are decided without the helper
(:func:`trainer.r1.answers.answers_equal`). The helper's verdict is symmetric (math-verify asked both ways
round) and exact for numeric values (math-verify alone rounds to 6 decimals).

This module imports only the standard library at top level: it is also the helper's entry point
(``python -P trainer/r1/math_verify.py --math-verify-worker``), which must not import the trainer package
(and with it torch).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_WORKER_FLAG = "--math-verify-worker"

# --------------------------------------------------------------------------------------------------
# The math-verify helper process
# --------------------------------------------------------------------------------------------------


# Answers longer than this, or nested deeper than this, are compared as normalised strings only:
# real final answers are short, and the LaTeX parser's time grows steeply with nesting depth.
MAX_VERIFY_CHARS = 1000
MAX_VERIFY_NESTING = 12


def _nesting_depth(s: str, limit: int) -> int:
    """Maximum bracket nesting depth of ``s``, counting stops early once above ``limit``."""
    depth = best = 0
    for ch in s:
        if ch in "({[":
            depth += 1
            if depth > best:
                best = depth
                if best > limit:
                    return best
        elif ch in ")}]" and depth > 0:
            depth -= 1
    return best


@dataclass
class VerifierStats:
    """Counters of one :class:`MathVerifier` (for logs and tests)."""

    requests: int = 0  # requests sent to the helper
    cache_hits: int = 0
    capped: int = 0  # inputs over the length/nesting caps, not sent
    soft_timeouts: int = 0  # the helper gave up on a request by itself
    hard_timeouts: int = 0  # the helper did not answer in time and was killed
    errors: int = 0  # math-verify raised, or the helper died mid-request
    starts: int = 0  # helper processes started
    unavailable: int = 0  # requests answered False because no helper could be started


class MathVerifier:
    """math-verify equality in a killable helper process; see the module docstring.

    ``timeout_s`` bounds the wall time of one comparison once the helper is up: past it the helper is
    killed and replaced. ``soft_timeout_s`` (default 60% of ``timeout_s``) is the helper's own deadline,
    which aborts Python-level work without a restart. ``startup_timeout_s`` bounds waiting for a new
    helper to import math-verify.
    A comparison that times out, or inputs over ``max_chars`` / ``max_nesting``, count as "not equal".
    """

    def __init__(
        self,
        timeout_s: float = 3.0,
        *,
        soft_timeout_s: float | None = None,
        startup_timeout_s: float = 60.0,
        max_chars: int = MAX_VERIFY_CHARS,
        max_nesting: int = MAX_VERIFY_NESTING,
        cache_size: int = 65536,
        memory_limit_mb: int = 2048,
        restart_cooldown_s: float = 30.0,
    ) -> None:
        if timeout_s <= 0 or startup_timeout_s <= 0 or (soft_timeout_s is not None and soft_timeout_s <= 0):
            raise ValueError("timeout_s, soft_timeout_s and startup_timeout_s must be > 0")
        self.timeout_s = timeout_s
        self.soft_timeout_s = 0.6 * timeout_s if soft_timeout_s is None else soft_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.max_chars = max_chars
        self.max_nesting = max_nesting
        self.cache_size = cache_size
        self.memory_limit_mb = memory_limit_mb
        self.restart_cooldown_s = restart_cooldown_s
        self.stats = VerifierStats()
        self._reset_process_state()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (v := ref()) is not None and v._reset_process_state())

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            with contextlib.suppress(Exception):  # may run during interpreter shutdown
                proc.kill()

    def _reset_process_state(self) -> None:
        # Also run in a forked child: the parent's helper, pipes and (possibly held) lock are not ours.
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._buf = b""
        self._next_id = 0
        self._disabled_until = 0.0
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._warned_unavailable = False

    # -- public -----------------------------------------------------------------------------------

    def equal(self, predicted: str, ground_truth: str) -> bool:
        """math-verify's verdict on the two answers, asked both ways round and with numeric values exactly
        equal (False if undecided); :func:`trainer.r1.answers.answers_equal` passes them in a fixed order."""
        for text in (predicted, ground_truth):
            if len(text) > self.max_chars or _nesting_depth(text, self.max_nesting) > self.max_nesting:
                with self._lock:
                    self.stats.capped += 1
                return False
        key = (predicted, ground_truth)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return cached
            verdict = self._request(predicted, ground_truth)
            if verdict is None:  # no helper: do not cache, a later call may have one
                return False
            self._cache[key] = verdict
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return verdict

    def warm_up(self) -> bool:
        """Start the helper now (it imports math-verify, about a second) instead of on the first request.

        Returns whether it is up; if not, comparisons fall back to "not equal" (a warning is logged).
        """
        with self._lock:
            return self._ensure_ready()

    def close(self) -> None:
        """Stop the helper process (a later :meth:`equal` starts a new one)."""
        with self._lock:
            self._stop()

    # -- helper management (all under self._lock) ------------------------------------------------

    def _start(self) -> None:
        cmd = [
            sys.executable,
            "-P",  # do not put trainer/ on sys.path: the helper must not shadow stdlib modules
            os.path.abspath(__file__),
            _WORKER_FLAG,
            f"{self.soft_timeout_s:.3f}",
            f"{max(self.timeout_s, self.soft_timeout_s) + 5.0:.3f}",
            str(self.memory_limit_mb),
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0
        )
        self._ready = False
        self._buf = b""
        self.stats.starts += 1

    def _stop(self) -> None:
        proc, self._proc, self._ready, self._buf = self._proc, None, False, b""
        # Imported here, not at the top: this file is also the helper's stdlib-only entry point.
        from trainer.r1 import helper_io

        helper_io.stop(proc)

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the helper, or None at the deadline; EOFError when it exited."""
        assert self._proc is not None
        from trainer.r1 import helper_io  # not at the top: see _stop

        line, self._buf = helper_io.read_line(self._proc, self._buf, deadline, "math-verify helper")
        return line

    def _ensure_ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            self._stop()  # died while idle
        if self._proc is None:
            if time.monotonic() < self._disabled_until:
                return False
            try:
                self._start()
            except OSError as e:
                self._give_up(f"cannot start it: {e}")
                return False
        if not self._ready:
            try:
                line = self._read_line(time.monotonic() + self.startup_timeout_s)
                ready = line is not None and json.loads(line).get("ready") is True
            except (EOFError, OSError, ValueError, AttributeError):
                ready = False
            if not ready:
                self._give_up(
                    f"it did not start within {self.startup_timeout_s:.0f}s (is math-verify installed?)"
                )
                return False
            self._ready = True
        return True

    def _give_up(self, why: str) -> None:
        self._stop()
        self._disabled_until = time.monotonic() + self.restart_cooldown_s
        if not self._warned_unavailable:
            logger.warning(
                "math-verify helper unavailable (%s); answers are compared as normalised strings only, "
                "retrying in %.0fs",
                why,
                self.restart_cooldown_s,
            )
            self._warned_unavailable = True

    def _request(self, predicted: str, ground_truth: str) -> bool | None:
        for _attempt in range(2):  # a helper that died while idle is replaced once
            if not self._ensure_ready():
                self.stats.unavailable += 1
                return None
            assert self._proc is not None and self._proc.stdin is not None
            self._next_id += 1
            request_id = self._next_id
            payload = json.dumps({"id": request_id, "pred": predicted, "gold": ground_truth}) + "\n"
            try:
                os.write(self._proc.stdin.fileno(), payload.encode())
            except OSError:  # BrokenPipeError: it died since the last request
                self._stop()
                continue
            self.stats.requests += 1
            deadline = time.monotonic() + self.timeout_s
            try:
                while True:
                    line = self._read_line(deadline)
                    if line is None:
                        self.stats.hard_timeouts += 1
                        logger.warning(
                            "math-verify took over %.1fs on answer %r vs %r; helper restarted",
                            self.timeout_s,
                            predicted[:80],
                            ground_truth[:80],
                        )
                        self._stop()
                        self._safe_start()  # warm the replacement up while the caller goes on
                        return False
                    reply = json.loads(line)
                    if reply.get("id") == request_id:
                        break
            except (EOFError, OSError, ValueError):
                # Crashed on this input (e.g. out of memory): treat as not equal, replace the helper.
                self.stats.errors += 1
                self._stop()
                self._safe_start()
                return False
            status = reply.get("status")
            if status == "timeout":
                self.stats.soft_timeouts += 1
            elif status == "error":
                self.stats.errors += 1
            return bool(reply.get("equal"))
        self.stats.unavailable += 1
        return None

    def _safe_start(self) -> None:
        try:
            self._start()
        except OSError:
            self._proc = None


_DEFAULT_VERIFIER: MathVerifier | None = None
_DEFAULT_LOCK = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide :class:`MathVerifier` used by :func:`answers_equal` (created on first use)."""
    global _DEFAULT_VERIFIER
    with _DEFAULT_LOCK:
        if _DEFAULT_VERIFIER is None:
            _DEFAULT_VERIFIER = MathVerifier()
            atexit.register(_DEFAULT_VERIFIER.close)
        return _DEFAULT_VERIFIER


def _worker_main(soft_timeout_s: float, hard_timeout_s: float, memory_limit_mb: int) -> int:
    """The helper: JSON lines ``{"id", "pred", "gold"}`` on stdin -> ``{"id", "equal", "status"}``."""
    import faulthandler
    import functools
    import resource
    import signal

    # Huge integers (10^{10^{10}}) become a MemoryError here instead of an OOM kill of the whole pod.
    try:
        with open("/proc/self/status") as status_file:
            vm_kb = next(int(line.split()[1]) for line in status_file if line.startswith("VmSize:"))
        limit = vm_kb * 1024 + memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (OSError, ValueError, StopIteration):
        pass

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import sympy
    from math_verify import parse, verify

    class _Deadline(BaseException):  # BaseException: math-verify swallows Exception
        pass

    armed = [False]

    def on_alarm(signum: int, frame: object) -> None:
        if armed[0]:
            raise _Deadline

    signal.signal(signal.SIGALRM, on_alarm)

    def parse_answer(text: str) -> list:
        # Bare answers ("1/2", "x = 2") need math delimiters for the LaTeX extractor; delimited ones not.
        if "\\boxed" in text or "$" in text or "\\(" in text or "\\[" in text:
            return parse(text, parsing_timeout=None)
        return parse("\\boxed{" + text + "}", parsing_timeout=None) or parse(text, parsing_timeout=None)

    parse_gold = functools.lru_cache(maxsize=4096)(parse_answer)

    def exact(first: list, second: list) -> bool:
        """Two numeric values must be equal, not only close (math-verify rounds to 6 decimals, so it calls
        2^{-98} and 2^{-99} equal): rationals exactly; others (radicals, pi) when their difference, at 60
        significant digits, is within 10^-50 of their size. Other answers keep math-verify's verdict."""
        a, b = first[0], second[0]
        if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr) and a.is_number and b.is_number):
            return True
        a, b = (sympy.nsimplify(x, rational=True) if x.atoms(sympy.Float) else x for x in (a, b))
        if a == b or (a.is_Rational and b.is_Rational):
            return a == b
        if not (a.is_finite and b.is_finite):
            return False
        scale = max(abs(sympy.N(a, 60)), abs(sympy.N(b, 60)))
        return bool(abs(sympy.N(a - b, 60)) <= scale * sympy.Rational(1, 10**50))

    def compare(first: str, second: str) -> bool:
        # Both ways round: math-verify's verify(gold, target) is not symmetric (sets, intervals, relations).
        armed[0] = True
        signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
        try:
            a, b = parse_gold(first), parse_gold(second)
            return bool(
                a
                and b
                and verify(a, b, timeout_seconds=None)
                and verify(b, a, timeout_seconds=None)
                and exact(a, b)
            )
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    # The first comparison imports and caches much of sympy (seconds on a busy machine): do it before
    # saying ready, within the caller's startup timeout, not within the first request's deadline.
    with contextlib.suppress(Exception):
        for first, second in (("2^{1/2}", "\\sqrt{2}"), ("\\frac{1}{2}", "0.5"), ("x^2+1", "1+x^2")):
            a, b = parse_gold(first), parse_gold(second)
            verify(a, b, timeout_seconds=None) and exact(a, b)
    parse_gold.cache_clear()
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for raw in sys.stdin.buffer:
        request = json.loads(raw)
        # Last resort if a C-level computation ignores the soft deadline and the caller is gone.
        faulthandler.dump_traceback_later(hard_timeout_s, exit=True)
        try:
            equal, status = compare(request["pred"], request["gold"]), "ok"
        except _Deadline:
            equal, status = False, "timeout"
        except Exception:  # noqa: BLE001 - any failure of math-verify/sympy means "not shown equal"
            equal, status = False, "error"
        finally:
            faulthandler.cancel_dump_traceback_later()
        out.write(json.dumps({"id": request["id"], "equal": equal, "status": status}).encode() + b"\n")
        out.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == _WORKER_FLAG:
        sys.exit(_worker_main(float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
    print(
        f"usage: python {sys.argv[0]} {_WORKER_FLAG} SOFT_TIMEOUT_S HARD_TIMEOUT_S MEMORY_LIMIT_MB",
        file=sys.stderr,
    )
    sys.exit(2)
