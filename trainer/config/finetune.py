"""Config of the training recipes. Torch-free: the operator validates FineTuneJob.spec.config with it."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from kubetune.trainer.config.base import StrictModel


class ModelSection(StrictModel):
    path: str = Field(description="HF-format model folder (config.json + safetensors), or builtin://tiny")
    quantize_base: Optional[Literal["nf4"]] = Field(
        default=None, description="Store frozen base linear weights as 4-bit NF4 (QLoRA; lora_finetune only)"
    )


class TokenizerSection(StrictModel):
    path: Optional[str] = Field(default=None, description="Tokenizer folder; defaults to model.path")


class DatasetSection(StrictModel):
    source: str = Field(
        description="Local .json/.jsonl/.parquet file or folder (folder: <split>.<ext> inside), "
        "hf://org/name (the optional `datasets` library), or builtin://tiny_instruct (the synthetic task)"
    )
    format: Literal["alpaca", "chat", "text", "preference"] = "alpaca"
    split: str = "train"
    eval_split: Optional[str] = Field(default=None, description="Held-out split; None: hold out eval_fraction of split")
    eval_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    train_on_input: bool = Field(default=False, description="Also train on prompt tokens (default: masked from the loss)")
    packed: bool = Field(default=False, description="Pack several samples per sequence with document masking")
    text_field: str = "text"
    shuffle: bool = Field(default=True, description="Shuffle the training samples each epoch (seeded)")
    max_samples: Optional[int] = Field(default=None, ge=1, description="Use only the first N records of the split")


class OptimizerSection(StrictModel):
    lr: float = Field(default=2e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    fused: Optional[bool] = Field(default=None, description="Fused AdamW; None: when the device supports it")


class LRSchedulerSection(StrictModel):
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)


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
    resume: str = Field(default="auto", description="auto | never | path of a checkpoint folder")
    checkpoint_on_sigterm: bool = True
    progress_bar: bool = True
    distributed: DistributedSection = DistributedSection()

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.path or self.model.path


class FullFinetuneConfig(TrainingConfig):
    @model_validator(mode="after")
    def _no_quantized_full_finetune(self) -> "FullFinetuneConfig":
        if self.model.quantize_base is not None:
            raise ValueError(
                "model.quantize_base: a quantized base cannot be fully fine-tuned; "
                "use the lora_finetune recipe (QLoRA) or remove model.quantize_base"
            )
        return self
