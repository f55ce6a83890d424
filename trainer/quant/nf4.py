"""4-bit NormalFloat (NF4) base weights for QLoRA, stored as torchao's `NF4Tensor`.

torchao's NF4Tensor (a tensor subclass) holds the QLoRA format: 64-weight blocks, each an
index into the 16-value NF4 code book times the block's absmax, and the absmaxes themselves
double-quantized to int8 in groups of up to 256 (about 4.13 bits per weight). `F.linear` on it
dequantizes and multiplies (`linear_nf4`), gradients flow to the input, never to the weight.
It runs on CPU and CUDA with no custom kernels, so it works with the torch build installed here.

Only decoder linear layers are quantized: embeddings, norms and `lm_head` stay in the model's
dtype (as in the QLoRA paper and bitsandbytes' defaults), since they are small or sensitive.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from kubetune.errors import KubetuneError

BLOCK_SIZE = 64  # weights per absmax block (QLoRA paper)
MAX_SCALER_BLOCK_SIZE = 256  # absmaxes per double-quantization group (QLoRA paper)
DEFAULT_SKIP = ("lm_head",)


@contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    """torchao logs a warning for each CUDA-only extension (mxfp8, cutlass) it cannot load on this
    build, and torch one for each enum torchao registers with pytree; NF4 needs none of them, so
    keep that noise out of the users' logs."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _torchao_nf4():
    try:
        with _quiet_torchao_import():
            from torchao.quantization import NF4Tensor, to_nf4
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise KubetuneError(
            f"model.quantize_base: nf4 needs torchao ({exc}); install it with `pip install 'kubetune[quant]'`"
        ) from None
    return NF4Tensor, to_nf4


def is_nf4(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "NF4Tensor"


def scaler_block_size(numel: int, block_size: int = BLOCK_SIZE, shards: int = 1) -> int:
    """The largest double-quantization group (<= 256 absmaxes) that divides the number of blocks.

    Real models (every dimension a multiple of 128) get 256; tiny test models get a smaller group.
    `shards` > 1 (FSDP2 over that many ranks): the number of groups must split evenly too, since
    torchao's NF4Tensor shards its blocks, absmaxes and groups alike; real models are unaffected.
    """
    n_blocks = numel // block_size
    for size in range(min(MAX_SCALER_BLOCK_SIZE, n_blocks), 0, -1):
        if n_blocks % size == 0 and (n_blocks // size) % shards == 0:
            return size
    return 1


def to_nf4(weight: torch.Tensor, name: str = "weight", shards: int = 1) -> torch.Tensor:
    """A plain weight -> torchao NF4Tensor (same shape and nominal dtype, ~0.27x the bf16 bytes).
    `shards`: FSDP2 will shard it over that many ranks (see scaler_block_size)."""
    _, torchao_to_nf4 = _torchao_nf4()
    if weight.numel() % BLOCK_SIZE != 0:
        raise KubetuneError(
            f"model.quantize_base: {name} has {weight.numel()} weights, not a multiple of the NF4 block "
            f"size {BLOCK_SIZE}; NF4 cannot quantize it (remove model.quantize_base)"
        )
    if shards > 1 and (weight.shape[0] % shards or (weight.numel() // BLOCK_SIZE) % shards):
        raise KubetuneError(
            f"model.quantize_base: {name} ({list(weight.shape)}) cannot be split evenly over {shards} ranks in NF4 "
            f"blocks of {BLOCK_SIZE}; run QLoRA with a number of processes that divides its rows, or without quantize_base"
        )
    return torchao_to_nf4(weight.detach().contiguous(), BLOCK_SIZE, scaler_block_size(weight.numel(), shards=shards))


def quantize_base(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP, shards: int = 1) -> nn.Module:
    """Store every frozen linear weight (plain nn.Linear or LoRALinear base) as NF4, in place.
    `shards`: the FSDP2 world size the model will be sharded over (QLoRA under torchrun).

    Modules whose last name is in `skip` (lm_head by default) keep their dtype. Cast the model to
    its training dtype *before* this: `model.to(dtype)` afterwards would dequantize the weights.
    """
    skip = set(skip)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in skip or not _is_linear_like(module) or weight is None or is_nf4(weight):
            continue
        quantized = nn.Parameter(to_nf4(weight, f"{name}.weight", shards=shards), requires_grad=False)
        tied = [m for m in model.modules() if m is not module and getattr(m, "weight", None) is weight]
        if tied:
            raise KubetuneError(f"model.quantize_base: {name}.weight is shared with another module; cannot quantize it")
        module.weight = quantized
    return model


def _is_linear_like(module: nn.Module) -> bool:
    from kubetune.trainer.peft.lora import LoRALinear

    return isinstance(module, (nn.Linear, LoRALinear))


def dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4 -> dense tensor (its original dtype unless given); plain tensors pass through."""
    if is_nf4(weight):
        dense = weight.get_original_weight()
        return dense.to(dtype) if dtype is not None else dense
    return weight.detach().to(dtype) if dtype is not None else weight.detach()


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes actually held: for NF4, the packed 4-bit codes + int8 scalers + factors + code book."""
    if is_nf4(tensor):
        inner, _ = tensor.__tensor_flatten__()
        return sum(getattr(tensor, attr).nbytes for attr in inner)
    return tensor.nbytes


def weight_nbytes(model: nn.Module, only_linear: bool = False) -> int:
    """Bytes of the model's parameters (and buffers), NF4 counted at its real size."""
    total = 0
    for module in model.modules():
        if only_linear and not _is_linear_like(module):
            continue
        for _, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            total += tensor_nbytes(tensor)
    return total
