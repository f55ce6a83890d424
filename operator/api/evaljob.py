"""EvalJob (evj) and ModelDeployment (mdep). Their reconcilers come later; the API is fixed now
so that manifests written today keep working."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field

from kubetune.operator.api.common import (
    API_VERSION,
    ApiModel,
    Condition,
    EnvVar,
    ModelSource,
    ObjectMeta,
    OutputSource,
    PodOptions,
    Resources,
    RunStatus,
    Secrets,
    Source,
)


class FineTuneJobRef(ApiModel):
    name: str = Field(min_length=1, max_length=253, description="A FineTuneJob in the same namespace; waits for it")


class LocalTask(ApiModel):
    name: str = Field(min_length=1, max_length=128)
    type: Literal["perplexity", "multiple_choice", "generate"]
    source: str = Field(min_length=1, max_length=1024, description="JSONL file with the task's samples")
    options: dict[str, Any] = Field(default_factory=dict)


class EvalJobSpec(PodOptions):
    model: Optional[ModelSource] = Field(default=None, description="Model to evaluate (or fineTuneJob)")
    fine_tune_job: Optional[FineTuneJobRef] = Field(default=None, description="Evaluate this FineTuneJob's output")
    adapter: Optional[Source] = Field(default=None, description="A PEFT adapter applied on top of the model")
    tasks: list[Union[str, LocalTask]] = Field(
        min_length=1,
        description="lm-eval task names or local tasks",
        json_schema_extra={"items": {"x-kubernetes-preserve-unknown-fields": True}},
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Eval recipe config overrides")
    output: OutputSource = Field(default_factory=OutputSource)
    resources: Resources = Field(default_factory=Resources)
    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="Extra environment")
    secrets: Secrets = Field(default_factory=Secrets)


class EvalResult(ApiModel):
    main_metric: Optional[str] = Field(default=None, description="e.g. hellaswag/acc=0.412")
    metrics: dict[str, Any] = Field(default_factory=dict)


class EvalJobStatus(RunStatus):
    result: Optional[EvalResult] = None


class EvalJob(ApiModel):
    api_version: Literal[API_VERSION] = API_VERSION  # type: ignore[valid-type]
    kind: Literal["EvalJob"] = "EvalJob"
    metadata: ObjectMeta
    spec: EvalJobSpec
    status: Optional[EvalJobStatus] = None


class AdapterSource(Source):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$", max_length=63, description="Served model name")


class ModelDeploymentSpec(PodOptions):
    model: Optional[ModelSource] = Field(default=None, description="Model to serve (or fineTuneJob)")
    fine_tune_job: Optional[FineTuneJobRef] = Field(default=None, description="Serve this FineTuneJob's output")
    adapters: list[AdapterSource] = Field(default_factory=list, description="LoRA adapters served by name")
    replicas: int = Field(default=1, ge=0, le=64, description="Server pods")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the OpenAI-compatible API")
    max_concurrency: int = Field(default=16, ge=1, le=4096, description="Requests decoded together per replica")
    max_model_len: Optional[int] = Field(default=None, ge=16, description="Longest prompt + completion (default: the model's)")
    resources: Resources = Field(default_factory=Resources)
    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="Extra environment")
    secrets: Secrets = Field(default_factory=Secrets)


class ModelDeploymentStatus(ApiModel):
    phase: Optional[Literal["Pending", "Progressing", "Ready", "Failed"]] = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: Optional[int] = None
    ready_replicas: int = 0
    ready: Optional[str] = Field(default=None, description="ready/desired replicas, e.g. 1/1")
    url: Optional[str] = Field(default=None, description="OpenAI-compatible base URL inside the cluster")


class ModelDeployment(ApiModel):
    api_version: Literal[API_VERSION] = API_VERSION  # type: ignore[valid-type]
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: Optional[ModelDeploymentStatus] = None
