"""The line protocol of the guarded helper processes (the math-verify helper, a --reward_module's helper):
read one reply line by a deadline, and stop a helper for good. Their callers decide what a timeout or an
exit means; this module only moves bytes."""

from __future__ import annotations

import contextlib
import math
import os
import select
import subprocess
import time


def read_line(proc: subprocess.Popen, buf: bytes, deadline: float, what: str) -> tuple[bytes | None, bytes]:
    """(one line from ``proc``'s stdout or None at the deadline, the bytes read past it). EOFError when the
    helper exited; ``buf`` carries what an earlier call read beyond its line."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    poller = select.poll()  # not select.select: trainer processes can have fds above FD_SETSIZE
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, buf
        if not poller.poll(math.ceil(remaining * 1000)):
            continue  # timed out: the loop re-checks the deadline
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError(f"{what} exited")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line, rest


def stop(proc: subprocess.Popen | None) -> None:
    """Kill ``proc``, reap it and close its pipes; a helper already gone is fine."""
    if proc is None:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
