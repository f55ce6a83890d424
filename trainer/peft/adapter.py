"""LoRA adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are PEFT's: `base_model.model.` + the module path + `.lora_A.weight` /
`.lora_B.weight` / `.lora_magnitude_vector` (DoRA), so `peft.PeftModel.from_pretrained` and
vLLM's LoRA loader read what we write, and we read what they write.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kubetune.errors import KubetuneError
from kubetune.trainer.hub import base_model_reference
from kubetune.trainer.peft.lora import LoRALinear, find_target_modules, is_linear, lora_layers, replace_submodule

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_SUFFIXES = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "magnitude": ".lora_magnitude_vector"}


class AdapterError(KubetuneError):
    """An adapter folder that cannot be read or does not fit the model; names the file and field."""


@dataclass
class LoRAModuleWeights:
    """One adapted projection: A [r, in], B [out, r], and DoRA's magnitude m [out] (or None)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta_weight(self, scaling: float) -> torch.Tensor:
        """s * B @ A, the LoRA update of the dense weight (not valid for DoRA, which rescales rows)."""
        return scaling * (self.lora_B.float() @ self.lora_A.float())


@dataclass
class AdapterWeights:
    """A PEFT LoRA adapter read into memory: what a server needs to hold several on one base.

    For module `name` and input x: y = base(x) + scaling * (x @ A.T) @ B.T (LoRA).
    """

    config: dict[str, Any]
    modules: dict[str, LoRAModuleWeights] = field(default_factory=dict)  # module path -> weights

    @property
    def scaling(self) -> float:
        return peft_scaling(self.config)

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))


def peft_scaling(config: dict[str, Any]) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapter_config(
    *, rank: int, alpha: float, dropout: float, target_modules: list[str], use_dora: bool,
    base_model_name_or_path: Optional[str], use_rslora: bool = False,
) -> dict[str, Any]:
    """The keys PEFT's LoraConfig and vLLM read; everything else keeps PEFT's defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules),
        "use_dora": use_dora,
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


# ---------------------------------------------------------------------------------------- save


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base_model_name_or_path: Optional[str] = None,
    state: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter folder (atomically: temp folder, then rename).
    `state`: the adapter tensors by the model's names, instead of the modules' own (a sharded
    model's, gathered by `kubetune.trainer.distributed.full_state_dict`)."""
    with atomic_dir(out_dir) as tmp:
        write_adapter_files(model, tmp, base_model_name_or_path, state=state)
    return Path(out_dir)


