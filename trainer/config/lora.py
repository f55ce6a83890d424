"""Config of the LoRA / DoRA / QLoRA recipe (torch-free)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.trainer.config.base import StrictModel
from kubetune.trainer.config.finetune import TrainingConfig

LoRATarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


class LoRASection(StrictModel):
    rank: int = Field(default=8, gt=0, description="Rank r of the update B @ A")
    alpha: float = Field(default=16.0, gt=0, description="Scale: the update is multiplied by alpha / rank")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[LoRATarget] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    use_dora: bool = False


class LoRAFinetuneConfig(TrainingConfig):
    lora: LoRASection = LoRASection()
    save_merged: bool = Field(default=False, description="Also write the merged full model in HF format")
