"""Config of the training recipes. Torch-free: the operator validates FineTuneJob.spec.config with it."""
from __future__ import annotations

import string
from typing import ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from kubetune.trainer.config.base import StrictModel

# The fields each dataset format reads; `dataset.columns` renames any of them.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "tools"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
}
BUILTIN_CHAT_TEMPLATES = ("llama2", "llama3", "chatml")  # kubetune.trainer.tokenizers.chat_templates


class ModelSection(StrictModel):
    path: str = Field(
        description="HF-format model folder (config.json + safetensors), a Hub id (org/name or "
        "hf://org/name[@revision], through the huggingface_hub cache), or builtin://tiny"
    )
    quantize_base: Optional[Literal["nf4"]] = Field(
        default=None, description="Store frozen base linear weights as 4-bit NF4 (QLoRA; lora_finetune only)"
    )


class TokenizerSection(StrictModel):
    path: Optional[str] = Field(default=None, description="Tokenizer folder or Hub id; defaults to model.path")
    chat_template: Optional[str] = Field(
        default=None,
        description="Chat template: a built-in name (llama2, llama3, chatml) or a .jinja file; "
        "None: the tokenizer's own (tokenizer_config.json / chat_template.jinja)",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_name_or_file(cls, value: Optional[str]) -> Optional[str]:
        if value is None or value in BUILTIN_CHAT_TEMPLATES or value.endswith((".jinja", ".j2")):
            return value
        raise ValueError(
            f"{value!r} is neither a built-in template ({', '.join(BUILTIN_CHAT_TEMPLATES)}) nor a .jinja file; "
            "name one of them, or point it at a Jinja template file ending in .jinja"
        )


class DatasetSection(StrictModel):
    source: str = Field(
        description="Local .json/.jsonl/.parquet/.csv/.txt file or folder (folder: <split>.<ext> inside, or the splits its "
        "README.md's dataset-card configs declare; FOLDER/CONFIG: that config), "
        "hf://org/name (the optional `datasets` library), or builtin://tiny_instruct / builtin://tiny_preference (the synthetic tasks)"
    )
    format: Literal["alpaca", "chat", "prompt_completion", "text", "preference"] = "alpaca"
    split: str = "train"
    eval_split: Optional[str] = Field(default=None, description="Held-out split (a file of a folder source, or an hf:// split)")
    eval_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Hold out this seeded fraction of the training records (0: none)"
    )
    train_on_input: bool = Field(default=False, description="Also train on prompt tokens (default: masked from the loss)")
    packed: bool = Field(default=False, description="Pack several samples per sequence with document masking")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename the fields a format reads, e.g. {instruction: question, output: answer}; "
        "alpaca: instruction, input, output; chat: messages, tools; prompt_completion: prompt, completion; "
        "text: text; preference: prompt, chosen, rejected",
    )
    prompt_template: Optional[str] = Field(
        default=None,
        description="alpaca only: the prompt as a Python format string with {instruction} and optional {input}, "
        "e.g. 'Question: {instruction}\\nAnswer: '; None: the Stanford Alpaca prompt",
    )
    text_field: str = Field(default="text", description="The text field of text records (same as columns.text)")
    txt_documents: Literal["file", "blank_line"] = Field(
        default="file", description=".txt sources: one document per file, or one per blank-line-separated block"
    )
    shuffle: bool = Field(default=True, description="Shuffle the training samples each epoch (seeded)")
    max_samples: Optional[int] = Field(default=None, ge=1, description="Use only the first N records of the split")

    @model_validator(mode="after")
    def _columns_and_template_fit_the_format(self) -> "DatasetSection":
        known = FORMAT_FIELDS[self.format]
        unknown = sorted(set(self.columns) - set(known))
        if unknown:
            raise ValueError(
                f"dataset.columns: {', '.join(unknown)} is not a field of format {self.format}; "
                f"its fields are {', '.join(known)} (map each to the column name in your data)"
            )
        if self.prompt_template is not None:
            if self.format != "alpaca":
                raise ValueError(
                    f"dataset.prompt_template applies to format alpaca, not {self.format}; remove it "
                    "(chat data uses tokenizer.chat_template)"
                )
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name is not None}
            except ValueError as err:
                raise ValueError(f"dataset.prompt_template is not a valid format string ({err}); write {{{{ for a literal brace") from None
            if "instruction" not in names or names - {"instruction", "input"}:
                raise ValueError(
                    f"dataset.prompt_template uses {{{', '.join(sorted(names)) or 'nothing'}}}; it must use {{instruction}} "
                    "and may use {input}; write {{ and }} for literal braces"
                )
        return self

    def column(self, name: str) -> str:
        """The record key that holds the format's field `name` (after dataset.columns)."""
        if name == "text" and "text" not in self.columns:
            return self.text_field
        return self.columns.get(name, name)


class OptimizerSection(StrictModel):
    name: Literal["adamw", "adafactor", "adamw_8bit"] = Field(
        default="adamw",
        description="adamw (torch), adafactor (torch.optim.Adafactor: factored second moments, no first moment), "
        "adamw_8bit (torchao's AdamW8bit: 8-bit optimizer states; needs the quant extra)",
    )
    lr: float = Field(default=2e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="adamw, adamw_8bit")
    eps: float = Field(default=1e-8, gt=0, description="adamw, adamw_8bit")
    fused: Optional[bool] = Field(default=None, description="adamw only: fused kernels; None: when the device has them")


