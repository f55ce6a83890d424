"""Distributed training under torchrun: the process group, FSDP2 sharding, and the few collectives
the training recipes need. One process (no torchrun, or WORLD_SIZE=1) is the same code path with a
`World` of size 1, where every helper is a no-op, so a recipe reads the same either way.

The set-up order a recipe follows (docs/architecture.md "Distributed training"):

    world = init_distributed(cfg.device, cfg.distributed)    # process group, device, logging
    model = load_pretrained(..., device=world.load_device)    # the whole model, then
    shard_model(model, world, cfg.distributed, dtype)         # FSDP2: each decoder layer, then the root
    optimizer = build_optimizer(model.named_parameters(), ...)
    ...
    step_tokens = world.sum_int(sum(count_label_tokens(b["labels"]) for b in micro_batches))
    loss = batch_loss_sum(model, batch) / step_tokens         # gradients are summed across ranks
    grad_norm = clip_grad_norm(params, cfg.max_grad_norm)     # the global norm, as one process
    state = full_state_dict(model, world)                     # rank 0: full CPU tensors; others: {}

Gradients are SUMMED across ranks (not averaged): each rank's loss is its own token-summed loss
divided by the label tokens of the whole global step, so the sum of the ranks' gradients is exactly
the gradient of the global batch, however it is split across ranks and micro-batches.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from kubetune.errors import KubetuneError
from kubetune.trainer.device import resolve_device

log = logging.getLogger("kubetune.distributed")


class DistributedError(KubetuneError):
    """A distributed run that cannot work as configured; the message names the setting and the fix."""


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `size` processes, its device, the backend."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group (one process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that serves metrics, writes metrics.jsonl, the termination log and final files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def load_device(self) -> torch.device:
        """Where to load the whole model before `shard_model`: the CPU under torchrun (fully_shard
        then moves each rank's shards to its device, so no GPU ever holds the whole model), else
        the device itself."""
        return torch.device("cpu") if self.distributed else self.device

    # ---- collectives (no-ops with one process) -------------------------------------------
    def sum_int(self, value: int) -> int:
        """The sum of an integer over all ranks (e.g. the label tokens of a global step)."""
        if not self.distributed:
            return int(value)
        tensor = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor)
        return int(tensor.item())

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over all ranks of a (small) tensor; returns a new tensor, the input is unchanged."""
        if not self.distributed:
            return tensor.clone()
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (a SIGTERM seen by one rank stops all at one step)."""
        if not self.distributed:
            return bool(flag)
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a small picklable value, e.g. a folder name)."""
        if not self.distributed:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (small, picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def main_decides(self, decide: Callable[[], Any]) -> Any:
        """Rank 0's `decide()` on every rank, the others never running it (resume's choice: one rank
        hashes the newest checkpoint and renames leftovers, not every rank at once); a KubetuneError
        it raises is raised on every rank, so every rank stops with the same message."""
        if not self.distributed:
            return decide()
        outcome: Any = None
        if self.is_main:
            try:
                outcome = (decide(), None)
            except KubetuneError as err:
                outcome = (None, err)
        value, error = self.broadcast_object(outcome)
        if error is not None:
            raise error
        return value


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto", settings: Any = None) -> World:
    """The `World` of this process, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). Without torchrun, or with WORLD_SIZE=1: one process, no group.

    `device` is the recipe's `device:` (auto | cpu | cuda): on CUDA each rank takes the GPU of its
    LOCAL_RANK. `settings` is the config's `distributed:` section (backend, timeout_seconds)."""
    size = world_size_from_env()
    if size <= 1:
        return World(device=resolve_device(device))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    setup_rank_logging(rank)
    backend_setting = getattr(settings, "backend", "auto")
    timeout = datetime.timedelta(seconds=float(getattr(settings, "timeout_seconds", 600)))
    target = resolve_device(device)
    if target.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                f"set --nproc-per-node to at most {torch.cuda.device_count()}"
            )
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    backend = backend_setting if backend_setting != "auto" else ("nccl" if target.type == "cuda" else "gloo")
    if backend == "nccl" and target.type != "cuda":
        raise DistributedError("distributed.backend: nccl needs CUDA GPUs; use gloo (or auto) with device: cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout, rank=rank, world_size=size)
    world = World(rank=rank, size=size, local_rank=local_rank, device=target, backend=backend)
    log.info("rank %d of %d on %s (%s, collective timeout %ss)", rank, size, target, backend, timeout.total_seconds())
    return world


def close_distributed() -> None:
    """Tear the process group down at the end of a run (a clean exit, no NCCL warning)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup_rank_logging(rank: int) -> None:
    """Each rank's log lines start with `[rank N]`, so interleaved output stays readable."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------- FSDP2


def mixed_precision_dtypes(world: World, dtype: torch.dtype, settings: Any = None) -> tuple[Optional[torch.dtype], Optional[torch.dtype]]:
    """(param_dtype, reduce_dtype) of FSDP2's MixedPrecisionPolicy.

    `distributed.mixed_precision`: auto = on CUDA, bf16 compute with fp32 gradient reduction
    (the fp32 sharded parameters stay the optimizer's master weights); off on the CPU, where fp32
    stays exact. bf16 = the same anywhere; off = compute and reduce in the parameters' dtype."""
    mode = getattr(settings, "mixed_precision", "auto")
    if mode == "off" or (mode == "auto" and world.device.type != "cuda"):
        return None, None
    return torch.bfloat16, torch.float32


def shard_model(
    model: nn.Module, world: World, settings: Any = None, dtype: torch.dtype = torch.float32, force: bool = False
) -> nn.Module:
    """FSDP2 (`fully_shard`) on each decoder layer, then on the root (embeddings, final norm,
    lm_head); the model is changed in place and returned. A no-op with one process.

    Parameter names do not change (each becomes a DTensor sharded on dim 0 over all ranks).
    `model.hidden_states` (what the training loss calls instead of forward) is registered as a
    forward method, so FSDP all-gathers around it like around forward. The root keeps its
    parameters unsharded after forward, so the loss can use lm_head.weight directly.
    Gradients are summed across ranks, not averaged (see the module docstring).
    `force=True` shards even over one rank (a benchmark of the FSDP2 path on one GPU; it needs an
    initialised process group)."""
    if not (world.distributed or force):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.fsdp import register_fsdp_forward_method

    mesh = init_device_mesh(world.device.type, (world.size,))
    param_dtype, reduce_dtype = mixed_precision_dtypes(world, dtype, settings)
    common: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "offload_policy": CPUOffloadPolicy() if getattr(settings, "cpu_offload", False) else OffloadPolicy(),
    }
    reshard = bool(getattr(settings, "reshard_after_forward", True))
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard, **common)
    fully_shard(model, reshard_after_forward=False, **common)
    register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # sum: each rank's loss is already over the global tokens
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no AVG/PREMUL_SUM)
    return model


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over sharded or plain gradients; returns the total norm
    as a plain tensor: with FSDP2 the norm of the full gradients (all-reduced), as one process has."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if is_sharded(norm) else norm


def full_state_dict(
    model: nn.Module,
    world: World,
    keep: Optional[Callable[[str], bool]] = None,
) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) tensors as CPU tensors on rank 0, `{}` on the others.

    Tensors are gathered one at a time (all ranks take part in each all-gather) and moved to the
    CPU on rank 0 at once: rank 0's peak is one full copy of the kept tensors in CPU memory plus
    one full tensor on its device; the other ranks never hold more than one full tensor.
    `keep(name)` selects tensors by name (e.g. only the LoRA adapters). With one process: the
    model's own state dict (no copies)."""
    state = model.state_dict()
    if not world.distributed:
        return {name: tensor for name, tensor in state.items() if keep is None or keep(name)}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if keep is not None and not keep(name):
            continue
        full = tensor.full_tensor() if is_sharded(tensor) else tensor
        if world.is_main:
            out[name] = full.detach().to("cpu", copy=True)
        del full
    return out
