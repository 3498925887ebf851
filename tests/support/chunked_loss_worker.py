"""A torchrun worker: the chunked SFT loss through the Colossal-AI Booster's DDP gives the gradients of the
logits formula, all-reduced over the ranks.

`torchrun --nproc_per_node=2 tests/support/chunked_loss_worker.py`: every rank builds the same random-init
Qwen3, boosts two copies (ddp plugin), runs the chunked loss on one and the full-logits cross-entropy on the
other, each on this rank's own batch; then checks, on every rank, that the two gradients are equal and equal
to the mean over ranks of the gradients a plain (unwrapped) copy gets from each rank's batch alone. Exit
code 0 when all hold, 1 with the first difference printed.
"""

from __future__ import annotations

import copy
import sys

import colossalai
import torch
import torch.distributed as td
from colossalai.booster import Booster
from colossalai.booster.plugin import TorchDDPPlugin
from transformers import Qwen3Config, Qwen3ForCausalLM

from trainer.sft import IGNORE_INDEX, completion_loss_sum


def reference_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def main() -> int:
    colossalai.launch_from_torch(backend="gloo", seed=0, verbose=False)
    rank, world = td.get_rank(), td.get_world_size()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=301,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        sliding_window=None,
    )
    plain = Qwen3ForCausalLM(config)
    chunked, full = copy.deepcopy(plain), copy.deepcopy(plain)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    ids = torch.randint(0, config.vocab_size, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :5] = IGNORE_INDEX  # the prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    boosted = []
    for model in (chunked, full):
        booster = Booster(plugin=TorchDDPPlugin(find_unused_parameters=False, broadcast_buffers=False))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        wrapped, optimizer, *_ = booster.boost(model, optimizer)
        boosted.append((booster, wrapped, optimizer))
    (b1, m1, o1), (b2, m2, o2) = boosted
    b1.backward(completion_loss_sum(m1, batch, fused=True, chunk_rows=7), o1)
    b2.backward(reference_loss(m2, batch), o2)
    reference_loss(plain, batch).backward()

    names = [n for n, _ in plain.named_parameters()]
    got = dict(chunked.named_parameters())
    want = dict(full.named_parameters())
    local = dict(plain.named_parameters())
    for name in names:
        mean = local[name].grad.clone()
        td.all_reduce(mean)
        mean /= world
        for label, grad, expected in (
            ("chunked vs full-logits DDP", got[name].grad, want[name].grad),
            ("chunked DDP vs mean of the ranks' own gradients", got[name].grad, mean),
        ):
            if grad is None or not torch.allclose(grad, expected, rtol=1e-4, atol=1e-6):
                diff = None if grad is None else float((grad - expected).abs().max())
                print(f"rank {rank}: {label}: {name} differs (max abs diff {diff})", flush=True)
                return 1
        if torch.allclose(local[name].grad, mean) and name.endswith("embed_tokens.weight"):
            print(
                f"rank {rank}: the ranks' batches give equal gradients; the test proves nothing", flush=True
            )
            return 1
    td.barrier()
    print(f"rank {rank}: {len(names)} gradients equal", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