class LRSchedulerSection(StrictModel):
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    warmup_ratio: Optional[float] = Field(
        default=None, ge=0.0, lt=1.0, description="Warm up over this fraction of the planned steps (instead of warmup_steps)"
    )
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    on_resume: Literal["keep", "replan"] = Field(
        default="keep",
        description="When max_steps/epochs change on resume: keep the schedule the run started with, "
        "or replan it over the new number of steps",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> "LRSchedulerSection":
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError(
                "lr_scheduler: set warmup_steps or warmup_ratio, not both (warmup_ratio is a fraction of the planned steps)"
            )
        return self


class DistributedSection(StrictModel):
    """How a run under torchrun (`kubetune run --nproc-per-node G`) shards and communicates.
    Ignored with one process."""

    backend: Literal["auto", "nccl", "gloo"] = Field(default="auto", description="auto: nccl on CUDA, gloo on CPU")
    timeout_seconds: float = Field(
        default=600, gt=0, description="Collective timeout: a rank that waits longer for the others fails the run"
    )
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        default="auto", description="FSDP2 compute dtype: auto = bf16 compute with fp32 gradient reduction on CUDA, off on CPU"
    )
    cpu_offload: bool = Field(default=False, description="Keep sharded parameters, gradients and optimizer state in CPU memory")
    reshard_after_forward: bool = Field(
        default=True, description="Free each layer's gathered parameters after forward (less memory, one more all-gather)"
    )


class EarlyStoppingSection(StrictModel):
    patience: int = Field(ge=1, description="Stop after this many evals in a row without improvement")
    min_delta: float = Field(default=0.0, ge=0.0, description="An eval improves when it beats the best by more than this")


class TrainingConfig(StrictModel):
    """Keys every training recipe understands."""

    model: ModelSection
    tokenizer: TokenizerSection = TokenizerSection()
    dataset: DatasetSection
    output_dir: str = "output"
    epochs: int = Field(default=1, ge=1)
    max_steps: Optional[int] = Field(default=None, ge=1, description="Stop after this many optimizer steps")
    batch_size: int = Field(default=2, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_seq_len: int = Field(default=2048, ge=8)
    optimizer: OptimizerSection = OptimizerSection()
    lr_scheduler: LRSchedulerSection = LRSchedulerSection()
    max_grad_norm: Optional[float] = Field(default=1.0, gt=0)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    bf16_autocast: bool = Field(
        default=True, description="On CUDA with dtype fp32: run forward/backward under bf16 autocast (ignored on CPU)"
    )
    compile: bool = Field(default=False, description="torch.compile the model (slow first steps, faster after)")
    save_every_steps: Optional[int] = Field(default=None, ge=1, description="None: only at the end")
    keep_last_checkpoints: int = Field(default=2, ge=1)
    eval_every_steps: Optional[int] = Field(default=None, ge=1)
    eval_max_batches: Optional[int] = Field(default=None, ge=1)
    log_every_steps: int = Field(default=1, ge=1)
    metrics_port: Optional[int] = Field(default=None, ge=0, le=65535, description="Prometheus port; None: off")
    resume: str = Field(
        default="auto",
        description="auto: continue the run in output_dir when its settings match (refused when they differ) | "
        "never: a fresh run | the path of a checkpoint folder",
    )
    overwrite_output_dir: bool = Field(
        default=False, description="Start fresh even when output_dir holds another run: its checkpoints and outputs are removed"
    )
    early_stopping: Optional[EarlyStoppingSection] = Field(
        default=None, description="Stop when the eval loss stops improving (needs eval_every_steps and held-out data)"
    )
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers (the tracking extra): tensorboard, mlflow, wandb"
    )
    checkpoint_on_sigterm: bool = True
    progress_bar: bool = True
    distributed: DistributedSection = DistributedSection()

    # Dataset formats this recipe trains on; others are refused at config time, naming the recipe to use.
    accepted_formats: ClassVar[tuple[str, ...]] = ("alpaca", "chat", "prompt_completion", "text")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.path or self.model.path

    @model_validator(mode="after")
    def _early_stopping_has_evals(self) -> "TrainingConfig":
        if self.early_stopping is None:
            return self
        if not self.eval_every_steps:
            raise ValueError("early_stopping needs eval_every_steps (how often the eval loss is measured); set it")
        if not (self.dataset.eval_split or self.dataset.eval_fraction > 0):
            raise ValueError(
                "early_stopping needs held-out data: set dataset.eval_split or dataset.eval_fraction (e.g. 0.05)"
            )
        return self

    @model_validator(mode="after")
    def _format_fits_the_recipe(self) -> "TrainingConfig":
        fmt = self.dataset.format
        if fmt not in self.accepted_formats:
            use = "the dpo recipe (kubetune run dpo)" if fmt == "preference" else "another recipe"
            raise ValueError(
                f"dataset.format: {fmt} data trains with {use}, not this one; this recipe takes "
                f"{', '.join(self.accepted_formats)}"
            )
        return self


class FullFinetuneConfig(TrainingConfig):
    @model_validator(mode="after")
    def _no_quantized_full_finetune(self) -> "FullFinetuneConfig":
        if self.model.quantize_base is not None:
            raise ValueError(
                "model.quantize_base: a quantized base cannot be fully fine-tuned; "
                "use the lora_finetune recipe (QLoRA) or remove model.quantize_base"
            )
        return self
