"""LoRA / DoRA adapters: wrap a model's projections, save and load PEFT-format adapters, merge.

    apply_lora(model, cfg.lora)            wrap targets, freeze the base (training)
    load_adapter(model, adapter_dir)       apply a saved PEFT adapter (eval, generate, serve)
    save_adapter(model, out_dir, base)     write adapter_config.json + adapter_model.safetensors
    merge_adapter(model)                   fold the adapters into plain nn.Linear weights
    read_adapter(adapter_dir)              the adapter's tensors + scaling, without a model (serving several)
"""
from kubetune.trainer.peft.adapter import (
    AdapterError,
    AdapterWeights,
    LoRAModuleWeights,
    check_adapter_fits,
    load_adapter,
    read_adapter,
    restore_adapter_weights,
    save_adapter,
    write_adapter_files,
)
from kubetune.trainer.peft.lora import (
    LoRALinear,
    adapters_disabled,
    apply_lora,
    lora_layers,
    lora_state_dict,
    merge_adapter,
    trainable_parameters,
)

__all__ = [
    "AdapterError",
    "AdapterWeights",
    "LoRALinear",
    "adapters_disabled",
    "LoRAModuleWeights",
    "apply_lora",
    "check_adapter_fits",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "merge_adapter",
    "read_adapter",
    "restore_adapter_weights",
    "save_adapter",
    "trainable_parameters",
    "write_adapter_files",
]
