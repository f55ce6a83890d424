"""Config of the LoRA / DoRA / QLoRA recipe (torch-free). QLoRA = this recipe + model.quantize_base: nf4."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kubetune.trainer.config.base import StrictModel
from kubetune.trainer.config.finetune import TrainingConfig

LoRATarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


class LoRASection(StrictModel):
    rank: int = Field(default=8, gt=0, description="Rank r of the update B @ A")
    alpha: float = Field(default=16.0, gt=0, description="Scale: the update is multiplied by alpha / rank")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input")
    target_modules: list[LoRATarget] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="Projections to adapt, by name; lm_head also adapts the output layer",
    )
    use_dora: bool = Field(default=False, description="DoRA: also learn a per-output magnitude vector")

    @field_validator("target_modules")
    @classmethod
    def _no_duplicates(cls, targets: list[str]) -> list[str]:
        duplicates = sorted({t for t in targets if targets.count(t) > 1})
        if duplicates:
            raise ValueError(f"lists {', '.join(duplicates)} more than once; name each module once")
        return targets


class LoRAFinetuneConfig(TrainingConfig):
    lora: LoRASection = LoRASection()
    save_merged: bool = Field(default=False, description="Also write the merged full model in HF format to output_dir/model")
