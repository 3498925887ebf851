"""Stage exit codes the controller acts on, and how a stage pod reports bad input (docs/contract.md).

A stage exits 2 on bad input (a flag, a dataset row, an over-long prompt, a stage folder): running it again
gives the same answer, so the controller fails the run at once instead of retrying. Under torchrun the
pod's exit code would be torchrun's 1, so the trainer also writes its one-line error to the file named by
BAD_INPUT_FILE_ENV, which `r1-grpo launch` sets: the launcher then exits 2 itself and puts the line into the
container's termination message (terminationMessagePath), where the controller reads it from the pod's
status without needing the log. Standard library only: `r1-grpo launch` imports it before anything heavy.
"""

from __future__ import annotations

import os
from pathlib import Path

BAD_INPUT_EXIT_CODE = 2
BAD_INPUT_FILE_ENV = "R1_GRPO_BAD_INPUT_FILE"


def report_bad_input(message: str) -> None:
    """Leave `message` for the launcher (when one set BAD_INPUT_FILE_ENV); temp name, then rename."""
    path = os.environ.get(BAD_INPUT_FILE_ENV)
    if not path:
        return
    try:
        tmp = Path(f"{path}.tmp-{os.getpid()}")
        tmp.write_text(message + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # best effort: the exit code and the log still say it
