"""Pieces shared by the three custom resources: sources, resources, env, conditions.

The pydantic models here are the single source of truth of the API: the CRDs in crds/ are
generated from them (kubetune.operator.crdgen) and the operator and the local backend parse
manifests with them. Field names are Python snake_case; the wire format is Kubernetes
camelCase (aliases), so `model_dump(by_alias=True)` gives what `kubectl` sees.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune.operator.api.names import namespace_error, object_name_error

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# The images a workload gets when its manifest names none, unless the operator is told otherwise
# (`KUBETUNE_DEFAULT_TRAINER_IMAGE` / `_SERVER_IMAGE`, which the Helm chart sets from its values).
DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
DEFAULT_SERVER_IMAGE = "ghcr.io/kubetune/server:0.1.0"

# `builtin://tiny`, `hf://org/name[@revision]`, `s3://bucket/prefix`, `pvc://claim/sub/path`,
# `file:///abs/path`, or a plain path.
SOURCE_PATTERN = r"^((builtin|hf|pvc|file|s3)://[^\s]+|[^\s:]+)$"
SOURCE_HELP = (
    "Where to read or write: builtin://tiny (a tiny model made on demand), hf://org/name[@revision] "
    "(the Hugging Face Hub), s3://bucket/prefix (S3 or an S3-compatible store, see spec.s3), "
    "pvc://claim/sub/path (a PersistentVolumeClaim in the job's namespace), file:///abs/path "
    "or a plain path (inside the trainer image on a cluster; on this machine locally). hf:// models "
    "and s3:// sources are downloaded into the cache (spec.cache) before the trainer starts."
)

# A Kubernetes resource quantity: 8, "32Gi", "500m" (k8s.io/apimachinery resource.Quantity's
# pattern, as controller-gen writes it into CRDs): the API server refuses `32GB` at once, instead
# of the Job create failing later with 422.
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
Quantity = Union[int, Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN)]]
# Names of objects a pod refers to (ServiceAccount, PriorityClass, LocalQueue): DNS subdomains.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A free-form map whose values CEL compares whole. An object schema with
# x-kubernetes-preserve-unknown-fields and no properties is opaque to the API server's CEL: its
# equality compares only the keys both sides have (k8s.io/apiserver/pkg/cel/common/values.go,
# unstructuredMap.Equal), so `self == oldSelf` would let {a: 1} become {b: 1}. With
# additionalProperties every key is known and each value is compared in full (DeepEqual).
FREE_FORM_MAP = {"type": "object", "additionalProperties": {"x-kubernetes-preserve-unknown-fields": True}}


class ApiModel(BaseModel):
    """camelCase on the wire, unknown keys rejected (the CRD schema prunes them on a cluster)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", protected_namespaces=()
    )


class ObjectMeta(BaseModel):
    """The part of metadata the operator reads; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=253)
    namespace: Optional[str] = None
    uid: Optional[str] = None
    generation: Optional[int] = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: Optional[str] = Field(default=None, alias="creationTimestamp")

    # The API server's own name rules (operator/api/names.py), so the local backend refuses what a
    # cluster would: the same check runs in `kubetune apply` and in the operator's admission.
    @field_validator("name")
    @classmethod
    def _kubernetes_name(cls, name: str) -> str:
        error = object_name_error(name)
        if error:
            raise ValueError(error)
        return name

    @field_validator("namespace")
    @classmethod
    def _kubernetes_namespace(cls, namespace: Optional[str]) -> Optional[str]:
        error = namespace_error(namespace) if namespace is not None else None
        if error:
            raise ValueError(error)
        return namespace


class Source(ApiModel):
    source: str = Field(pattern=SOURCE_PATTERN, max_length=1024, description=SOURCE_HELP)


class ModelSource(Source):
    """The base model: an HF-format folder (config.json + safetensors + tokenizer)."""


class DatasetSource(Source):
    """The training data: a JSON/JSONL/Parquet/TXT file or folder, or hf://org/name."""

    # The trainer's formats (kubetune.trainer.data.formats); prompt_completion is TRL's {prompt, completion}.
    format: Literal["alpaca", "chat", "prompt_completion", "preference", "text"] = Field(
        default="alpaca",
        description="Record layout: alpaca/instruct, chat messages (or ShareGPT), prompt/completion pairs, "
        "preference pairs, plain text",
    )
    split: str = Field(default="train", max_length=64, description="Split used for training")


