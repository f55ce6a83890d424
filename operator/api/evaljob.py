"""EvalJob (evj) and ModelDeployment (mdep): evaluate and serve a model, or a FineTuneJob's output.

Either may name a FineTuneJob (spec.fineTuneJob) instead of a model: it then waits for that job
to succeed and uses what it wrote (its full model or its adapter). Planners:
kubetune.operator.evalplanner and kubetune.operator.deployplanner."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from kubetune.operator.api.common import (
    API_VERSION,
    ApiModel,
    CacheOptions,
    Condition,
    EnvVar,
    ModelSource,
    ObjectMeta,
    OutputSource,
    PodOptions,
    Resources,
    RunPolicy,
    RunStatus,
    S3Options,
    SecretKeyRef,
    Secrets,
    Source,
)
from kubetune.operator.api.names import object_name_error


class FineTuneJobRef(ApiModel):
    name: str = Field(min_length=1, max_length=253, description="A FineTuneJob in the same namespace; waits for it")

    @field_validator("name")
    @classmethod
    def _kubernetes_name(cls, name: str) -> str:
        error = object_name_error(name)  # no FineTuneJob can have another name: say so now, not never
        if error:
            raise ValueError(error)
        return name


def one_model(spec: Any) -> Any:
    """Exactly one of spec.model and spec.fineTuneJob (the CRD's CEL rule, for every path in)."""
    if (spec.model is None) == (spec.fine_tune_job is None):
        raise ValueError("set exactly one of spec.model and spec.fineTuneJob")
    return spec


class LocalTask(ApiModel):
    name: str = Field(min_length=1, max_length=128)
    type: Literal["perplexity", "multiple_choice", "generate"]
    source: str = Field(
        min_length=1, max_length=1024,
        description="JSONL file with the task's samples: a path, pvc://CLAIM/path, s3://BUCKET/file.jsonl or "
        "hf://ORG/NAME/path/file.jsonl[@REVISION] (a file of a dataset repository; both fetched by the initializer)",
    )
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
    s3: S3Options = Field(
        default_factory=S3Options, description="Where s3:// model, adapter and task-file sources live (the initializer fetches them)"
    )
    cache: CacheOptions = Field(
        default_factory=CacheOptions, description="Where the initializer puts hf:// and s3:// models, adapters and task files"
    )
    baseline: bool = Field(
        default=False,
        description="Also evaluate the model the FineTuneJob started from (with spec.model: the model without "
        "spec.adapter); status.result then shows each metric for both and the difference",
    )
    queue_name: Optional[str] = Field(
        default=None, max_length=63, description="Kueue LocalQueue; the Job is created suspended and admitted by Kueue"
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy)

    _one_model = model_validator(mode="after")(one_model)


class EvalResult(ApiModel):
    main_metric: Optional[str] = Field(default=None, description="e.g. hellaswag/acc=0.412 (+0.05 vs baseline)")
    metrics: dict[str, Any] = Field(default_factory=dict, description="task/metric -> value")
    baseline: dict[str, Any] = Field(default_factory=dict, description="task/metric -> value of the baseline model")
    delta: dict[str, Any] = Field(default_factory=dict, description="task/metric -> value minus baseline")
    baseline_main_metric: Optional[str] = Field(default=None, description="The main metric of the baseline model")


class WorkloadRef(ApiModel):
    api_version: str
    kind: str
    name: str
    uid: Optional[str] = None


class EvalJobStatus(RunStatus):
    result: Optional[EvalResult] = None
    model: Optional[str] = Field(default=None, description="What is evaluated: the source, or finetunejob/NAME")
    model_id: Optional[str] = Field(
        default=None, description="Identity of the evaluated model (a promotion gate compares it with the deployment's)"
    )
    fine_tune_job_uid: Optional[str] = Field(default=None, description="uid of the FineTuneJob once seen")
    workload: Optional[WorkloadRef] = Field(default=None, description="The Job running the eval")


class EvalJob(ApiModel):
    api_version: Literal[API_VERSION] = API_VERSION  # type: ignore[valid-type]
    kind: Literal["EvalJob"] = "EvalJob"
    metadata: ObjectMeta
    spec: EvalJobSpec
    status: Optional[EvalJobStatus] = None


class AdapterSource(Source):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$", max_length=63, description="Served model name")


class Autoscaling(ApiModel):
    """A HorizontalPodAutoscaler (autoscaling/v2) for the server Deployment."""

    min_replicas: int = Field(default=1, ge=1, le=64, description="Fewest server pods")
    max_replicas: int = Field(ge=1, le=256, description="Most server pods")
    metric: Literal["cpu", "requestsInFlight"] = Field(
        default="cpu",
        description="cpu: average CPU utilization (percent of requests); requestsInFlight: the server's running "
        "requests per pod (a Pods metric: needs prometheus-adapter or an equivalent custom metrics API)",
    )
    target: Optional[int] = Field(
        default=None, ge=1, description="cpu: utilization percent (default 70); requestsInFlight: per pod (default maxConcurrency/2)"
    )

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"maxReplicas ({self.max_replicas}) must be >= minReplicas ({self.min_replicas})")
        return self


