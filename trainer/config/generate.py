"""Config of the generate recipe (torch-free)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from kubetune.trainer.config.base import StrictModel
from kubetune.trainer.config.finetune import ModelSection, TokenizerSection


class GenerateConfig(StrictModel):
    model: ModelSection
    tokenizer: TokenizerSection = TokenizerSection()
    adapter: Optional[str] = Field(default=None, description="PEFT adapter folder applied on top of model.path")
    prompt: Optional[str] = Field(default=None, description="The prompt (or use prompts_file)")
    prompts_file: Optional[str] = Field(
        default=None,
        description="A file of prompts: .txt (one prompt per line) or .jsonl ({\"prompt\": ...} per line); "
        "prints one JSON line {prompt, text} per prompt",
    )
    chat: bool = Field(default=False, description="Wrap each prompt as a user message in the chat template")
    system_prompt: Optional[str] = Field(
        default=None, description="A system message before each prompt (implies chat: the chat template renders it)"
    )
    batch_size: int = Field(default=8, ge=1, description="Prompts generated together (prompts_file)")
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=1)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "GenerateConfig":
        if (self.prompt is None) == (self.prompts_file is None):
            raise ValueError("set exactly one of prompt (one prompt) and prompts_file (a file of prompts)")
        return self

    @property
    def uses_chat_template(self) -> bool:
        return self.chat or self.system_prompt is not None

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.path or self.model.path
