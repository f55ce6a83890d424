"""Config of the eval recipe (torch-free: the operator validates EvalJob configs with it)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from kubetune.trainer.config.base import StrictModel, format_validation_error
from kubetune.trainer.config.finetune import ModelSection, TokenizerSection


class LocalTask(StrictModel):
    """A task over a local JSONL file; `kubetune.trainer.eval.tasks` documents each type's fields."""

    name: str = Field(min_length=1, description="Name in results.json and the table")
    type: Literal["perplexity", "multiple_choice", "generate"]
    path: str = Field(description="Local JSONL file with the task's samples")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Type-specific settings, e.g. context_field, target_delimiter, prompt_format, match, regex",
    )

    @model_validator(mode="after")
    def _known_options(self) -> "LocalTask":
        from kubetune.trainer.eval.tasks import resolve_options  # torch-free; raises TaskError

        resolve_options(self.name, self.type, self.options)
        return self


class EvalConfig(StrictModel):
    model: ModelSection
    tokenizer: TokenizerSection = TokenizerSection()
    adapter: Optional[str] = Field(default=None, description="PEFT adapter folder applied on top of model.path")
    tasks: list[Union[LocalTask, str]] = Field(
        min_length=1, description="Local tasks ({name, type, path, options}) or lm-evaluation-harness task names"
    )
    lm_eval_include_path: Optional[str] = Field(
        default=None, description="Folder of custom lm-eval task YAMLs (for tasks named by string)"
    )
    output_dir: str = "eval_output"
    limit: Optional[int] = Field(default=None, ge=1, description="Only the first N samples of each task")
    batch_size: int = Field(default=8, ge=1, description="Scored continuations (or generations) per batch")
    max_seq_len: int = Field(default=2048, ge=8)
    num_fewshot: int = Field(default=0, ge=0, description="Solved examples before each prompt, drawn with `seed`")
    seed: int = 42
    add_bos: bool = Field(default=True, description="Start every prompt with the tokenizer's BOS token")
    write_samples: bool = Field(default=True, description="Also write samples_<task>.jsonl per local task")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"

    @field_validator("tasks", mode="before")
    @classmethod
    def _parse_tasks(cls, tasks: Any) -> Any:
        """Each item is a string or a local task; errors name `tasks.N.field` (not both union branches)."""
        from kubetune.trainer.eval.tasks import TaskError

        if not isinstance(tasks, list):
            return tasks
        parsed = []
        for index, task in enumerate(tasks):
            if isinstance(task, dict):
                try:
                    task = LocalTask.model_validate(task)
                except ValidationError as err:
                    # TaskError is no ValueError: pydantic passes it through with this message intact.
                    raise TaskError(format_validation_error(err, LocalTask, prefix=f"tasks.{index}.")) from None
            elif not isinstance(task, (str, LocalTask)):
                raise TaskError(
                    f"tasks.{index}: expected an lm-eval task name or a local task {{name, type, path, options}}, "
                    f"got {task!r}"
                )
            parsed.append(task)
        return parsed

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[Union[LocalTask, str]]) -> list[Union[LocalTask, str]]:
        seen: set[str] = set()
        for task in tasks:
            name = task if isinstance(task, str) else task.name
            if name in seen:
                raise ValueError(f"task name '{name}' appears twice; task names must be unique")
            seen.add(name)
        return tasks

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.path or self.model.path