class Promotion(ApiModel):
    """Hold the rollout of a new model until an EvalJob of that model passes a threshold."""

    eval_job: str = Field(min_length=1, max_length=253, description="An EvalJob in the same namespace")
    metric: str = Field(pattern=r"^[^/\s]+/[^/\s]+$", max_length=256, description="task/metric, e.g. hellaswag/acc")
    min: Optional[float] = Field(default=None, description="Promote when the metric is >= min (higher is better)")
    max: Optional[float] = Field(default=None, description="Promote when the metric is <= max (lower is better, e.g. perplexity)")

    @model_validator(mode="after")
    def _one_bound(self) -> "Promotion":
        if (self.min is None) == (self.max is None):
            raise ValueError("set exactly one of min (higher is better) and max (lower is better)")
        return self


class LabelSelector(ApiModel):
    match_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels the object must have (all of them)", json_schema_extra={"maxProperties": 32}
    )


class NetworkPeer(ApiModel):
    """Who may connect, as a NetworkPolicy peer: podSelector alone means pods of this namespace;
    namespaceSelector alone, every pod of those namespaces; both, those pods of those namespaces."""

    pod_selector: Optional[LabelSelector] = Field(default=None, description="Pods allowed to connect")
    namespace_selector: Optional[LabelSelector] = Field(
        default=None, description="Namespaces allowed to connect (kubernetes.io/metadata.name names one)"
    )

    @model_validator(mode="after")
    def _some_selector(self) -> "NetworkPeer":
        if self.pod_selector is None and self.namespace_selector is None:
            raise ValueError("set podSelector, namespaceSelector or both")
        return self


class NetworkPolicyOptions(ApiModel):
    """The NetworkPolicy of the server pods: only the API port, only from these peers."""

    enabled: bool = Field(
        default=True,
        description="Plan the NetworkPolicy (false: none; one made before is changed to admit all ingress). Enforced only where "
        "the cluster's network plugin implements NetworkPolicies",
    )
    from_: list[NetworkPeer] = Field(
        default_factory=list,
        alias="from",
        max_length=32,
        description="Who may connect to the server port (default: every pod of this namespace); all other ingress "
        "to the server pods is denied",
    )


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
    s3: S3Options = Field(default_factory=S3Options, description="Where s3:// model and adapter sources live (the initializer fetches them)")
    cache: CacheOptions = Field(
        default_factory=CacheOptions,
        description="Where the initializer puts hf:// and s3:// models and adapters (a PVC: each new replica skips the download)",
    )
    api_key_secret: Optional[SecretKeyRef] = Field(
        default=None,
        description="API keys clients must send (Authorization: Bearer), from a key of a Secret: one key per line "
        "(runtime kubetune: mounted as a file; vllm: a single key, as VLLM_API_KEY). Default: no authentication",
    )
    network_policy: NetworkPolicyOptions = Field(
        default_factory=NetworkPolicyOptions,
        description="Ingress to the server pods: only the API port, from this namespace's pods unless `from` says otherwise",
    )
    runtime: Literal["kubetune", "vllm"] = Field(
        default="kubetune",
        description="kubetune: `kubetune serve` (the operator's default server image); vllm: the vLLM OpenAI server "
        "(image vllm/vllm-openai unless spec.image says otherwise; GPU throughput at scale)",
    )
    served_model_name: Optional[str] = Field(
        default=None, max_length=253, description="Name clients put in `model` (default: this resource's name)"
    )
    extra_args: list[str] = Field(
        default_factory=list, max_length=64, description="Extra server arguments, appended as-is (e.g. vLLM flags)"
    )
    autoscaling: Optional[Autoscaling] = Field(default=None, description="A HorizontalPodAutoscaler instead of fixed replicas")
    promotion: Optional[Promotion] = Field(
        default=None, description="Hold a new model's rollout until an EvalJob of it passes a threshold"
    )

    _one_model = model_validator(mode="after")(one_model)


class ModelDeploymentStatus(ApiModel):
    phase: Optional[Literal["Pending", "Progressing", "Ready", "Failed"]] = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: Optional[int] = None
    ready_replicas: int = 0
    replicas: int = Field(default=0, description="Desired replicas")
    ready: Optional[str] = Field(default=None, description="ready/desired replicas, e.g. 1/1")
    url: Optional[str] = Field(default=None, description="OpenAI-compatible base URL inside the cluster")
    model: Optional[str] = Field(default=None, description="What is served: the source, or finetunejob/NAME")
    model_id: Optional[str] = Field(default=None, description="Identity of the model rolled out")
    served_models: list[str] = Field(default_factory=list, description="Names clients can put in `model`")
    fine_tune_job_uid: Optional[str] = Field(default=None, description="uid of the FineTuneJob once seen")


class ModelDeployment(ApiModel):
    api_version: Literal[API_VERSION] = API_VERSION  # type: ignore[valid-type]
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: Optional[ModelDeploymentStatus] = None
