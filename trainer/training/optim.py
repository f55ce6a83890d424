"""AdamW and the learning-rate schedule (warmup, then cosine / linear / constant)."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.optim.optimizer import _get_fused_kernels_supported_devices


def fused_supported(device: torch.device) -> bool:
    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused kernels where the device has them.

    Weight decay applies to matrices only: decaying norm scales and biases toward zero only
    hurts (the usual practice in GPT/Llama training)."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = fused_supported(device) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_multiplier(step: int, total_steps: int, name: str, warmup_steps: int, min_lr_ratio: float) -> float:
    """The factor on the base lr after `step` optimizer steps: linear warmup from 0, then decay
    to min_lr_ratio at total_steps (cosine or linear), or flat (constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif name == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"lr_scheduler.name: unknown schedule {name!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps, cfg.name, cfg.warmup_steps, cfg.min_lr_ratio),
    )
