"""Shared helpers of the LoRA / DoRA / QLoRA / merge tests: tiny models built in the test."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRA:
    """Stands in for the config's lora: section (same fields)."""

    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    use_dora: bool = False


def tiny_hf_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_hf_model(seed: int = 0, **overrides):
    """A random transformers LlamaForCausalLM in float32, eval mode (HF module names)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**overrides)).float().eval()
    return model


def randomize_adapters(model, seed: int = 1, scale: float = 0.1) -> None:
    """B starts at zero (the update is zero); give every adapter tensor random values so parity means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=gen) * scale
                param.copy_(param + noise if "magnitude" in name else noise)


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def input_ids(batch: int = 2, length: int = 12, vocab: int = 96, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def fresh_copy(model):
    return copy.deepcopy(model)
