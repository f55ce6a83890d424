"""Config of the preference-alignment recipe `dpo` (DPO, IPO, SimPO), full or LoRA. Torch-free."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from kubetune.trainer.config.finetune import TrainingConfig
from kubetune.trainer.config.lora import LoRASection


class DPOConfig(TrainingConfig):
    """Every training key, plus the preference loss and, for LoRA-DPO, a `lora:` section.

    Without `lora:` every parameter trains and the reference is a frozen copy of model.path.
    With `lora:` only the adapters train and the reference is the same base with them switched
    off (no second copy); `model.quantize_base: nf4` makes it QLoRA-DPO."""

    loss: Literal["dpo", "ipo", "simpo"] = Field(
        default="dpo", description="dpo (sigmoid), ipo, or simpo (reference-free, length-normalised)"
    )
    beta: float = Field(default=0.1, gt=0, description="Strength of the preference term (IPO: 1/beta is the target margin x2)")
    label_smoothing: float = Field(
        default=0.0, ge=0.0, lt=0.5, description="dpo/simpo: probability a preference label is wrong (conservative DPO)"
    )
    gamma: float = Field(default=0.5, ge=0.0, description="simpo: target reward margin")
    lora: Optional[LoRASection] = Field(default=None, description="Train LoRA/DoRA adapters instead of every parameter")
    save_merged: bool = Field(default=False, description="LoRA: also write the merged model (HF format) to output_dir/model")

    accepted_formats: ClassVar[tuple[str, ...]] = ("preference",)

    @model_validator(mode="after")
    def _format_fits_the_recipe(self) -> "DPOConfig":  # overrides TrainingConfig's: DPO names its own fix
        if self.dataset.format not in self.accepted_formats:
            raise ValueError("dataset.format: the dpo recipe trains on preference pairs; set dataset.format: preference")
        return self

    @model_validator(mode="after")
    def _settings_fit_together(self) -> "DPOConfig":
        if self.model.quantize_base is not None and self.lora is None:
            raise ValueError(
                "model.quantize_base: a quantized base cannot be trained in full; add a lora: section "
                "(QLoRA-DPO) or remove model.quantize_base"
            )
        if self.save_merged and self.lora is None:
            raise ValueError("save_merged: only for LoRA-DPO (full DPO always writes output_dir/model); remove it")
        if self.label_smoothing and self.loss == "ipo":
            raise ValueError("label_smoothing: not defined for loss ipo; set it to 0 or use loss dpo or simpo")
        if self.dataset.packed:
            raise ValueError("dataset.packed: preference pairs are not packed; set dataset.packed: false")
        return self
