"""FineTuneJob (short name ftj): fine-tune a model with one of the trainer's recipes."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from kubetune.operator.api.common import (
    API_VERSION,
    ApiModel,
    DNS_SUBDOMAIN,
    FREE_FORM_MAP,
    CacheOptions,
    DatasetSource,
    EnvVar,
    ModelSource,
    ObjectMeta,
    OutputSource,
    PodOptions,
    Resources,
    RunPolicy,
    RunStatus,
    S3Options,
    Secrets,
)
from kubetune.operator.api.evaljob import FineTuneJobRef, one_model
from kubetune.trainer.registry import RECIPES

# The CRD's enum follows the trainer's registry: a new training recipe shows up here (and in
# crds/ once regenerated; the drift test says so) without touching the API by hand.
TRAINING_RECIPES = tuple(name for name, info in RECIPES.items() if info.trains)
Recipe = Literal[TRAINING_RECIPES]  # type: ignore[valid-type]

# `default: {}` in the CRD for the optional fields that are immutable or read by a CEL rule: the
# API server then fills them in (and their own defaults) as pydantic does, so `self == oldSelf`
# also sees a field added or removed after creation (a transition rule is skipped where the old
# or new value is missing), and `self.resources.nodes` exists when a manifest has no resources.
DEFAULT_EMPTY = {"default": {}}


class FineTuneJobSpec(PodOptions):
    recipe: Recipe = Field(description="Training recipe (`kubetune ls` lists them)")
    model: Optional[ModelSource] = Field(default=None, description="Model to start from (or fineTuneJob)")
    fine_tune_job: Optional[FineTuneJobRef] = Field(
        default=None,
        description="Start from this FineTuneJob's output (its full model, or a LoRA run's merged model: "
        "save_merged); waits for it to succeed",
    )
    dataset: DatasetSource
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Recipe config overrides (keys of `kubetune cp <config>`), validated by the operator "
        "with the recipe's config model. model.path, dataset.source and output_dir come from "
        "spec.model, spec.dataset and spec.output.",
        json_schema_extra={**DEFAULT_EMPTY, "additionalProperties": FREE_FORM_MAP["additionalProperties"], "maxProperties": 256},
    )
    output: OutputSource = Field(default_factory=OutputSource, json_schema_extra=DEFAULT_EMPTY)
    resources: Resources = Field(default_factory=Resources, json_schema_extra=DEFAULT_EMPTY)
    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="Extra trainer environment")
    secrets: Secrets = Field(default_factory=Secrets)
    s3: S3Options = Field(default_factory=S3Options)
    cache: CacheOptions = Field(default_factory=CacheOptions)
    backend: Literal["auto", "job", "pytorchjob", "jobset", "trainjob"] = Field(
        default="auto",
        description="job: an indexed batch/v1 Job running torchrun; pytorchjob: a Kubeflow PyTorchJob; "
        "jobset: a JobSet (jobset.x-k8s.io); trainjob: a Kubeflow Trainer v2 TrainJob on the kubetune-torch "
        "ClusterTrainingRuntime; auto: the first of trainjob, jobset, pytorchjob, job that the cluster serves "
        "and that can carry the spec",
    )
    queue_name: Optional[str] = Field(
        default=None, max_length=63, pattern=DNS_SUBDOMAIN,
        description="Kueue LocalQueue; the workload is created suspended and admitted by Kueue",
    )
    suspend: bool = Field(default=False, description="Suspend (true) or resume (false) the run")
    run_policy: RunPolicy = Field(default_factory=RunPolicy)

    _one_model = model_validator(mode="after")(one_model)


class Progress(ApiModel):
    step: Optional[int] = None
    total_steps: Optional[int] = None
    epoch: Optional[int] = None
    loss: Optional[float] = None
    learning_rate: Optional[float] = None
    tokens_per_second: Optional[float] = None
    percent: Optional[float] = Field(default=None, description="step / totalSteps in percent")
    eta: Optional[str] = Field(default=None, description="Estimated time left, e.g. 1h02m")
    last_checkpoint_step: Optional[int] = None
    updated_at: Optional[str] = None


class Result(ApiModel):
    """The trainer's termination summary (docs/architecture.md, trainer run contract)."""

    final_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    steps: Optional[int] = None
    checkpoint: Optional[str] = None
    adapter: Optional[str] = None
    tokens_per_second: Optional[float] = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class WorkloadRef(ApiModel):
    """The workload as first created: never replaced by another (operator/workloads.py)."""

    api_version: str
    kind: str
    name: str
    uid: Optional[str] = Field(default=None, description="UID of the workload first created for this job")
    backend: Optional[str] = Field(default=None, description="Backend the workload was planned for (kept for good)")
    spec_hash: Optional[str] = Field(default=None, description="Hash of the spec the children were planned from")


class FineTuneJobStatus(RunStatus):
    workload: Optional[WorkloadRef] = Field(default=None, description="The Job, PyTorchJob, JobSet or TrainJob running the trainer")
    restarts: Optional[int] = Field(default=None, description="How often the workload restarted the trainer after a pod or node failure")
    resumed_from_step: Optional[int] = Field(
        default=None, description="The checkpoint step the latest restart resumed from (0: from scratch, e.g. an emptyDir output)"
    )
    gpu_seconds: Optional[float] = Field(default=None, description="GPU time used: the pods' running time x their GPUs")
    gpu_hours: Optional[float] = Field(default=None, description="gpuSeconds / 3600, rounded to 0.01")
    gpu_accounted_at: Optional[str] = Field(default=None, description="When gpuSeconds was last brought up to date")
    progress: Optional[Progress] = None
    result: Optional[Result] = None
    base_model: Optional[str] = Field(
        default=None, description="The model the run started from, as a source: spec.model.source, or spec.fineTuneJob's output"
    )
    fine_tune_job_uid: Optional[str] = Field(default=None, description="uid of spec.fineTuneJob once seen")


class FineTuneJob(ApiModel):
    api_version: Literal[API_VERSION] = API_VERSION  # type: ignore[valid-type]
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: Optional[FineTuneJobStatus] = None

    @model_validator(mode="after")
    def _not_itself(self) -> "FineTuneJob":
        if self.spec.fine_tune_job is not None and self.spec.fine_tune_job.name == self.metadata.name:
            raise ValueError(SELF_REFERENCE)
        return self


SELF_REFERENCE = "spec.fineTuneJob: a FineTuneJob cannot start from its own output; name another FineTuneJob (or use spec.model)"
