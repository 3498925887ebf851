"""The KL term's reference when the Booster casts the policy to bfloat16 (what the ZeRO and Gemini plugins
do under --bf16), in process on CPU: the stage's own pieces (Stage, its DDP Booster, `reference_model`,
`make_rollout`, `policy_update`), in the order `grpo.train` calls them. ZeRO and Gemini need CUDA, so the
cast is the plugins' own `module.to(torch.bfloat16)`, made here before boosting; the rest is the real code.
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import pytest
import torch

from trainer import grpo
from trainer.lifecycle import Stage
from trainer.modeling import load_model_and_tokenizer
from trainer.r1.data import DataArgs, load_examples
from trainer.r1.prompt import DEFAULT_PROMPT, Prompter
from trainer.rl.logprobs import unwrap_model


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch):
    """A process group of one in this process (gloo), torn down after the test with the environment
    and the SIGTERM handler the stage installs."""
    import socket

    import torch.distributed as td

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for name, value in {**env, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    handler = signal.getsignal(signal.SIGTERM)
    assert not td.is_initialized()
    yield
    signal.signal(signal.SIGTERM, handler)
    if td.is_initialized():
        td.destroy_process_group()


def test_bf16_cast_policy_has_kl_exactly_0_at_step_0(
    world_of_one, warm_model_dir: Path, arith_jsonl: Path, tmp_path: Path
) -> None:
    args = grpo.GRPOArgs(
        model_name_or_path=str(warm_model_dir),
        output_dir=str(tmp_path / "grpo"),
        plugin="ddp",
        per_device_train_batch_size=2,
        num_generations=4,
        inference_batch_size=2,
        max_completion_length=24,
        learning_rate=1e-3,
        beta=0.04,
        max_steps=2,
        save_steps=0,
        report_to="none",
        seed=3,
    )
    args.validate()
    data_args = DataArgs(dataset_name=str(arith_jsonl))
    stage = Stage.start("grpo", data_args, args)
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args, stage.device)
    initial = copy.deepcopy(model)  # as grpo.train: the reference's weights, taken before boosting
    model = stage.boost(model.to(torch.bfloat16), total_steps=2)
    policy = unwrap_model(model)
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in initial.parameters()} == {torch.float32}
    ref = grpo.reference_model(initial, policy)
    stage.resume()

    examples, _ = load_examples(str(arith_jsonl), "train")
    stream = grpo.PromptStream(examples, args.seed, 0, 1)
    generator = torch.Generator().manual_seed(args.seed)
    cache: dict[str, list[int]] = {}
    prompter = Prompter(DEFAULT_PROMPT, tokenizer)
    records = []
    start = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    for _ in range(2):
        timings = {"generate_s": 0.0, "score_s": 0.0}
        rollout = grpo.make_rollout(
            model, ref, tokenizer, stream, 2, 1.0, args, stage.device, generator, cache, timings, prompter
        )
        assert rollout.ref_logprobs is not None and rollout.completion_mask.sum() > 0
        records.append(grpo.policy_update(stage, rollout, args, reuse=False))
        stage.optimizer_step()
    stage.metrics.close()

    first, second = records
    # Step 0: the policy and the reference hold the same bfloat16 weights and run the same kernels.
    assert first["kl"] == 0.0, first
    assert first["ratio_mean"] == 1.0 and first["clip_ratio"] == 0.0, first
    # The update moved the policy, and the KL term sees it: it is not zero by construction.
    moved = [k for k, v in policy.state_dict().items() if not torch.equal(v, start[k])]
    assert moved, "the update left every weight unchanged: the test shows nothing"
    assert second["kl"] > 0.0, second
