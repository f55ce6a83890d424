"""Config of the generate recipe (torch-free)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from kubetune.trainer.config.base import StrictModel
from kubetune.trainer.config.finetune import ModelSection, TokenizerSection


class GenerateConfig(StrictModel):
    model: ModelSection
    tokenizer: TokenizerSection = TokenizerSection()
    adapter: Optional[str] = Field(default=None, description="PEFT adapter folder applied on top of model.path")
    prompt: str
    chat: bool = Field(default=False, description="Wrap the prompt as a user message in the chat template")
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=1)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.path or self.model.path
