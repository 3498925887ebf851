"""Models in and out of a stage (trainer/modeling.py): a bad --model_name_or_path is one line and exit code
2, a bfloat16 load makes no float32 copy, the KL reference comes from the files in the policy's dtype, and
the final model keeps the base model's dtype (or --save_dtype)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer import modeling
from trainer.sft import SFTArgs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def sft_argv(model: str | Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--report_to",
        "none",
        "--max_seq_length",
        "64",
        *extra,
    ]


def bad_folders(root: Path, model: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of wrong folder and the message it must give."""
    stage = root / "stage"
    checkpoint = stage / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    empty = root / "empty"
    empty.mkdir()
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(model / "config.json", no_weights)
    no_tokenizer = root / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in model.iterdir():
        if f.name not in TOKENIZER_FILES and f.is_file():
            shutil.copy(f, no_tokenizer)
    missing = root / "nowhere" / "model"
    return {
        "missing": (missing, f"--model_name_or_path '{missing}': no such folder"),
        "checkpoint": (
            checkpoint,
            f"--model_name_or_path '{checkpoint}': a training checkpoint; pass the stage folder ({stage})",
        ),
        "unfinished stage": (
            stage,
            f"--model_name_or_path '{stage}': a stage folder without its final model (no config.json; "
            "the stage has not finished",
        ),
        "empty": (empty, f"--model_name_or_path '{empty}': not a model folder (no config.json)"),
        "no weights": (
            no_weights,
            f"--model_name_or_path '{no_weights}': no model weights (model*.safetensors or "
            "pytorch_model*.bin) beside config.json",
        ),
        "no tokenizer": (
            no_tokenizer,
            f"--model_name_or_path '{no_tokenizer}': no tokenizer (tokenizer.json or tokenizer_config.json) "
            "beside the model",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing", "checkpoint", "unfinished stage", "empty", "no weights", "no tokenizer"]
)
def test_bad_model_folder_is_one_line_and_exit_2(
    case: str, tiny_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    folder, message = bad_folders(tmp_path, tiny_model_dir)[case]
    result = stage_runner.run("trainer.sft", sft_argv(folder, arith_jsonl, tmp_path / "out"))
    assert result.returncode == 2, result.describe()
    assert f"r1-grpo sft: error: {message}" in result.output, result.describe()
    assert "Traceback" not in result.output, result.describe()


def test_checkpoint_folder_under_torchrun_and_in_eval(
    tiny_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    folder, message = bad_folders(tmp_path, tiny_model_dir)["checkpoint"]
    result = stage_runner.run("trainer.sft", sft_argv(folder, arith_jsonl, tmp_path / "sft"), nproc=2)
    # torchrun itself exits 1 when a worker fails; its summary gives each rank's own exit code and message.
    # (A rank torchrun stops with SIGTERM after the first exit exits 2 too: trainer.runtime.bad_input_exit.)
    assert result.returncode == 1, result.describe()
    codes = re.findall(r"exitcode\s*: (-?\d+)", result.output)
    assert codes and set(codes) == {"2"}, result.describe()
    assert f"traceback : r1-grpo sft: error: {message}" in result.output, result.describe()
    # (torchrun prints its own ChildFailedError traceback after the ranks' lines: not ours to remove.)
    argv = ["--model_name_or_path", str(folder), "--dataset_name", str(arith_jsonl)]
    result = stage_runner.run("trainer.evaluate", [*argv, "--output_dir", str(tmp_path / "eval")])
    assert result.returncode == 2 and f"r1-grpo eval: error: {message}" in result.output, result.describe()


def test_training_dtype_and_where_the_weights_go() -> None:
    ddp = SFTArgs(model_name_or_path="m", output_dir="o", bf16=True)
    zero = SFTArgs(model_name_or_path="m", output_dir="o", bf16=True, plugin="zero2")
    assert modeling.training_dtype(ddp) == torch.float32  # autocast over float32 weights
    assert modeling.training_dtype(zero) == torch.bfloat16  # the plugin trains a bfloat16 model
    assert modeling.training_dtype(SFTArgs(model_name_or_path="m", output_dir="o", plugin="gemini")) == (
        torch.float32
    )
    gpu = torch.device("cuda", 3)
    kwargs = modeling.from_pretrained_kwargs(zero, gpu, torch.bfloat16)
    assert kwargs["torch_dtype"] == torch.bfloat16 and kwargs["device_map"] == {"": "cuda:3"}
    assert modeling.from_pretrained_kwargs(ddp, gpu, torch.float32)["device_map"] == {"": "cuda:3"}
    assert "device_map" not in modeling.from_pretrained_kwargs(zero, torch.device("cpu"), torch.bfloat16)


LOAD_PEAK = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch
    from transformers import AutoTokenizer
    from transformers.models.llama import modeling_llama  # noqa: F401 (imported before measuring)
    from trainer.evaluate import EvalArgs
    from trainer.modeling import load_pretrained

    AutoTokenizer.from_pretrained(sys.argv[1])  # imports and caches outside the measured window

    def anon_kib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    base = anon_kib()
    peak = [base]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    args = EvalArgs(model_name_or_path=sys.argv[1], output_dir="unused", bf16=sys.argv[2] == "bf16")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = load_pretrained(sys.argv[1], args, torch.device("cpu"), dtype)
    done.set()
    t.join()
    peak[0] = max(peak[0], anon_kib())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(json.dumps({"peak_mib": (peak[0] - base) / 1024, "dtypes": dtypes}))
    """
)


def test_bf16_load_makes_no_float32_copy(tiny_model_dir: Path, stage_runner, tmp_path: Path) -> None:
    """A 46M-parameter model saved in float32: loading it under --bf16 holds the bfloat16 weights and
    not a float32 model on the way (anonymous memory; the files are memory-mapped, not copied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    del model
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, tmp_path / "m")
    peaks = {}
    for mode in ("bf16",):
        proc = subprocess.run(
            [sys.executable, "-c", LOAD_PEAK, str(tmp_path / "m"), mode],
            cwd=stage_runner.workdir,
            env=stage_runner.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    bf16_mib = n_params * 2 / 2**20
    assert peaks["bf16"]["dtypes"] == ["torch.bfloat16"]
    # A float32 model first (or beside) would add 2 x bf16_mib; allow 30% over the bf16 weights. The
    # lower bound shows the probe sees the weights (the float32 file itself is mapped, not anonymous).
    assert 0.8 * bf16_mib < peaks["bf16"]["peak_mib"] < 1.3 * bf16_mib, (peaks, bf16_mib)


def test_reference_weights_come_from_the_files_in_the_policys_dtype(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.grpo import GRPOArgs, reference_model

    args = GRPOArgs(model_name_or_path=str(tiny_model_dir), output_dir="o")
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16)  # as ZeRO casts it
    initial = modeling.load_reference_weights(str(tiny_model_dir), args, policy, torch.device("cpu"))
    assert {p.dtype for p in initial.parameters()} == {torch.bfloat16}
    ref = reference_model(initial, policy)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, policy(ids).logits)  # KL exactly 0 at step 0
    for (name, p), q in zip(ref.named_parameters(), policy.parameters(), strict=True):
        assert torch.equal(p, q), name


def _saved(folder: Path) -> tuple[set[str], str]:
    from safetensors import safe_open

    dtypes = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            dtypes |= {str(st.get_slice(k).get_dtype()) for k in st.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return dtypes, json.loads((folder / "config.json").read_text())["torch_dtype"]


def test_final_model_keeps_the_base_dtype_or_save_dtype(
    tiny_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16).save_pretrained(base)
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, base)
    for extra, want in (((), ("BF16", "bfloat16")), (("--save_dtype", "float32"), ("F32", "float32"))):
        out = tmp_path / f"sft-{want[1]}"
        result = stage_runner.run("trainer.sft", sft_argv(base, arith_jsonl, out, *extra))
        assert result.returncode == 0, result.describe()
        assert _saved(out) == ({want[0]}, want[1])
        assert f"final model saved in {want[1]}" in result.output
        reloaded = AutoModelForCausalLM.from_pretrained(out, torch_dtype="auto")
        assert reloaded.dtype == getattr(torch, want[1])
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr() or not (
            reloaded.config.tie_word_embeddings
        )
