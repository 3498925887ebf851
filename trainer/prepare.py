"""Prepare stage: download the hub model and hub datasets once, on a CPU pod, for the later stages to read
with the hub offline.

    r1-grpo prepare --model_name_or_path Qwen/Qwen2.5-7B --dataset_name openai/gsm8k,HuggingFaceH4/MATH-500 \\
        --output_dir /checkpoints/exp1/prepare

Writes the model's repository files at the folder root (from_pretrained-loadable) and each hub dataset's
repository files under `datasets/<hub id>/` (trainer/contract/prepared.py), then checks them: every file
the hub lists has the hub's size, safetensors files are whole (their header's tensors end where the file
does), the sharded index names only files that exist, the config and tokenizer load, and every config and
split of every dataset loads with `datasets`. Then `r1_stage.json` (stage `prepare`), last: the weights'
sha256 as for any stage, the commits downloaded and each dataset's row counts.

The token is huggingface_hub's (HF_TOKEN or the file HF_TOKEN_PATH names; the chart mounts
`hub.existingSecret` there); HF_ENDPOINT points at a mirror. A missing repository or revision, or a gated
one the token cannot read, is bad input (exit 2); a lost connection or a file that arrived short exits 1
(retry: downloads resume, a short file is fetched again).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.contract import output as contract
from trainer.contract.prepared import DATASETS_DIR, hub_datasets, is_hub_id
from trainer.lifecycle import run_cli
from trainer.r1.fields import DataError
from trainer.runtime import ArgsError, Dist, setup_logging

logger = logging.getLogger("r1_grpo.prepare")
# Other formats of the same weights that model repositories often carry beside the safetensors files
# (Meta's original checkpoints, GGUF, ONNX, TF/Flax); the stages never read them.
DEFAULT_IGNORE = ["original/*", "*.pth", "*.gguf", "*.onnx", "*.h5", "*.msgpack", "*.tflite", "*.ot"]
HF_METADATA_DIR = ".cache"  # huggingface_hub's resume records inside a local_dir (kept: a retry resumes)


@dataclass
class PrepareArgs:
    model_name_or_path: str = field(metadata={"help": "Hub id of the base model to download (org/name)"})
    output_dir: str = field(
        metadata={"help": "The model at the root, datasets/<hub id>/ snapshots and r1_stage.json go here"}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Datasets to download: the later stages' --dataset_name values, comma-separated (weights "
            "and local files or builtin: entries are skipped: only hub ids are downloaded)"
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model"})
    dataset_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of every dataset"})
    ignore_patterns: list[str] = field(
        default_factory=lambda: list(DEFAULT_IGNORE),
        metadata={"help": "Model repository files not downloaded (glob patterns)"},
    )
    max_workers: int = field(default=8, metadata={"help": "Files downloaded at once"})

    def validate(self) -> None:
        if not is_hub_id(self.model_name_or_path):
            raise ArgsError(
                f"--model_name_or_path {self.model_name_or_path!r}: prepare downloads a hub model (org/name); "
                "a local folder or builtin: model needs no prepare stage"
            )
        if self.max_workers < 1:
            raise ArgsError(f"--max_workers must be >= 1, got {self.max_workers}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise ArgsError(
                f"prepare runs as one process, not {world}: set its nproc_per_node (nprocPerNode) to 1"
            )


class Incomplete(RuntimeError):
    """A download that did not arrive whole; the bad file is removed so that a retry fetches it again."""


# The stage's command line; trainer/flag_table.py reads both (`make schema`).
PROG = "r1-grpo prepare"
ARG_TYPES = (PrepareArgs,)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, ARG_TYPES, argv, run)


def run(args: PrepareArgs) -> int:
    setup_logging(Dist())
    started = time.time()
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    contract.invalidate_manifest(folder)  # untrusted until this run writes it again, last
    from huggingface_hub import get_token

    logger.info("hub %s, %s", _endpoint(), "with a token" if get_token() else "without a token")
    model_commit = download(args.model_name_or_path, "model", args.model_revision, folder, args)
    check_model(folder, args.model_name_or_path)
    datasets_record: dict[str, Any] = {}
    for hub_id in hub_datasets([args.dataset_name or ""]):
        target = folder / DATASETS_DIR / hub_id
        commit = download(hub_id, "dataset", args.dataset_revision, target, args)
        datasets_record[hub_id] = {
            "folder": f"{DATASETS_DIR}/{hub_id}",
            "revision": commit,
            "configs": check_dataset(target, hub_id),
        }
    metrics = {
        "model_bytes": _bytes(folder, skip={DATASETS_DIR}),
        "dataset_bytes": _bytes(folder / DATASETS_DIR),
        "runtime_s": round(time.time() - started, 2),
    }
    manifest = contract.write_manifest(
        folder,
        "prepare",
        steps=0,
        metrics=metrics,
        inputs={
            "model_name_or_path": args.model_name_or_path,
            "model_revision": model_commit,
            "dataset_name": args.dataset_name,
            "datasets": datasets_record,
            "args": vars(args),
        },
    )
    logger.info(
        "prepare done: %s (%d weight files) and %d datasets in %s",
        args.model_name_or_path,
        len(manifest.weights),
        len(datasets_record),
        folder,
    )
    print(json.dumps({"model": args.model_name_or_path, "datasets": datasets_record, **metrics}, indent=2))
    return 0


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


# --------------------------------------------------------------------------------------------- download


def download(repo_id: str, repo_type: str, revision: str, target: Path, args: PrepareArgs) -> str:
    """The repository's files at `revision` into `target`; the commit downloaded. Asking for the file list
    first (not leaving it to snapshot_download, which falls back to whatever a local folder holds when the
    hub cannot be asked) makes every failure to reach the hub an error, and pins one commit."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    flag = "--model_name_or_path" if repo_type == "model" else "--dataset_name"
    rev_flag = f"--{repo_type}_revision"
    try:
        info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, files_metadata=True)
    except GatedRepoError as e:
        raise ArgsError(
            f"{flag} {repo_id!r}: a gated {repo_type} this token may not read ({_first(e)})"
        ) from e
    except RevisionNotFoundError as e:
        raise ArgsError(f"{rev_flag} {revision!r}: {repo_type} {repo_id} has no such revision") from e
    except RepositoryNotFoundError as e:
        raise ArgsError(
            f"{flag} {repo_id!r}: no such {repo_type} on {_endpoint()} (or a private one: set the token, "
            f"HF_TOKEN or the chart's hub.existingSecret)"
        ) from e
    ignore = args.ignore_patterns if repo_type == "model" else None
    files = {s.rfilename: s.size for s in info.siblings or []}
    wanted = set(filter_repo_objects(list(files), ignore_patterns=ignore))
    logger.info("%s %s@%s: %d files into %s", repo_type, repo_id, info.sha[:12], len(wanted), target)
    snapshot_download(
        repo_id,
        repo_type=repo_type,
        revision=info.sha,
        local_dir=target,
        ignore_patterns=ignore,
        max_workers=args.max_workers,
    )
    short = []
    for name in sorted(wanted):
        path = target / name
        size = path.stat().st_size if path.is_file() else None
        if size is None or files[name] is not None and size != files[name]:
            short.append(f"{name} ({size} of {files[name]} bytes)")
            _forget(target, name)
    if short:
        raise Incomplete(f"{repo_type} {repo_id}: files did not arrive whole: {', '.join(short)}; retry")
    return info.sha


