"""The optimizer (AdamW; torch's Adafactor; torchao's 8-bit AdamW) and the learning-rate
schedule (warmup, then cosine / linear / constant)."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.optim.optimizer import _get_fused_kernels_supported_devices


def fused_supported(device: torch.device) -> bool:
    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    """`cfg.name` over the trainable parameters: adamw (fused kernels where the device has them),
    adafactor (torch.optim.Adafactor) or adamw_8bit (torchao's AdamW8bit).

    Weight decay applies to matrices only: decaying norm scales and biases toward zero only
    hurts (the usual practice in GPT/Llama training)."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    name = getattr(cfg, "name", "adamw")
    if name == "adafactor":
        # torch's Adafactor (no first moment, factored second moment); its default lr is relative (1e-2).
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    if name == "adamw_8bit":
        return _torchao_adamw_8bit()(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    fused = fused_supported(device) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def _torchao_adamw_8bit() -> type:
    """torchao's AdamW8bit (torchao.optim since 0.11; torchao.prototype.low_bit_optim before)."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        try:
            from torchao.prototype.low_bit_optim import AdamW8bit
        except ImportError:
            from kubetune.errors import KubetuneError

            raise KubetuneError(
                "optimizer.name: adamw_8bit needs torchao (pip install 'kubetune[quant]'); or use adamw or adafactor"
            ) from None
    return AdamW8bit


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
        lambda step: lr_multiplier(step, total_steps, cfg.name, warmup_steps(cfg, total_steps), cfg.min_lr_ratio),
    )


def warmup_steps(cfg: Any, total_steps: int) -> int:
    """lr_scheduler.warmup_steps, or warmup_ratio of the planned steps rounded up (as transformers)."""
    ratio = getattr(cfg, "warmup_ratio", None)
    return math.ceil(total_steps * ratio) if ratio is not None else cfg.warmup_steps
