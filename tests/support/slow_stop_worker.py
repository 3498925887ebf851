"""A torchrun worker whose SIGTERM handling takes a set time, as a trainer's last step and checkpoint do.

`torchrun --nproc_per_node=N tests/support/slow_stop_worker.py FOLDER SECONDS`: every worker writes
`ready-<rank>` into FOLDER and then waits; on SIGTERM it writes `stopping-<rank>`, works for SECONDS (a
sleep stands in for writing a checkpoint), writes `saved-<rank>` and exits 143, as a preempted trainer does.
A worker killed before it is done leaves no `saved-<rank>`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
rank = os.environ["RANK"]


def on_sigterm(signum: int, frame: object) -> None:
    (folder / f"stopping-{rank}").write_text(str(time.time()))
    time.sleep(seconds)
    (folder / f"saved-{rank}").write_text(str(time.time()))
    os._exit(143)


signal.signal(signal.SIGTERM, on_sigterm)
(folder / f"ready-{rank}").write_text(str(os.getpid()))
while True:
    time.sleep(1)