def _forget(target: Path, name: str) -> None:
    """Remove a bad file and huggingface_hub's record of it, so that the next run downloads it again."""
    (target / name).unlink(missing_ok=True)
    for record in (target / HF_METADATA_DIR / "huggingface" / "download").glob(f"{name}.*"):
        record.unlink(missing_ok=True)


def _first(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def _bytes(folder: Path, skip: set[str] = frozenset()) -> int:
    if not folder.is_dir():
        return 0
    total = 0
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).parts
        if rel[0] in skip or rel[0] == HF_METADATA_DIR or not path.is_file():
            continue
        total += path.stat().st_size
    return total


# --------------------------------------------------------------------------------------------- checks


def check_model(folder: Path, repo_id: str) -> None:
    """What the later stages need of the model folder, without loading the weights."""
    from transformers import AutoConfig, AutoTokenizer

    from trainer.modeling import check_model_folder

    check_model_folder(repo_id, str(folder))  # config, weights and tokenizer files present
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError) as e:
            raise ArgsError(
                f"--model_name_or_path {repo_id!r}: {index.name} is not a weight index: {e}"
            ) from e
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ArgsError(f"--model_name_or_path {repo_id!r}: {index.name} names missing shards {missing}")
    for what, loader in (("config", AutoConfig), ("tokenizer", AutoTokenizer)):
        try:
            loader.from_pretrained(str(folder))
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad folder
            raise ArgsError(f"--model_name_or_path {repo_id!r}: its {what} does not load: {_first(e)}") from e


def check_safetensors(path: Path) -> None:
    """A safetensors file is whole when its header parses and its last tensor ends where the file does."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            _truncated(path, size)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            _truncated(path, size)
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        _truncated(path, size)


def _truncated(path: Path, size: int) -> None:
    _forget(path.parent, path.name)
    raise Incomplete(
        f"{path}: not a whole safetensors file ({size} bytes); removed, retry to download it again"
    )


def check_dataset(folder: Path, hub_id: str) -> dict[str, dict[str, int]]:
    """Load every config and split of a dataset snapshot as the stages will (`load_dataset(<folder>,
    <config>)`); their row counts. The arrow cache built on the way is thrown away."""
    import datasets

    cache = Path(tempfile.mkdtemp(prefix=".prepare-check-", dir=folder.parent))
    try:
        try:
            configs = datasets.get_dataset_config_names(str(folder))
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a folder it cannot read
            raise DataError(
                f"--dataset_name {hub_id!r}: the downloaded files are not a dataset: {_first(e)}"
            ) from e
        out: dict[str, dict[str, int]] = {}
        for config in configs:
            try:
                loaded = datasets.load_dataset(str(folder), config, cache_dir=str(cache))
            except Exception as e:  # noqa: BLE001
                raise DataError(
                    f"--dataset_name {hub_id!r}: config {config!r} does not load: {_first(e)}"
                ) from e
            out[config] = {split: int(ds.num_rows) for split, ds in loaded.items()}
            logger.info("dataset %s, config %s: %s", hub_id, config, out[config])
        return out
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
