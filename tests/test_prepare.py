"""The optional `prepare` stage: the hub model and datasets downloaded once, checked and recorded; the later
stages read them with the hub offline.

The hub cannot be reached from here, so the download path runs against tests/support/standin_hub.py, a
STAND-IN for the hub served on loopback (HF_ENDPOINT) that answers the calls huggingface_hub's
snapshot_download and repo_info make. The offline path is real: the later stage runs with HF_HUB_OFFLINE=1
and HF_DATASETS_OFFLINE=1 and reads the prepared folder, and the stand-in records that it was not asked.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import yaml

from tests.support.standin_hub import TOKEN, StandinHub, serve_tiny
from trainer.contract.output import MANIFEST_NAME, verify_stage_output
from trainer.contract.prepared import OFFLINE_ENV, hub_datasets, is_hub_id, rewrite_dataset_name
from trainer.contract.stages import ConfigError, parse_config, plan


@pytest.fixture
def hub(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with StandinHub() as h:
        serve_tiny(h, tiny_model_dir)
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token or cache of this machine's
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        yield h


# --------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize(
    ("name", "hub"),
    [
        ("openai/gsm8k", True),
        ("gsm8k", True),
        ("HuggingFaceH4/MATH-500", True),
        ("builtin:arith", False),
        ("/checkpoints/data/x.jsonl", False),
        ("data/train.parquet", False),
        ("./local", False),
        ("a/b/c", False),
        ("https://host/x", False),
    ],
)
def test_which_dataset_entries_are_hub_ids(name: str, hub: bool) -> None:
    assert is_hub_id(name) is hub


def test_later_stages_dataset_names_are_rewritten_to_the_prepared_folders() -> None:
    spec = "openai/gsm8k:0.7, /vol/x.jsonl:0.3,org/math:.5"
    assert rewrite_dataset_name(spec, "/vol/r/prepare/") == (
        "/vol/r/prepare/datasets/openai/gsm8k:0.7,/vol/x.jsonl:0.3,/vol/r/prepare/datasets/org/math:.5"
    )
    assert rewrite_dataset_name("builtin:arith", "/p") == "builtin:arith"
    # A source's own config (trainer.r1.sources' `name@config`) stays on the prepared folder; the repository
    # is downloaded once, whichever configs name it.
    assert rewrite_dataset_name("openai/gsm8k@main:0.7,org/math@algebra", "/p") == (
        "/p/datasets/openai/gsm8k@main:0.7,/p/datasets/org/math@algebra"
    )
    assert hub_datasets(["openai/gsm8k@main:0.7,org/math@algebra:0.3", "openai/gsm8k@socratic,org/math"]) == [
        "openai/gsm8k",
        "org/math",
    ]
    assert hub_datasets(["openai/gsm8k:0.7,builtin:arith:0.3", "", "org/math,openai/gsm8k"]) == [
        "openai/gsm8k",
        "org/math",
    ]


def test_plan_with_prepare_downloads_what_the_later_stages_name_and_runs_them_offline() -> None:
    raw = {
        "release": "r1",
        "root": "/vol",
        "model": "org/base",
        "dataset": "openai/gsm8k",
        "stages": {
            "prepare": {"enabled": True, "args": {"dataset_name": "org/extra", "model_revision": "v2"}},
            "sft": {"args": {"dataset_name": "org/sft-set:0.5,/vol/data/x.jsonl:0.5"}},
            "grpo": {},
            "eval": {"args": {"dataset_name": "builtin:arith"}},
        },
    }
    prepare, sft, grpo, evaluation = plan(parse_config(raw, "t.yaml"))
    assert prepare.name == "prepare" and prepare.env == {}
    assert prepare.args == {
        "dataset_name": "org/extra,org/sft-set,openai/gsm8k",
        "model_revision": "v2",
        "model_name_or_path": "org/base",
        "output_dir": "/vol/r1/prepare",
    }
    assert sft.model_name_or_path == "/vol/r1/prepare" and sft.model_from_stage == "prepare"
    assert sft.args["dataset_name"] == "/vol/r1/prepare/datasets/org/sft-set:0.5,/vol/data/x.jsonl:0.5"
    assert grpo.args["dataset_name"] == "/vol/r1/prepare/datasets/openai/gsm8k"
    assert evaluation.args["dataset_name"] == "builtin:arith"
    assert sft.env == grpo.env == evaluation.env == OFFLINE_ENV
    # Listed without `enabled`, prepare stays off (an optional stage); the others keep their default, on.
    off = plan(parse_config({**raw, "stages": {"prepare": {}, "sft": {}}}, "t.yaml"))
    assert [r.name for r in off] == ["sft"] and off[0].args["dataset_name"] == "openai/gsm8k"
    assert off[0].env == {}
    with pytest.raises(ConfigError, match="stages.prepare.args: stage prepare: --max_workers"):
        plan(
            parse_config({**raw, "stages": {"prepare": {"enabled": True, "args": {"max_workers": "x"}}}}, "t")
        )


# --------------------------------------------------------------------------------------------- the stage


def prepare_argv(out: Path, *extra: str) -> list[str]:
    return ["prepare", "--model_name_or_path", "org/tiny", "--output_dir", str(out), *extra]


def test_prepare_downloads_checks_and_records_then_the_pipeline_trains_offline(
    hub: StandinHub, stage_runner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`r1-grpo pipeline run` with prepare -> sft: prepare downloads the private model (token from HF_TOKEN)
    and the dataset the sft stage names; sft starts from the prepared folder and reads the prepared
    dataset with the hub offline, asking the (stand-in) hub nothing."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "release": "t",
                "model": "org/tiny",
                "dataset": "org/arith",
                "stages": {
                    "prepare": {"enabled": True},
                    "sft": {
                        "args": {
                            "dataset_config": "main",
                            "max_steps": 1,
                            "per_device_train_batch_size": 4,
                            "save_steps": 0,
                            "evaluation_strategy": "no",
                            "report_to": "none",
                        }
                    },
                },
            }
        )
    )
    run = stage_runner.run_script(
        "r1-grpo", ["pipeline", "run", "--config", str(config), "--root", str(tmp_path), "--skip_summary"]
    )
    assert run.returncode == 0, run.describe()
    prepared = tmp_path / "t" / "prepare"
    manifest = verify_stage_output(prepared, "prepare")
    assert sorted(manifest.weights) == ["model.safetensors"]
    sha = hub.repos[("datasets", "org/arith")].sha
    assert manifest.inputs["model_revision"] == hub.repos[("models", "org/tiny")].sha
    assert manifest.inputs["datasets"] == {
        "org/arith": {
            "folder": "datasets/org/arith",
            "revision": sha,
            "configs": {"main": {"train": 64, "test": 16}},
        }
    }
    for name, data in hub.repos[("models", "org/tiny")].files.items():
        assert (prepared / name).read_bytes() == data, name
    sft = verify_stage_output(tmp_path / "t" / "sft", "sft")
    assert sft.inputs["model_name_or_path"] == str(prepared)
    assert sft.inputs["dataset_name"] == str(prepared / "datasets" / "org" / "arith")
    # Every request the hub saw came before prepare finished: sft asked nothing.
    finished = (prepared / MANIFEST_NAME).stat().st_mtime
    assert hub.requests and all(at <= finished for at, _, _ in hub.requests), hub.requests[-3:]
    assert "[sft]" in run.output and "HF_HUB_OFFLINE" not in os.environ


def test_the_offline_environment_keeps_a_stage_off_the_hub(
    hub: StandinHub, stage_runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the environment the later stages get, a hub id that was not prepared fails without a request:
    the guard is real, not a convention."""
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    run = stage_runner.run_script("r1-grpo", ["data", "inspect", "--dataset_name", "org/arith"])
    assert run.returncode != 0, run.describe()
    assert not hub.requests, hub.requests


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "--model_name_or_path 'org/tiny': no such model on http://127.0.0.1"),
        (
            ["--model_revision", "v9"],
            {"HF_TOKEN": TOKEN},
            "--model_revision 'v9': model org/tiny has no such revision",
        ),
        (["--dataset_name", "org/nope"], {"HF_TOKEN": TOKEN}, "--dataset_name 'org/nope': no such dataset"),
    ],
    ids=["private-without-token", "unknown-revision", "unknown-dataset"],
)
def test_hub_refusals_are_bad_input(
    hub: StandinHub, stage_runner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv, env, message
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "prepare"
    run = stage_runner.run_script("r1-grpo", prepare_argv(out, *argv))
    assert run.returncode == 2, run.describe()
    assert f"r1-grpo prepare: error: {message}" in run.output
    assert not (out / MANIFEST_NAME).exists()


def test_a_local_model_needs_no_prepare_stage(stage_runner, tmp_path: Path) -> None:
    run = stage_runner.run_script(
        "r1-grpo", ["prepare", "--model_name_or_path", "builtin:tiny", "--output_dir", str(tmp_path / "p")]
    )
    assert run.returncode == 2, run.describe()
    assert "--model_name_or_path 'builtin:tiny': prepare downloads a hub model (org/name)" in run.output


def test_a_short_download_leaves_no_manifest_and_the_retry_completes(
    hub: StandinHub, stage_runner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The connection drops halfway through the weights: the stage fails retryably (not exit 2), writes no
    r1_stage.json; the retry (the controller's next attempt) downloads the file again and finishes."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo = hub.repos[("models", "org/tiny")]
    repo.truncate.add("model.safetensors")
    out = tmp_path / "prepare"
    first = stage_runner.run_script("r1-grpo", prepare_argv(out))
    assert first.returncode not in (0, 2), first.describe()
    assert not (out / MANIFEST_NAME).exists()
    repo.truncate.clear()
    second = stage_runner.run_script("r1-grpo", prepare_argv(out))
    assert second.returncode == 0, second.describe()
    manifest = verify_stage_output(out, "prepare")
    assert (out / "model.safetensors").read_bytes() == repo.files["model.safetensors"]
    assert manifest.inputs["datasets"] == {}


def test_a_cut_safetensors_file_is_found_and_removed(tiny_model_dir: Path, tmp_path: Path) -> None:
    from trainer.prepare import Incomplete, check_safetensors

    whole = (tiny_model_dir / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(whole)
    check_safetensors(path)  # whole: no error
    n = struct.unpack("<Q", whole[:8])[0]
    for cut in (len(whole) - 1, 8 + n, 8 + n // 2, 4):
        path.write_bytes(whole[:cut])
        with pytest.raises(Incomplete, match="not a whole safetensors file"):
            check_safetensors(path)
        assert not path.exists()
    assert json.loads(whole[8 : 8 + n])  # the header the check reads is the file's own
