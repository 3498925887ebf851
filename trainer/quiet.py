"""Third-party notices that tell a user of this trainer nothing, silenced before the libraries load.

Colossal-AI warns at import, once per rank, about optional accelerators this image does not use
(TensorNVMe async save, Apex fused norms, a choice between its own CPU kernels); transformers draws a
checkpoint-shard progress bar on every rank. Matched by message, so any other warning still shows.
"""

from __future__ import annotations

import os
import warnings

NOTICES = (
    r"Please install the latest tensornvme",
    r"Please install [Aa]pex from source",
    r"\s*Module replacement failed\.\s*Please install apex",
    r"More than one kernel is available, loading the kernel with the highest priority",
)


def silence_notices() -> None:
    for message in NOTICES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    if os.environ.get("RANK", "0") != "0":
        # rank 0 keeps transformers' progress bars (loading a sharded checkpoint takes a while); the
        # other ranks would draw the same bar again
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
