"""Config of the eval recipe (torch-free). Task definitions are refined by the eval recipe."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field

from kubetune.trainer.config.base import StrictModel
from kubetune.trainer.config.finetune import ModelSection, TokenizerSection


class LocalTask(StrictModel):
    name: str
    type: Literal["perplexity", "multiple_choice", "generate"]
    path: str = Field(description="Local JSONL file with the task's samples")
    options: dict[str, Any] = Field(default_factory=dict, description="Task-type specific settings")


class EvalConfig(StrictModel):
    model: ModelSection
    tokenizer: TokenizerSection = TokenizerSection()
    adapter: Optional[str] = None
    tasks: list[Union[LocalTask, str]] = Field(min_length=1, description="Local tasks, or lm-eval task names")
    output_dir: str = "eval_output"
    limit: Optional[int] = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    max_seq_len: int = Field(default=2048, ge=8)
    num_fewshot: int = Field(default=0, ge=0)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.path or self.model.path
