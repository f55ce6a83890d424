"""Pieces of a training step that every training recipe shares (full, LoRA, and later DPO).

The recipes keep their loops, top to bottom, in their own files; what is here is the same in all
of them: how many steps a run plans, the autocast it runs under, what a batch's loss is, how many
real tokens it carried, and the held-out evaluation.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from kubetune.trainer.config.finetune import TrainingConfig
from kubetune.trainer.data.dataset import BatchLoader
from kubetune.trainer.training.loss import causal_lm_loss_sum_from_hidden, count_label_tokens


def planned_steps(cfg: TrainingConfig, batches_per_epoch: int) -> int:
    """Optimizer steps in `epochs` passes over the data, capped by max_steps."""
    per_epoch = batches_per_epoch / cfg.gradient_accumulation_steps
    steps = max(1, math.floor(per_epoch * cfg.epochs))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def bf16_autocast(device: torch.device, dtype: torch.dtype, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for fp32 weights on CUDA; on the CPU, fp32 stays exact and deterministic."""
    if enabled and device.type == "cuda" and dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token loss of one batch. The lm_head runs inside the loss, on labelled positions only."""
    hidden = model.hidden_states(
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
    )
    return causal_lm_loss_sum_from_hidden(hidden, model.lm_head, batch["labels"])


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding (what tokens/s counts)."""
    return int(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: BatchLoader, device: torch.device, autocast, max_batches: Optional[int]) -> float:
    """Mean loss per target token over the held-out set. Under torchrun every rank scores its slice
    of each eval batch (the loader's rank/world_size) and the sums are all-reduced, so every rank
    returns the same number."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader.epoch_batches(max_batches):
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast:
            total += float(batch_loss_sum(model, batch))
        tokens += count_label_tokens(batch["labels"])
    model.train()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sums = torch.tensor([total, float(tokens)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        total, tokens = float(sums[0]), int(sums[1])
    return total / max(1, tokens)