def write_adapter_files(
    model: nn.Module,
    folder: str | Path,
    base_model_name_or_path: Optional[str] = None,
    state: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """adapter_config.json + adapter_model.safetensors into `folder` (created if needed; not atomic on
    its own: save_adapter and the checkpoint manager make it so). `state`: as in save_adapter."""
    layers = list(lora_layers(model))
    if not layers:
        raise AdapterError("save_adapter: the model has no LoRA layers; call apply_lora or load_adapter first")
    first = layers[0][1]
    config = adapter_config(
        rank=first.rank,
        alpha=first.alpha,
        dropout=_dropout_p(first),
        target_modules=sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
        use_dora=first.use_dora,
        # What PEFT's AutoPeftModelForCausalLM will load: a Hub id or an absolute folder, never builtin://.
        base_model_name_or_path=base_model_reference(base_model_name_or_path) if base_model_name_or_path else None,
        use_rslora=not math.isclose(first.scaling, first.alpha / first.rank),
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        own = {"lora_A": layer.lora_A.weight, "lora_B": layer.lora_B.weight, "magnitude": layer.lora_magnitude_vector}
        for kind, tensor in own.items():
            if tensor is not None:
                tensors[PEFT_PREFIX + name + _SUFFIXES[kind]] = tensor if state is None else state[name + _SUFFIXES[kind]]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _dropout_p(layer: LoRALinear) -> float:
    return float(getattr(layer.lora_dropout, "p", 0.0))


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp folder next to out_dir; on success it replaces out_dir, on error it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------- read


def read_adapter(adapter_dir: str | Path) -> AdapterWeights:
    """Read and check a PEFT LoRA adapter folder (no model needed)."""
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    weights_path = adapter_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        legacy = adapter_dir / "adapter_model.bin"
        hint = " (adapter_model.bin is not supported: re-save it with safetensors)" if legacy.exists() else ""
        raise AdapterError(f"{weights_path}: missing{hint}")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_path), framework="pt") as handle:
        for key in handle.keys():
            name, part = _split_key(key, weights_path)
            modules.setdefault(name, {})[part] = handle.get_tensor(key)
    adapter = AdapterWeights(config=config)
    for name, parts in sorted(modules.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            raise AdapterError(f"{weights_path}: {name} has {sorted(parts)}, needs both lora_A and lora_B")
        weights = LoRAModuleWeights(parts["lora_A"], parts["lora_B"], parts.get("magnitude"))
        _check_module_shapes(name, weights, config, weights_path)
        adapter.modules[name] = weights
    if not adapter.modules:
        raise AdapterError(f"{weights_path}: holds no LoRA tensors")
    if adapter.use_dora and any(w.magnitude is None for w in adapter.modules.values()):
        raise AdapterError(f"{weights_path}: use_dora is true in {CONFIG_NAME} but lora_magnitude_vector tensors are missing")
    return adapter


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: not a folder; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not path.is_file():
        raise AdapterError(f"{path}: missing; is {adapter_dir} a PEFT adapter folder?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON: {exc}") from None
    unsupported = {
        "peft_type": (config.get("peft_type", "LORA") != "LORA", "only LORA adapters are supported"),
        "bias": (config.get("bias", "none") != "none", "only bias: none is supported"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out")), "only fan_in_fan_out: false is supported"),
        "rank_pattern": (bool(config.get("rank_pattern")), "per-module ranks are not supported"),
        "alpha_pattern": (bool(config.get("alpha_pattern")), "per-module alphas are not supported"),
        "modules_to_save": (bool(config.get("modules_to_save")), "fully trained extra modules are not supported"),
        "layers_to_transform": (config.get("layers_to_transform") is not None, "layer subsets are not supported"),
    }
    for key, (bad, why) in unsupported.items():
        if bad:
            raise AdapterError(f"{path}: {key}={config.get(key)!r}: {why}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{path}: {key} must be a number > 0, got {value!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(f"{path}: target_modules is a regex ({targets!r}); give a list of module names")
    if not targets:
        raise AdapterError(f"{path}: target_modules is empty or missing")
    return config


def _split_key(key: str, path: Path) -> tuple[str, str]:
    if not key.startswith(PEFT_PREFIX):
        raise AdapterError(f"{path}: tensor {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT LoRA adapter")
    body = key[len(PEFT_PREFIX):]
    for part, suffix in _SUFFIXES.items():
        if body.endswith(suffix):
            return body[: -len(suffix)], part
    # PEFT also writes `<module>.lora_magnitude_vector.weight` in some versions, and per-adapter names.
    if body.endswith(".lora_magnitude_vector.weight"):
        return body[: -len(".lora_magnitude_vector.weight")], "magnitude"
    if ".base_layer." in body:
        raise AdapterError(f"{path}: tensor {key!r} is a saved base weight (modules_to_save); not supported")
    raise AdapterError(f"{path}: tensor {key!r} is not a LoRA tensor (lora_A, lora_B, lora_magnitude_vector)")


def _check_module_shapes(name: str, weights: LoRAModuleWeights, config: dict[str, Any], path: Path) -> None:
    a, b = weights.lora_A, weights.lora_B
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise AdapterError(f"{path}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain")
    if a.shape[0] != config["r"]:
        raise AdapterError(f"{path}: {name}: rank {a.shape[0]} differs from r={config['r']} in {CONFIG_NAME}")
    if weights.magnitude is not None and tuple(weights.magnitude.shape) != (b.shape[0],):
        raise AdapterError(f"{path}: {name}: lora_magnitude_vector {tuple(weights.magnitude.shape)} != ({b.shape[0]},)")


# ---------------------------------------------------------------------------------------- load


def check_adapter_fits(model: nn.Module, adapter: AdapterWeights, source: str = "adapter") -> None:
    """Raise AdapterError naming the field when the adapter was not made for this model's architecture."""
    targets = list(adapter.config["target_modules"])
    found = find_target_modules(model, targets)
    missing = [t for t, names in found.items() if not names]
    if missing:
        raise AdapterError(
            f"{source}/{CONFIG_NAME}: target_modules {missing} match no linear layer of the base model; "
            "was the adapter trained on a different architecture?"
        )
    modules = dict(model.named_modules())
    for name, weights in adapter.modules.items():
        module = modules.get(name)
        if module is None or not (is_linear(module) or isinstance(module, LoRALinear)):
            raise AdapterError(
                f"{source}/{WEIGHTS_NAME}: module {name} does not exist in the base model "
                "(base_model_name_or_path / num_hidden_layers mismatch?)"
            )
        expected = (module.out_features, module.in_features)
        got = (weights.lora_B.shape[0], weights.lora_A.shape[1])
        if got != expected:
            raise AdapterError(
                f"{source}/{WEIGHTS_NAME}: {name} expects a base of shape [out, in]={list(got)}, the model has "
                f"{list(expected)}: the adapter was trained on a different base model (base_model_name_or_path="
                f"{adapter.config.get('base_model_name_or_path')!r})"
            )


def load_adapter(
    model: nn.Module, adapter_dir: str | Path | AdapterWeights, dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """Apply a PEFT LoRA/DoRA adapter to `model` (in place, frozen base) and return the model.

    The adapter tensors take the base weights' dtype unless `dtype` is given (merging uses float32).
    """
    source = str(adapter_dir) if not isinstance(adapter_dir, AdapterWeights) else "adapter"
    adapter = adapter_dir if isinstance(adapter_dir, AdapterWeights) else read_adapter(adapter_dir)
    check_adapter_fits(model, adapter, source)
    if any(True for _ in lora_layers(model)):
        raise AdapterError(f"{source}: the model already has LoRA layers; merge them or load onto a fresh base")
    config = adapter.config
    for param in model.parameters():
        param.requires_grad_(False)
    for name, weights in adapter.modules.items():
        base = model.get_submodule(name)
        layer = LoRALinear(
            base,
            rank=weights.rank,
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            use_dora=adapter.use_dora,
            use_rslora=bool(config.get("use_rslora")),
            dtype=dtype,
        )
        with torch.no_grad():
            layer.lora_A.weight.copy_(weights.lora_A)
            layer.lora_B.weight.copy_(weights.lora_B)
            if weights.magnitude is not None:
                layer.lora_magnitude_vector.copy_(weights.magnitude)
        replace_submodule(model, name, layer)
    return model


def restore_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Copy a saved adapter's tensors into the model's existing LoRA layers (resuming training).

    The layers must be the ones the adapter was saved from: same modules, rank, DoRA or not."""
    adapter = read_adapter(adapter_dir)
    layers = dict(lora_layers(model))
    if set(layers) != set(adapter.modules):
        raise AdapterError(
            f"{adapter_dir}: the checkpoint adapts {len(adapter.modules)} modules, this run's lora: section "
            f"{len(layers)}; resume with the lora: settings the checkpoint was trained with, or resume: never"
        )
    for name, weights in adapter.modules.items():
        layer = layers[name]
        if weights.rank != layer.rank or (weights.magnitude is not None) != layer.use_dora:
            raise AdapterError(
                f"{adapter_dir}: {name} has rank {weights.rank} (DoRA: {weights.magnitude is not None}), this run "
                f"lora.rank={layer.rank} (lora.use_dora: {layer.use_dora}); use the checkpoint's settings"
            )
        with torch.no_grad():
            layer.lora_A.weight.copy_(weights.lora_A)
            layer.lora_B.weight.copy_(weights.lora_B)
            if weights.magnitude is not None:
                layer.lora_magnitude_vector.copy_(weights.magnitude)
    return model
