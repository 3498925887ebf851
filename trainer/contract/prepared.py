"""The `prepare` stage's hand-off: which `--dataset_name` entries are hub datasets, where the stage puts
them, and how the later stages' flags are rewritten to read them with the hub offline (docs/contract.md).

`<prepare>/` holds the base model (from_pretrained-loadable, at the folder root, hashed in
`r1_stage.json` like any stage's weights) and `<prepare>/datasets/<hub id>/` a snapshot of each hub
dataset's repository files. A later stage's `--model_name_or_path` is the prepare folder (the lineage rule,
trainer.contract.stages.model_sources) and each hub entry of its `--dataset_name` becomes that folder,
weights and a source's own config kept (`openai/gsm8k@main:0.7,x.jsonl:0.3` ->
`<prepare>/datasets/openai/gsm8k@main:0.7,x.jsonl:0.3`; the snapshot holds every config of the repo);
`datasets.load_dataset(<folder>, <config>)` reads the snapshot as it would the hub repo.

The chart cannot call Python: `r1-grpo.preparedDatasetName` and `r1-grpo.prepareDatasets` in charts/r1-grpo/templates/_prepare.tpl are a
copy of `rewrite_dataset_name` and `hub_datasets`, held equal by tests/test_chart.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Set in every later stage's environment when prepare runs: anything that would still reach for the hub
# fails at once instead of downloading behind the prepared copy's back.
OFFLINE_ENV: dict[str, str] = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
DATASETS_DIR = "datasets"

# `name:<weight>` of a training mixture (trainer.r1.sources parses the same tail).
_WEIGHTED = re.compile(r"^(?P<name>.+?)(?P<weight>:(?:\d+(?:\.\d*)?|\.\d+))$")
# A hub repository id: `name` or `owner/name` (no path prefix, no scheme, no `builtin:`).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Local data files trainer.r1.sources reads by suffix, never hub ids.
_FILE_SUFFIX = re.compile(r"\.(jsonl|json|parquet)$", re.IGNORECASE)


def is_hub_id(name: str) -> bool:
    """Whether a `--dataset_name` entry (weight removed) names a hub dataset. Local data on a cluster is
    an absolute path and locally a path with a `/`, `./` or a file suffix, so neither is mistaken for one."""
    return bool(_HUB_ID.match(name)) and not _FILE_SUFFIX.search(name)


def _entries(spec: str) -> list[tuple[str, str]]:
    """(name, weight tail or "") of each comma-separated entry."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = _WEIGHTED.match(part)
        out.append((m["name"].strip(), m["weight"]) if m else (part, ""))
    return out


def _split_config(name: str) -> tuple[str, str]:
    """(the dataset, its own `@config` or ""): `openai/gsm8k@main` -> (`openai/gsm8k`, `@main`), split at the
    last `@` as trainer.r1.sources does."""
    base, at, config = name.rpartition("@")
    return (base, at + config) if at and base and config else (name, "")


def hub_datasets(specs: Iterable[str]) -> list[str]:
    """The hub datasets (repository ids, without a source's `@config`) the `--dataset_name` values name, each
    once, in order of first mention."""
    seen: list[str] = []
    for spec in specs:
        for name, _ in _entries(spec):
            base, _config = _split_config(name)
            if is_hub_id(base) and base not in seen:
                seen.append(base)
    return seen


def dataset_folder(prepare_dir: str, hub_id: str) -> str:
    """Where the prepare stage puts a hub dataset's snapshot: `<prepare>/datasets/<owner>/<name>`."""
    return f"{prepare_dir.rstrip('/')}/{DATASETS_DIR}/{hub_id}"


def rewrite_dataset_name(spec: str, prepare_dir: str) -> str:
    """A later stage's `--dataset_name` with every hub entry replaced by its prepared folder."""
    out = []
    for name, weight in _entries(spec):
        base, config = _split_config(name)
        out.append((dataset_folder(prepare_dir, base) + config if is_hub_id(base) else name) + weight)
    return ",".join(out)
