"""The SFT stage, run the way the guide and the PyTorchJob run it: `torchrun --nproc_per_node=2 -m trainer.sft`
on the Colossal-AI Booster (ddp plugin, gloo on CPU), then killed and resumed."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from trainer import sft
from trainer.contract import output as contract
from trainer.runtime import ArgsError, autocast, total_optimizer_steps

MAX_STEPS = 4
SAVE_STEPS = 2


def guide_argv(model: Path, data: Path, out: Path) -> list[str]:
    """The DeepSeek-R1 guide's SFT flags, verbatim (bool flags bare, as the guide writes them), sized down."""
    return [
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "5e-4",
        "--warmup_steps",
        "1",
        "--logging_steps",
        "1",
        "--save_steps",
        str(SAVE_STEPS),
        "--evaluation_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--report_to",
        "none",
        "--gradient_checkpointing",
        "--bf16",
        "--tf32",
        # Ours: the plugin, a step budget and a small eval set.
        "--plugin",
        "ddp",
        "--max_steps",
        str(MAX_STEPS),
        "--max_eval_samples",
        "8",
        "--seed",
        "7",
    ]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def _metric_series(folder: Path, key: str) -> list[tuple[int, float]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [(rec["step"], rec[key]) for rec in map(json.loads, lines) if key in rec]


def _logged_steps(folder: Path) -> list[int]:
    """Steps with a train loss in metrics.jsonl so far (read while the run may be appending to it)."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    complete = path.read_text().split("\n")[:-1]  # the last piece may be a line still being written
    return [rec["step"] for rec in map(json.loads, filter(None, complete)) if "loss" in rec]


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sft") / "sft"
    result = stage_runner.run("trainer.sft", guide_argv(tiny_model_dir, arith_jsonl, out), nproc=2)
    assert result.returncode == 0, result.describe()
    return out, result


def test_two_process_run_shows_no_third_party_notices(sft_run) -> None:
    """Colossal-AI's import-time notices (TensorNVMe, Apex, kernel choice) say nothing to a user of this
    trainer and were printed once per rank; our own log and progress bar stay."""
    _, result = sft_run
    for notice in ("tensornvme", "apex", "More than one kernel"):
        assert notice.lower() not in result.output.lower(), result.describe()
    assert "[rank0] INFO train rows:" in result.output and "sft:" in result.output, result.describe()


def test_two_process_run_produces_checkpoints_model_and_manifest(sft_run, tiny_model_dir: Path) -> None:
    out, result = sft_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # checkpoint-2 (step 4 is the end: the final export replaces a checkpoint there).
    assert [s for s, _ in contract.complete_checkpoints(out)] == [SAVE_STEPS]
    c = out / f"checkpoint-{SAVE_STEPS}"
    names = {p.name for p in c.iterdir()}
    assert {
        "model",
        "optimizer",
        "scheduler.pt",
        "rng_state_0.pt",
        "rng_state_1.pt",
        contract.TRAINER_STATE_NAME,
    } <= names
    state = json.loads((c / contract.TRAINER_STATE_NAME).read_text())
    assert (state["step"], state["world_size"], state["stage"], state["total_steps"]) == (
        SAVE_STEPS,
        2,
        "sft",
        MAX_STEPS,
    )
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"

    manifest = contract.verify_stage_output(out, "sft")
    assert manifest.steps == MAX_STEPS
    assert list(manifest.weights) == ["model.safetensors"]
    assert manifest.inputs["model_name_or_path"] == str(tiny_model_dir)
    assert (
        manifest.inputs["args"]["bf16"] is True and manifest.inputs["args"]["gradient_checkpointing"] is True
    )
    assert math.isfinite(manifest.metrics["train_loss"]) and math.isfinite(manifest.metrics["eval_loss"])
    assert manifest.metrics["train_rows"] == 81

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size
    assert model.dtype == torch.float32  # bf16 is autocast only: the master weights stay fp32

    losses = _metric_series(out, "loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4] and all(math.isfinite(v) for _, v in losses)
    # One record per evaluation: the last step's evaluation is the final one, not run (or logged) again.
    assert [s for s, _ in _metric_series(out, "eval_loss")] == [2, 4]
    trained, initial = _tensors(out), _tensors(tiny_model_dir)
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained), (
        "training did not change the weights"
    )


def test_resume_after_sigterm_is_bit_exact(
    sft_run, tiny_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    reference, _ = sft_run
    out = tmp_path / "sft"
    log_path = tmp_path / "killed.log"
    # As in a pod: `r1-grpo launch` runs torchrun (tests/test_launch.py) and, on SIGTERM to it (PID 1
    # there), passes it on to the workers and gives them the pod's grace period.
    launch = [str(stage_runner.bin / "r1-grpo"), "launch", "--termination-grace-period-seconds=600", "--"]
    cmd = launch + stage_runner.command("trainer.sft", guide_argv(tiny_model_dir, arith_jsonl, out), nproc=2)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=stage_runner.workdir,
            env=stage_runner.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not _logged_steps(out):
                assert proc.poll() is None, (
                    f"run ended before its first step:\n{log_path.read_text()[-4000:]}"
                )
                assert time.monotonic() < deadline, "no training step within 300 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    killed_log = log_path.read_text()
    assert rc == 143, f"the run finished before SIGTERM took effect:\n{killed_log[-4000:]}"
    assert "r1-grpo launch: SIGTERM: passed on to workers" in killed_log
    m = next((line for line in killed_log.splitlines() if "preempted at step" in line), None)
    assert m is not None, killed_log[-4000:]
    saved = contract.latest_checkpoint(out)
    assert saved is not None and 1 <= int(saved.name.split("-")[1]) <= MAX_STEPS
    step = int(saved.name.split("-")[1])
    assert f"preempted at step {step}; checkpoint saved" in m
    assert not (out / "model.safetensors").exists()
    with pytest.raises(contract.StageOutputError, match="missing"):
        contract.verify_stage_output(out, "sft")

    # Leftovers a hard kill can leave behind: neither may be loaded.
    (out / "checkpoint-99" / "model").mkdir(parents=True)
    (out / ".tmp-checkpoint-98" / "model").mkdir(parents=True)

    resumed = stage_runner.run("trainer.sft", guide_argv(tiny_model_dir, arith_jsonl, out), nproc=2)
    assert resumed.returncode == 0, resumed.describe()
    assert f"ignoring partial checkpoint {out / 'checkpoint-99'} (no trainer_state.json)" in resumed.output
    assert f"ignoring partial checkpoint {out / '.tmp-checkpoint-98'}" in resumed.output
    assert f"resumed from {saved} (step {step})" in resumed.output

    assert contract.verify_stage_output(out, "sft").steps == MAX_STEPS
    got, want = _tensors(out), _tensors(reference)
    assert got.keys() == want.keys()
    differing = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differing, f"resumed weights differ from the uninterrupted run: {differing[:5]}"
    # The logged losses match too: the same batches in the same order, the same optimizer state.
    assert _metric_series(out, "loss") == _metric_series(reference, "loss")


def test_resume_with_another_world_size_is_refused(
    sft_run, tiny_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    reference, _ = sft_run
    out = tmp_path / "sft"
    out.mkdir()
    shutil.copytree(reference / f"checkpoint-{SAVE_STEPS}", out / f"checkpoint-{SAVE_STEPS}")
    result = stage_runner.run("trainer.sft", guide_argv(tiny_model_dir, arith_jsonl, out))  # 1 process
    assert result.returncode == 2, result.describe()
    assert "saved with world size 2, resuming with 1" in result.output
    assert not (out / contract.MANIFEST_NAME).exists()


def test_missing_dataset_file(tiny_model_dir: Path, stage_runner, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "train.jsonl"
    result = stage_runner.run("trainer.sft", guide_argv(tiny_model_dir, missing, tmp_path / "out"))
    assert result.returncode == 2, result.describe()
    assert f"r1-grpo sft: error: {missing}: no such file or folder" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_zero2_on_cpu_needs_cuda(
    tiny_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    argv = guide_argv(tiny_model_dir, arith_jsonl, tmp_path / "out") + ["--plugin", "zero2"]
    result = stage_runner.run("trainer.sft", argv)
    assert result.returncode == 2, result.describe()
    assert "--plugin zero2 needs CUDA GPUs; on CPU use --plugin ddp" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--plugin", "zero9"], "--plugin 'zero9': expected one of ddp, zero2, zero2_cpu, gemini, 3d"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
        (["--gradient_accumulation_steps", "-1"], "--gradient_accumulation_steps must be >= 1, got -1"),
        (
            ["--evaluation_strategy", "sometimes"],
            "--evaluation_strategy 'sometimes': expected one of no, steps, epoch",
        ),
        (
            ["--lr_scheduler_type", "step"],
            "--lr_scheduler_type 'step': expected one of cosine, linear, constant",
        ),
        (["--tp_size", "2"], "--tp_size/--pp_size need --plugin 3d"),
        (["--save_total_limit", "0"], "--save_total_limit must be >= 1"),
    ],
)
def test_bad_flag_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = guide_argv(Path("unused-model"), Path("unused.jsonl"), tmp_path / "out") + extra
    assert sft.main(argv) == 2
    assert f"r1-grpo sft: error: {message}" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # refused before touching the output folder


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--not_a_flag", "1"], "unrecognized arguments: --not_a_flag 1"),
        (
            ["--learning_rate", "fast"],
            "argument --learning_rate/--learning-rate: invalid float value: 'fast'",
        ),
        (["--bf16", "maybe"], "argument --bf16: Truthy value expected"),
    ],
)
def test_unparsable_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = guide_argv(Path("unused-model"), Path("unused.jsonl"), tmp_path / "out") + extra
    with pytest.raises(SystemExit) as e:
        sft.main(argv)
    assert e.value.code == 2
    assert f"r1-grpo sft: error: {message}" in capsys.readouterr().err


def test_help_lists_the_guide_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        sft.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in guide_argv(Path("m"), Path("d"), Path("o")):
        if flag.startswith("--"):
            assert flag in text, flag


# ---------------------------------------------------------------------------------------------
# Pieces of the loop, in process


def test_bf16_autocast_runs_on_cpu(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    args = sft.SFTArgs(model_name_or_path="m", output_dir="o", bf16=True)
    with autocast(args, torch.device("cpu")):
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16  # the matmuls really ran in bf16
    loss = torch.nn.functional.cross_entropy(logits.float()[0, :-1], ids[0, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    with autocast(sft.SFTArgs(model_name_or_path="m", output_dir="o"), torch.device("cpu")):
        assert model(input_ids=ids).logits.dtype == torch.float32


def test_labels_cover_completion_tokens_only(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from trainer.r1.data import DataError, Example

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [
        Example("Compute 1 + 2.", "1 + 2 = 3", "3", "t:0"),
        Example("Compute 12 + 30.", "12 + 30 = 42", "42", "t:1"),
    ]
    rows, truncated = sft.tokenize_examples(examples, tok, max_seq_length=1024)
    assert truncated == 0
    batch = sft.collate(rows, tok.pad_token_id, "cpu")
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        labels = batch["labels"][i]
        assert (labels[: row.prompt_len] == sft.IGNORE_INDEX).all() and (labels[n:] == sft.IGNORE_INDEX).all()
        assert labels[row.prompt_len : n].tolist() == row.input_ids[row.prompt_len :]
        assert (
            tok.decode(row.input_ids[row.prompt_len :])
            == f"<think>\n{examples[i].reasoning}\n</think>\n<answer>{examples[i].answer}</answer></s>"
        )
        assert batch["attention_mask"][i].sum() == n
    assert sft.n_completion_tokens(rows) == int((batch["labels"] != sft.IGNORE_INDEX).sum())
    limit = max(r.prompt_len for r in rows) + 2
    short, truncated = sft.tokenize_examples(examples, tok, max_seq_length=limit)
    assert truncated == 2 and [len(r.input_ids) for r in short] == [limit, limit]
    with pytest.raises(
        DataError,
        match=r"2 of 2 prompts leave no room for a completion within --max_seq_length 5 tokens: t:0 ",
    ):
        sft.tokenize_examples(examples, tok, max_seq_length=5)


def test_step_batches_cover_an_epoch_once() -> None:
    order = sft.epoch_order(40, seed=3, epoch=0)
    assert sorted(order) == list(range(40)) and order == sft.epoch_order(40, seed=3, epoch=0)
    assert order != sft.epoch_order(40, seed=3, epoch=1)
    accum, global_micro = 2, 4
    seen = [
        i
        for step in range(40 // (accum * global_micro))
        for mb in sft.step_micro_batches(order, step, accum, global_micro)
        for i in mb
    ]
    assert seen == order


def test_dataset_smaller_than_one_step_is_an_error_even_with_max_steps() -> None:
    args = sft.SFTArgs(model_name_or_path="m", output_dir="o", gradient_accumulation_steps=2, max_steps=10)
    assert total_optimizer_steps(args, micro_batches_per_epoch=2) == 10
    with pytest.raises(ArgsError, match="the dataset is smaller than one optimizer step"):
        total_optimizer_steps(args, micro_batches_per_epoch=1)  # one micro-batch, two needed per step
    args.max_steps = -1
    args.num_train_epochs = 1.5
    assert total_optimizer_steps(args, micro_batches_per_epoch=9) == 6
