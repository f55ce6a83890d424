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
import math
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

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


def scaler_groups(numel: int, shards: int = 1) -> int:
    """How many double-quantization groups a weight of `numel` weights gets when quantized for `shards`."""
    return (numel // BLOCK_SIZE) // scaler_block_size(numel, shards=shards)


def quantize_base(
    model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP, shards: int = 1, world_size: Optional[int] = None
) -> nn.Module:
    """Store every frozen linear weight (plain nn.Linear or LoRALinear base) as NF4, in place.

    `shards`: the FSDP2 world size the NF4 layout (the double-quantization groups) is chosen for:
    the run's world size, or on resume the one the run's base was first quantized for
    (`nf4_layout_shards`), so that a run resumed at another world size trains on the very base it
    trained on before. `world_size` (default: `shards`): the ranks FSDP2 will shard the model over
    now; every weight's groups must split over them, else a KubetuneError names the weight and the
    world sizes that would work.

    Modules whose last name is in `skip` (lm_head by default) keep their dtype. Cast the model to
    its training dtype *before* this: `model.to(dtype)` afterwards would dequantize the weights.
    """
    skip = set(skip)
    world_size = shards if world_size is None else world_size
    targets = [(name, module) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] not in skip and _is_linear_like(module)
               and getattr(module, "weight", None) is not None and not is_nf4(module.weight)]
    if world_size != shards:
        _check_layout_splits(targets, shards, world_size)
    for name, module in targets:
        weight = module.weight
        tied = [m for m in model.modules() if m is not module and getattr(m, "weight", None) is weight]
        if tied:
            raise KubetuneError(f"model.quantize_base: {name}.weight is shared with another module; cannot quantize it")
        module.weight = nn.Parameter(to_nf4(weight, f"{name}.weight", shards=shards), requires_grad=False)
    return model


def nf4_layout_shards(resume_state: Optional[dict], world_size: int) -> int:
    """The world size a run's NF4 layout is chosen for: this one for a fresh run; on resume the one
    the checkpoint's base was quantized for (`nf4_shards` in its training state; a checkpoint from
    before that key: the world size it was saved at, which is what its run quantized for)."""
    if resume_state is None:
        return world_size
    return int(resume_state.get("nf4_shards") or resume_state["data"].get("world_size", 1))


def _check_layout_splits(targets: list, shards: int, world_size: int) -> None:
    """A base quantized for `shards` ranks, to be sharded over `world_size`: every weight's rows,
    64-weight blocks and double-quantization groups must divide by world_size (torchao shards all three)."""
    counts = {f"{name}.weight": (module.weight.shape[0], module.weight.numel() // BLOCK_SIZE,
                                 scaler_groups(module.weight.numel(), shards))
              for name, module in targets if module.weight.numel() % BLOCK_SIZE == 0}  # else to_nf4 names it
    common = math.gcd(*(count for triple in counts.values() for count in triple)) if counts else 0
    if common % world_size == 0:
        return
    name, (rows, blocks, groups) = next((n, c) for n, c in counts.items() if any(x % world_size for x in c))
    fitting = [str(size) for size in range(1, min(common, 64) + 1) if common % size == 0]
    raise KubetuneError(
        f"model.quantize_base: this run's NF4 base was quantized for {shards} process(es), and {name} ({rows} rows, "
        f"{blocks} blocks of {BLOCK_SIZE}, {groups} double-quantization group(s)) cannot be split evenly over "
        f"{world_size} processes; quantizing it again for {world_size} would change the base the adapters trained on. "
        f"Resume this run with {' or '.join(fitting)} process(es), or start a new run (resume: never with a new "
        "output_dir, or overwrite_output_dir: true)"
    )


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