class OutputSource(ApiModel):
    """Where the trainer writes checkpoints and the final model or adapter."""

    source: Optional[str] = Field(
        default=None,
        pattern=SOURCE_PATTERN,
        max_length=1024,
        description="Where checkpoints and the final model/adapter go: pvc://claim/sub/path on a cluster, "
        "a folder locally. Default: an emptyDir on a cluster (lost with the pod), runs/<name>/output locally.",
    )


class SecretKeyRef(ApiModel):
    name: str = Field(min_length=1, max_length=253, description="Secret in the job's namespace")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret")


# Environment variables that point the trainer's clients at another endpoint, proxy or trust store.
# Set next to a secret (secrets.hfToken -> HF_TOKEN, cloud credentials), they would send it to any
# host the job's author names, so spec.env may not set them unless the platform allows the name in
# the operator's $KUBETUNE_ALLOWED_ENV (comma-separated names or glob patterns). docs/security.md.
REDIRECTING_ENV = (
    "HF_ENDPOINT", "HF_HUB_ENDPOINT", "HF_INFERENCE_ENDPOINT",
    "*_PROXY",  # HTTP(S)_PROXY, ALL_PROXY, and the lowercase forms (compared upper-case)
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_*", "S3_ENDPOINT_URL", "AWS_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "WANDB_BASE_URL", "MLFLOW_TRACKING_URI", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
)
ALLOWED_ENV_VAR = "KUBETUNE_ALLOWED_ENV"


def redirecting_env_name(name: str, allowed: Optional[str] = None) -> bool:
    """Whether `name` redirects credentials or endpoints and the platform has not allowed it."""
    upper = name.upper()
    if not any(fnmatch.fnmatchcase(upper, pattern) for pattern in REDIRECTING_ENV):
        return False
    allowed = os.environ.get(ALLOWED_ENV_VAR, "") if allowed is None else allowed
    patterns = [p.strip().upper() for p in allowed.split(",") if p.strip()]
    return not any(fnmatch.fnmatchcase(upper, pattern) for pattern in patterns)


class EnvVar(ApiModel):
    """An environment variable of the trainer: a literal value or a key of a Secret (never inline secrets)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128, description="Variable name")
    value: Optional[str] = Field(default=None, description="A literal value (not for secrets: use secretKeyRef)")
    secret_key_ref: Optional[SecretKeyRef] = Field(default=None, description="Read the value from a Secret")

    @model_validator(mode="after")
    def _one_source(self) -> "EnvVar":
        if self.value is not None and self.secret_key_ref is not None:
            raise ValueError(f"env {self.name}: set either value or secretKeyRef, not both")
        if redirecting_env_name(self.name):
            raise ValueError(
                f"env {self.name}: this variable redirects the job's endpoints or credentials (e.g. the HF token "
                f"to another host), so jobs may not set it; remove it, or ask the platform team to allow it "
                f"in the operator's {ALLOWED_ENV_VAR}"
            )
        return self


class SecretName(ApiModel):
    name: str = Field(min_length=1, max_length=253, description="Secret in the job's namespace")


class Secrets(ApiModel):
    """Well-known secrets, each read from a key of a Secret in the job's namespace."""

    hf_token: Optional[SecretKeyRef] = Field(
        default=None, description="Hugging Face token, exported to the trainer and the initializer as HF_TOKEN"
    )
    s3: Optional[SecretName] = Field(
        default=None,
        description="Secret with the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3:// sources "
        "(given to the initializer only)",
    )


