"""Dataset sources: ``--dataset_name`` as a list of (name, weight), and opening one split of one source.

See :mod:`trainer.r1.data` for the sources accepted and the mixture rules.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from trainer.r1.builtin import BUILTIN_PREFIX
from trainer.r1.fields import DataError

logger = logging.getLogger(__name__)

FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    name: str
    weight: Fraction | None = None
    config: str | None = None  # `name@config`: this source's dataset config (else --dataset_config's)

    @property
    def label(self) -> str:
        """The source as the list names it, without its weight (``openai/gsm8k@main``)."""
        return f"{self.name}@{self.config}" if self.config else self.name


_WEIGHTED_RE = re.compile(r"(?P<name>.+):(?P<weight>\d+(?:\.\d*)?|\.\d+)")


def _exists(name: str) -> bool:
    return Path(os.path.expanduser(name)).exists()


def _with_config(spec: str, name: str, weight: Fraction | None = None) -> Source:
    """``name@config`` -> Source(name, weight, config); a name that exists as a file or folder is whole."""
    if "@" not in name or _exists(name):
        return Source(name, weight)
    base, _, config = name.rpartition("@")
    base, config = base.strip(), config.strip()
    if not base or not config:
        raise DataError(f"--dataset_name {spec!r}: {name!r} is not <dataset>@<config>")
    return Source(base, weight, config)


def parse_sources(dataset_name: str) -> list[Source]:
    """``--dataset_name`` as a list of sources: ``a.jsonl:0.7,b.jsonl:0.3`` or a single name, each name
    optionally with its own dataset config, ``openai/gsm8k@main:0.7`` (hub sources; it replaces
    ``--dataset_config`` for that source).

    A name that exists as a file or folder is taken whole (commas, ``@`` or a ``:<number>`` tail included).
    """
    spec = dataset_name.strip()
    if not spec:
        raise DataError("--dataset_name must not be empty")
    if _exists(spec):
        return [Source(spec)]
    sources: list[Source] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise DataError(f"--dataset_name {spec!r}: an empty entry in the comma-separated list")
        m = _WEIGHTED_RE.fullmatch(part)
        if m and not _exists(part):
            weight = Fraction(m["weight"])
            if weight <= 0:
                raise DataError(f"--dataset_name {spec!r}: the weight of {m['name']!r} must be > 0")
            sources.append(_with_config(spec, m["name"].strip(), weight))
        else:
            sources.append(_with_config(spec, part))
    if len({s.weight is None for s in sources}) > 1:
        raise DataError(f"--dataset_name {spec!r}: give every dataset a ':<weight>' or none of them")
    names = [s.label for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"--dataset_name {spec!r}: {duplicates[0]!r} is listed twice")
    return sources


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix.lower() in FILE_SUFFIXES


def _wrap_load_error(label: str, split: str, config: str | None, e: Exception) -> DataError:
    where = f"split {split!r}" + (f", config {config!r}" if config else "")
    return DataError(f"cannot load dataset {label} ({where}): {type(e).__name__}: {e}")


def open_split(
    dataset_name: str, split: str, config: str | None, *, own_config: bool = False
) -> tuple[str, Iterable[Mapping[str, Any]], list[str]]:
    """(label for messages, rows, column names) of one split. ``own_config``: ``config`` was given with
    the source (``name@config``), which only a hub dataset (or a dataset folder) takes; the label then
    ends in ``@config``."""

    def no_config() -> None:
        if own_config:
            raise DataError(
                f"{dataset_name}@{config}: a dataset config applies to hub datasets and dataset folders only"
            )

    if dataset_name.startswith(BUILTIN_PREFIX):
        no_config()
        from trainer.r1.builtin import builtin_rows

        task = dataset_name[len(BUILTIN_PREFIX) :]
        try:
            rows = builtin_rows(task, split)
        except ValueError as e:
            raise DataError(f"{dataset_name}: {e}") from e
        columns = sorted({key for row in rows[:1] for key in row})
        return dataset_name, rows, columns

    import datasets

    name = dataset_name.replace("{split}", split)
    path = Path(os.path.expanduser(name))
    if path.is_file():
        no_config()
        builder = FILE_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{name}: unsupported file type {path.suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}"
            )
        if "{split}" not in dataset_name:
            logger.info(
                "%s is a single file: it serves split %r (use '{split}' in the path for per-split files)",
                name,
                split,
            )
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
            raise _wrap_load_error(name, split, None, e) from e
        return name, ds, list(ds.column_names)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        no_config()
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:
            raise _wrap_load_error(name, split, None, e) from e
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{name}: no split {split!r}; splits: {', '.join(loaded) or '(none)'}")
            loaded = loaded[split]
        return name, loaded, list(loaded.column_names)
    if not path.exists() and _looks_like_path(name):
        raise DataError(f"{name}: no such file or folder")
    # A plain folder or a hub id: the hub path proper.
    label = f"{name}@{config}" if own_config else name
    try:
        ds = datasets.load_dataset(str(path) if path.is_dir() else name, config, split=split)
    except Exception as e:
        raise _wrap_load_error(label, split, config, e) from e
    if not isinstance(ds, datasets.Dataset):  # e.g. an IterableDataset from a custom builder
        raise DataError(f"{label}: split {split!r} did not load as a datasets.Dataset ({type(ds).__name__})")
    return label, ds, list(ds.column_names)
