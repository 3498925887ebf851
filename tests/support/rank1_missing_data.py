"""``python -m tests.support.rank1_missing_data <stage module> <flags>``, under torchrun: the stage as it is,
except that on rank 1 the ``--dataset_name`` file is missing, as on a node that lacks it.

Rank 1's data loader (``open_split`` as ``trainer.r1.data`` calls it, where every dataset is opened) is handed a path beside the
real file that does not exist; every other line of the stage is the real one. With ``EXIT_DIR`` set, each
rank writes its exit code to ``<EXIT_DIR>/exit-<rank>`` on the way out: torchrun's summary shows only the
first worker to fail (it stops the others itself), and a stopped rank leaves through ``os._exit``.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

MISSING = "missing-on-rank-1.jsonl"
EXIT_DIR = "R1_GRPO_TEST_EXIT_DIR"


def _record(code: int) -> None:
    folder = os.environ.get(EXIT_DIR)
    if folder:
        path = Path(folder) / f"exit-{os.environ.get('RANK', '0')}"
        path.with_suffix(".tmp").write_text(str(code))
        path.with_suffix(".tmp").replace(path)


def main() -> None:
    module, *argv = sys.argv[1:]
    if os.environ.get("RANK") == "1":
        from trainer.r1 import data

        real_open = data.open_split

        def open_missing(dataset_name: str, split: str, config: str | None, **options):
            return real_open(str(Path(dataset_name).with_name(MISSING)), split, config, **options)

        data.open_split = open_missing
    real_exit = os._exit

    def recorded_exit(code: int) -> None:
        _record(code)
        real_exit(code)

    os._exit = recorded_exit
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        _record(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
        raise
    except BaseException:
        _record(1)  # the interpreter's exit code for an uncaught exception
        raise
    _record(0)


if __name__ == "__main__":
    main()