class S3Options(ApiModel):
    """Where s3:// sources live when not on AWS S3 itself."""

    endpoint: Optional[str] = Field(
        default=None, pattern=r"^https?://[^\s]+$", max_length=512,
        description="Endpoint URL of an S3-compatible store (MinIO, Ceph, ...); default: AWS S3",
    )
    region: Optional[str] = Field(default=None, max_length=64, description="Region of the bucket (default: us-east-1)")


class CacheOptions(ApiModel):
    """Where the initializer puts hf:// models and s3:// sources before the trainer starts."""

    claim_name: Optional[str] = Field(
        default=None, max_length=253,
        description="A PersistentVolumeClaim kept across runs (a re-run skips what is already there; "
        "ReadWriteMany for several nodes); default: an emptyDir per pod",
    )
    size_limit: Optional[Quantity] = Field(default=None, description="Size limit of the emptyDir cache (without claimName)")


class Resources(ApiModel):
    """Machines and GPUs of the run, plus extra container requests and limits."""

    nodes: int = Field(default=1, ge=1, le=256, description="Pods (machines); torchrun --nnodes")
    gpus_per_node: int = Field(
        default=1, ge=0, le=16, description="GPUs per pod (nvidia.com/gpu); torchrun --nproc-per-node; 0: one CPU process"
    )
    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Container requests; cpu and memory default to the operator's per-GPU amounts (pods are Burstable)",
    )
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Extra container limits (cpu, memory)")
    shm_size: Quantity = Field(default="8Gi", description="Size of the in-memory /dev/shm (NCCL, data loaders)")
    scratch_size: Quantity = Field(
        default="50Gi", description="Size limit of /tmp (HOME and the Hugging Face cache); the pod is evicted beyond it"
    )


class RunPolicy(ApiModel):
    """Retries, deadline and clean-up of the workload."""

    backoff_limit: int = Field(default=0, ge=0, le=100, description="Pod retries before the job fails")
    active_deadline_seconds: Optional[int] = Field(default=None, ge=1, description="Wall-clock limit of the run")
    ttl_seconds_after_finished: Optional[int] = Field(
        default=None, ge=0, description="Delete the finished workload (not this resource) after this long"
    )


class Condition(ApiModel):
    type: str = Field(description="Created, Running, Succeeded, Failed, Suspended, ...")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(default="", description="CamelCase reason, for machines")
    message: str = Field(default="", description="What happened and what to do, for humans")
    last_transition_time: Optional[str] = None
    observed_generation: Optional[int] = None


Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
TERMINAL_PHASES = ("Succeeded", "Failed")


class RunStatus(ApiModel):
    """What every run-to-completion resource (FineTuneJob, EvalJob) reports; each adds its own result."""

    phase: Optional[Phase] = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: Optional[int] = None
    start_time: Optional[str] = None
    completion_time: Optional[str] = None


# Typed as Kubernetes types them (scheduling.py builds on ApiModel, so it is imported here).
from kubetune.operator.api.scheduling import Affinity, Toleration  # noqa: E402


class PodOptions(ApiModel):
    """Scheduling and identity of the trainer pods (copied to the pod template as-is)."""

    image: Optional[str] = Field(
        default=None,
        min_length=1,
        description="Container image (default: the operator's default trainer or server image, "
        "which the Helm chart sets from its values defaultImages)",
    )
    image_pull_policy: Optional[Literal["Always", "IfNotPresent", "Never"]] = Field(
        default=None, description="Image pull policy of the trainer container (default: Kubernetes' rule)"
    )
    service_account_name: Optional[str] = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN,
        description="ServiceAccount of the pods (default: none mounted; the trainer needs no API access)",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match, as in a pod spec", json_schema_extra={"maxProperties": 64}
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=64,
        description="Tolerations of the pods, as in a pod spec (e.g. for GPU node taints)",
    )
    affinity: Optional[Affinity] = Field(
        default=None, description="Node affinity, pod affinity and anti-affinity of the pods, as in a pod spec"
    )
    priority_class_name: Optional[str] = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="PriorityClass of the pods (preemption order)"
    )
