"""Run under torchrun by tests/trainer/test_distributed.py (2 gloo processes on the CPU).

Shards the tiny model with `shard_model` and writes, from rank 0, a JSON report: each sharded
parameter's local element count on every rank next to its full count, whether the gathered full
state dict equals the unsharded model bit for bit, and the gradient norm `clip_grad_norm` reports
for one global batch next to the norm one process computes for the same batch.
"""
import json
import sys

import torch
import torch.distributed as dist

from kubetune.trainer.checkpoint import load_pretrained
from kubetune.trainer.distributed import (
    clip_grad_norm, full_state_dict, init_distributed, is_sharded, local_shard, shard_model,
)
from kubetune.trainer.training.loss import count_label_tokens
from kubetune.trainer.training.steps import batch_loss_sum


def global_batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4, 24), generator=generator)
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    mask[3, 20:] = 0  # one padded row
    labels[3, 20:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def main(out_path: str) -> None:
    world = init_distributed("cpu")
    reference = load_pretrained("builtin://tiny")  # unsharded, on every rank
    model = load_pretrained("builtin://tiny")
    shard_model(model, world)

    shards = {}
    for name, param in model.named_parameters():
        counts = [0] * world.size
        dist.all_gather_object(counts, local_shard(param).numel())
        shards[name] = {"sharded": is_sharded(param), "local": counts, "full": param.numel(),
                         "shape": list(param.shape)}

    gathered = full_state_dict(model, world)
    same = None
    if world.is_main:
        own = reference.state_dict()
        same = sorted(own) == sorted(gathered) and all(torch.equal(own[k], gathered[k]) for k in own)

    # One global batch: each rank its half, loss over the global label tokens, gradients summed.
    batch = global_batch(reference.args.vocab_size)
    tokens = world.sum_int(count_label_tokens(batch["labels"][world.rank * 2:(world.rank + 1) * 2]))
    part = {k: v[world.rank * 2:(world.rank + 1) * 2] for k, v in batch.items()}
    (batch_loss_sum(model, part) / tokens).backward()
    sharded_norm = float(clip_grad_norm(model.parameters(), 1e9))
    (batch_loss_sum(reference, batch) / count_label_tokens(batch["labels"])).backward()
    single_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9))

    if world.is_main:
        report = {"world_size": world.size, "shards": shards, "gathered_equal": same,
                  "grad_norm": {"sharded": sharded_norm, "single": single_norm}}
        with open(out_path, "w") as handle:
            json.dump(report, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
