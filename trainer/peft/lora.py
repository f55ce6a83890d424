"""LoRA and DoRA linear layers, and wrapping a model's projections with them.

The math follows PEFT's `LoraLayer` exactly, so the same weights give the same outputs:

    LoRA:  y = W x + b + s * B A dropout(x)                      s = alpha / r
    DoRA:  y = m / ||W + s B A||_row * (W x + s B A x) + b       (the norm is detached, DoRA paper 4.3)

Parameter names mirror PEFT's state dict below the wrapped module (`q_proj.lora_A.weight`,
`q_proj.lora_B.weight`, `q_proj.lora_magnitude_vector`), while the frozen base keeps its own
name (`q_proj.weight`), so HF checkpoints still load into a wrapped model by name.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kubetune.errors import KubetuneError


class LoRASettings(Protocol):
    """What apply_lora needs; `kubetune.trainer.config.lora.LoRASection` is one."""

    rank: int
    alpha: float
    dropout: float
    target_modules: list[str]
    use_dora: bool


class LoRALinear(nn.Module):
    """A frozen linear layer (plain or NF4-quantized weight) plus a trainable low-rank update."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise KubetuneError(f"lora.rank: must be > 0, got {rank}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.alpha = alpha
        self.use_dora = use_dora
        # rsLoRA scales by alpha / sqrt(r); PEFT records it as use_rslora in adapter_config.json.
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        # The base keeps its parameter objects (tied lm_head stays tied, NF4 stays NF4), frozen.
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": dtype or adapter_dtype(base.weight)}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: Optional[nn.Parameter] = None
        self.adapter_enabled = True  # False: the frozen base alone (see adapters_disabled)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ Kaiming-uniform, B = 0 (the update starts at zero); DoRA's m = ||W||_row."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            with torch.no_grad():
                norm = self._weight_norm(self.dense_weight(self.lora_A.weight.dtype), self.lora_weight())
            self.lora_magnitude_vector = nn.Parameter(norm, requires_grad=True)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as a plain tensor (dequantized when it is NF4)."""
        return self.weight.to(dtype)  # NF4Tensor.to(dtype) dequantizes

    def lora_weight(self) -> torch.Tensor:
        """B @ A, shape [out, in]."""
        return self.lora_B.weight @ self.lora_A.weight

    def _weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear on an NF4Tensor weight goes through torchao's linear_nf4 (dequantize, then matmul).
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if not self.adapter_enabled:
            return result
        x_lora = x.to(self.lora_A.weight.dtype)
        if not self.use_dora:
            # Scale the rank-r intermediate, not the [.., out] update: same math, r/out of the work.
            update = self.lora_B(self.lora_A(self.lora_dropout(x_lora)) * self.scaling)
            return result + update.to(result.dtype)
        return result + self._dora_extra(x_lora, result).to(result.dtype)

    def _dora_extra(self, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output (PEFT's DoraLinearLayer.forward)."""
        weight = self.dense_weight(x.dtype)
        weight_norm = self._weight_norm(weight, self.lora_weight().detach().to(x.dtype)).detach()
        mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_no_bias = base_result if self.bias is None else base_result - self.bias
        else:
            # With dropout the base part must see the same dropped input as the LoRA part.
            x = self.lora_dropout(x)
            base_no_bias = F.linear(x, weight)
        lora_result = self.lora_B(self.lora_A(x))
        return (mag_norm_scale - 1) * base_no_bias.to(x.dtype) + mag_norm_scale * lora_result * self.scaling

    @torch.no_grad()
    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight that makes a plain Linear compute what this layer computes (eval mode)."""
        dtype = dtype or self.lora_A.weight.dtype
        weight = self.dense_weight(torch.float32)
        delta = self.scaling * self.lora_weight().float()
        merged = weight + delta
        if self.use_dora:
            merged = (self.lora_magnitude_vector.float() / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged
        return merged.to(dtype)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return f"{kind}: in={self.in_features}, out={self.out_features}, r={self.rank}, scaling={self.scaling:g}"


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in the base's float dtype (bf16 or fp32); NF4 reports its original dtype."""
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can wrap: nn.Linear, whether its weight is plain or NF4."""
    return isinstance(module, nn.Linear)


def find_target_modules(model: nn.Module, target_modules: Iterable[str]) -> dict[str, list[str]]:
    """target name (last part of a module path, e.g. q_proj) -> full module names it matches."""
    targets = list(dict.fromkeys(target_modules))
    found: dict[str, list[str]] = {t: [] for t in targets}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in found and (is_linear(module) or isinstance(module, LoRALinear)):
            found[leaf].append(name)
    return found


def apply_lora(model: nn.Module, lora: LoRASettings) -> nn.Module:
    """Wrap every targeted projection in a LoRALinear and freeze everything but the adapters.

    `lora` is the recipe's `lora:` section (rank, alpha, dropout, target_modules, use_dora).
    Raises KubetuneError naming `lora.target_modules` when a target matches no linear layer.
    """
    if lora.rank <= 0:
        raise KubetuneError(f"lora.rank: must be > 0, got {lora.rank}")
    found = find_target_modules(model, lora.target_modules)
    missing = [t for t, names in found.items() if not names]
    if missing:
        raise KubetuneError(
            f"lora.target_modules: {', '.join(missing)} match no linear layer of the model; "
            f"linear layers it has: {', '.join(sorted(linear_leaf_names(model))) or 'none'}"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for names in found.values():
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, LoRALinear):
                raise KubetuneError(f"lora: {name} already has a LoRA adapter; apply_lora runs once per model")
            wrapped = LoRALinear(module, lora.rank, lora.alpha, lora.dropout, lora.use_dora)
            replace_submodule(model, name, wrapped)
    return model


def linear_leaf_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and is_linear(m)}


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under the model's own names (e.g. model.layers.0.self_attn.q_proj.lora_A.weight)."""
    return {name: t for name, t in model.state_dict().items() if is_adapter_key(name)}


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith(".lora_magnitude_vector")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base alone, every LoRA/DoRA layer switched off
    (PEFT's `disable_adapter()`): the DPO reference of a LoRA policy, with no second copy."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapter_enabled = True


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer gets: the adapters and nothing else."""
    return [p for p in model.parameters() if p.requires_grad]


def merge_adapter(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with a plain nn.Linear holding W' = merged weight; returns the model.

    An lm_head tied to the embeddings is untied first: merging must not change the embeddings.
    """
    embed = _input_embedding_weight(model)
    for name, layer in list(lora_layers(model)):
        merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        merged.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        if layer.bias is not None:
            merged.bias = nn.Parameter(layer.bias.detach().to(merged.weight.dtype), requires_grad=False)
        if embed is not None and layer.weight is embed:
            _mark_untied(model)
        replace_submodule(model, name, merged)
    return model


def _input_embedding_weight(model: nn.Module) -> Optional[torch.Tensor]:
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    return getattr(embed, "weight", None)


def _mark_untied(model: nn.Module) -> None:
    """The merged lm_head now differs from the embeddings: the saved config must say so."""
    for holder in (getattr(model, "args", None), getattr(model, "config", None)):
        if holder is not None and hasattr(holder, "tie_word_embeddings"):
            setattr(holder, "tie_word_embeddings", False)


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
