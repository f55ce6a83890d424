"""LoRA adapters held as plain tensors, so several share one batch on an untouched base model.

Reading and checking the PEFT folder is kubetune.trainer.peft's job (`read_adapter`,
`check_adapter_fits`); this module only rejects what cannot be added per row at run time (DoRA
rescales the base weight's rows) and indexes the tensors by (layer, projection) for the runner.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kubetune.trainer.peft.adapter import AdapterError, check_adapter_fits, read_adapter

# model.layers.3.self_attn.q_proj, model.layers.3.mlp.down_proj
_MODULE = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


@dataclass
class LoraAdapter:
    """One adapter: for each (layer, projection) the pair (A [r, in], B [out, r]); y += scale * (x A^T) B^T."""

    name: str
    path: str
    scale: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def load_lora_adapter(name: str, path: str | Path, model: torch.nn.Module) -> LoraAdapter:
    """Read the PEFT adapter folder `path`, check it fits `model`, index it for the runner."""
    weights = read_adapter(path)
    check_adapter_fits(model, weights, source=str(path))
    if weights.use_dora:
        raise AdapterError(
            f"{path}/adapter_config.json: use_dora is true; DoRA adapters cannot be served per request. "
            f"Merge it into the base model first (`kubetune merge --base ... --adapter {path} --out ...`) and serve that."
        )
    adapter = LoraAdapter(name=name, path=str(path), scale=weights.scaling)
    for module, lora in weights.modules.items():
        match = _MODULE.match(module)
        if match is None:
            raise AdapterError(
                f"{path}/adapter_model.safetensors: adapts {module}; the server applies adapters to the "
                "attention and MLP projections only (q/k/v/o, gate/up/down). Merge it first with `kubetune merge`."
            )
        adapter.weights[(int(match.group(1)), match.group(2))] = (lora.lora_A, lora.lora_B)
    return adapter
