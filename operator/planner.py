"""The planner: a FineTuneJob -> the Kubernetes objects that run it. A pure function.

plan(job, cluster) returns, in creation order, a ConfigMap with the fully resolved recipe
config, then the workload of the chosen backend: a headless Service + an indexed batch/v1 Job
whose pods run torchrun, a Kubeflow PyTorchJob, a JobSet or a Kubeflow Trainer v2 TrainJob
(the last two in kubetune.operator.backends). Every backend carries the same pod template
(trainer_pod_template); they differ only in the wrapper. Same input, same output: names are
deterministic, so the operator can create-or-adopt without ever making duplicates.
"""
from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from kubetune.operator.api import API_VERSION
from kubetune.operator.api.common import DEFAULT_TRAINER_IMAGE, RunPolicy
from kubetune.operator.api.finetune import FineTuneJob, FineTuneJobSpec
from kubetune.operator.api.scheduling import pod_fields
from kubetune.operator.initializers import (
    CACHE_MOUNT,
    CACHE_VOLUME,
    INIT_ARGV,
    INIT_CONTAINER,
    S3_SECRET_KEYS,
    SOURCES_KEY,
    RemoteSource,
    render_sources,
    sources_document,
)
from kubetune.operator.sources import MappedSource, PvcMount, map_cluster_source
from kubetune.trainer.config import ConfigError, resolve_config

# libyaml's emitter when present: the pure-Python one dominated the operator's CPU at scale.
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

MANAGED_BY = "app.kubernetes.io/managed-by"
JOB_LABEL = "kubetune.dev/job"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
PYTORCHJOB_REPLICA_TYPE = "training.kubeflow.org/replica-type"

METRICS_PORT = 9090
MASTER_PORT = 29500
CONFIG_DIR = "/etc/kubetune"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
TERMINATION_LOG = "/dev/termination-log"
CONTAINER = "trainer"
PYTORCHJOB_CONTAINER = "pytorch"  # the training-operator finds the container by this name
RUN_AS = 1000

# Every name made from the base must fit a 63-char DNS label: the ConfigMap `<base>-config`, the
# indexed Job's pod hostnames `<base>-<index>` (index < 256), and the names the Kubeflow
# training-operator derives from a PyTorchJob's name: Services and pods `<base>-master-0` and
# `<base>-worker-<i>` (i < 255: 11 characters). 63 - 11 = 52.
MAX_BASE_NAME = 52
_DNS_LABEL = re.compile(r"[^a-z0-9-]")


@dataclass(frozen=True)
class ClusterInfo:
    """What the planner needs to know about the cluster (the operator discovers it) and the
    operator's own settings that shape the children (`kubetune operator` reads them from its
    environment)."""

    has_pytorchjob: bool = False  # kubeflow.org/v1 pytorchjobs served
    has_jobset: bool = False  # jobset.x-k8s.io/v1alpha2 jobsets served
    has_trainjob: bool = False  # trainer.kubeflow.org/v1alpha1 trainjobs served and kubetune's ClusterTrainingRuntime installed
    trainer_image: str = DEFAULT_TRAINER_IMAGE  # for jobs whose spec.image is empty
    # Requests per GPU (per pod when it has none) unless spec.resources.requests names the key:
    # a pod with requests is Burstable, not BestEffort (evicted first, refused under quotas).
    cpu_per_gpu: str = "4"
    memory_per_gpu: str = "32Gi"

    def serves(self, backend: str) -> bool:
        return backend == "job" or bool(getattr(self, f"has_{backend}"))


@dataclass(frozen=True)
class ChildNames:
    base: str
    config_map: str
    service: str
    workload: str

    @property
    def master_addr(self) -> str:
        """Pod 0 of the indexed Job, reachable through the headless Service's subdomain (the
        c10d rendezvous endpoint: the name survives pod 0's restarts)."""
        return f"{self.workload}-0.{self.service}"


def base_name(name: str, limit: int = MAX_BASE_NAME) -> str:
    """A DNS-1035 label of at most `limit` chars, stable for a given CR name.

    Short, well-formed names are kept; others are cut and suffixed with a hash of the full
    name, so two long names with a common prefix still get different children."""
    clean = _DNS_LABEL.sub("-", name.lower()).strip("-")
    if clean and clean[0].isalpha() and clean == name and len(clean) <= limit:
        return clean
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = clean[: limit - 9].rstrip("-")
    if not head or not head[0].isalpha():
        head = ("j-" + head)[: limit - 9].rstrip("-")
    return f"{head}-{digest}"


def child_names(name: str) -> ChildNames:
    base = base_name(name)
    return ChildNames(base=base, config_map=f"{base}-config", service=base, workload=base)


# `backend: auto` takes the first of these that the cluster serves and that can carry the spec
# (docs/operator.md): Kubeflow Trainer v2 first (what platform teams run and watch), then the
# JobSet it is built on, then the older PyTorchJob, and the plain indexed Job everywhere else.
AUTO_ORDER = ("trainjob", "jobset", "pytorchjob", "job")


def choose_backend(spec: FineTuneJobSpec, cluster: ClusterInfo) -> str:
    if spec.backend != "auto":
        return spec.backend
    from kubetune.operator.backends import unsupported_fields  # backends import this module

    return next(b for b in AUTO_ORDER if cluster.serves(b) and not unsupported_fields(b, spec))


def labels(job: FineTuneJob) -> dict[str, str]:
    return {MANAGED_BY: "kubetune", JOB_LABEL: child_names(job.metadata.name).base, "app.kubernetes.io/component": "trainer"}


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "name": job.metadata.name,
        "uid": job.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, name: str, extra_labels: Optional[dict[str, str]] = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {**labels(job), **(extra_labels or {})}}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    meta["ownerReferences"] = [owner_reference(job)]
    return meta


# ---------------------------------------------------------------------------------------------
# The trainer config


_FROM_SPEC = {
    ("model", "path"): "spec.model.source",
    ("dataset", "source"): "spec.dataset.source",
    ("dataset", "format"): "spec.dataset.format",
    ("dataset", "split"): "spec.dataset.split",
    ("output_dir",): "spec.output.source",
}


def trainer_config(
    job: FineTuneJob, *, model_path: str, dataset_path: str, output_dir: str, metrics_port: Optional[int], progress_bar: bool
) -> dict[str, Any]:
    """spec.config plus the sources, validated by the recipe's torch-free config model.

    Returns the fully resolved config (every default filled in) as plain YAML-able data.
    Raises ConfigError naming spec.config.<key> for bad keys or values."""
    spec = job.spec
    config = {key: (dict(value) if isinstance(value, dict) else value) for key, value in spec.config.items()}
    for keys, owner in _FROM_SPEC.items():
        node: Any = config
        for part in keys[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            raise ConfigError(
                f"spec.config.{'.'.join(keys)}: set by {owner}; remove it from spec.config"
            )
    config.setdefault("model", {})
    config.setdefault("dataset", {})
    if not isinstance(config["model"], dict) or not isinstance(config["dataset"], dict):
        raise ConfigError("spec.config.model and spec.config.dataset must be mappings of keys to values")
    config["model"]["path"] = model_path
    config["dataset"].update(source=dataset_path, format=spec.dataset.format, split=spec.dataset.split)
    config["output_dir"] = output_dir
    config["metrics_port"] = metrics_port
    config["progress_bar"] = progress_bar
    try:
        resolved = resolve_config(spec.recipe, config)
    except ConfigError as err:
        raise ConfigError(f"spec.config: {err}") from None
    return resolved.model_dump(mode="json")


@dataclass(frozen=True)
class ClusterPaths:
    model: MappedSource
    dataset: MappedSource
    output: MappedSource
    output_is_ephemeral: bool

    @property
    def remote(self) -> list[RemoteSource]:
        """The hf:// and s3:// sources the initializer fetches into the cache volume."""
        return [m.remote for m in (self.model, self.dataset) if m.remote is not None]


# What admission and `kubetune plan` put where spec.fineTuneJob's model will be: only the operator,
# once that job succeeded, knows the real path (references.finetune_start_model).
UNRESOLVED_START = "file:///mnt/model/from-finetunejob"


def cluster_paths(job: FineTuneJob, start_model: Optional[str] = None) -> ClusterPaths:
    """start_model: with spec.fineTuneJob, the source of that job's model (pvc://, read-only)."""
    spec = job.spec
    if spec.model is not None:
        model = map_cluster_source(spec.model.source, "model", "spec.model.source", fetch=True)
    elif start_model is not None:
        model = map_cluster_source(start_model, "model", f"spec.fineTuneJob ({spec.fine_tune_job.name}'s output)", fetch=True)
    else:
        raise ConfigError(f"spec.fineTuneJob: the output of FineTuneJob {spec.fine_tune_job.name} is not known yet")
    dataset = map_cluster_source(spec.dataset.source, "dataset", "spec.dataset.source", fetch=True)
    if spec.output.source:
        output = map_cluster_source(spec.output.source, "output", "spec.output.source", read_only=False)
        return ClusterPaths(model, dataset, output, output_is_ephemeral=False)
    return ClusterPaths(model, dataset, MappedSource("/mnt/output"), output_is_ephemeral=True)


def cluster_trainer_config(job: FineTuneJob, start_model: Optional[str] = None) -> dict[str, Any]:
    paths = cluster_paths(job, start_model)
    return trainer_config(
        job,
        model_path=paths.model.path,
        dataset_path=paths.dataset.path,
        output_dir=paths.output.path,
        metrics_port=METRICS_PORT,
        progress_bar=False,  # pod logs are not a terminal
    )


# ---------------------------------------------------------------------------------------------
# The pod


def torchrun_argv(recipe: str, *, rendezvous: Optional[list[str]] = None) -> list[str]:
    """An argv list: CR fields never pass through a shell."""
    return ["torchrun", *(rendezvous or []), "-m", "kubetune.cli", "run", recipe, "--config", CONFIG_PATH]


def _env(job: FineTuneJob) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
        {"name": "HF_HOME", "value": "/tmp/hf-home"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "KUBETUNE_TERMINATION_LOG", "value": TERMINATION_LOG},
    ]
    if job.spec.secrets.hf_token:
        ref = job.spec.secrets.hf_token
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    for var in job.spec.env:
        if var.secret_key_ref is not None:
            ref = var.secret_key_ref
            env.append({"name": var.name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
        else:
            env.append({"name": var.name, "value": var.value or ""})
    return env


_SIMPLE_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)$")


def scale_quantity(quantity: str, factor: int) -> str:
    """`4` x 2 -> `8`, `32Gi` x 2 -> `64Gi`, `500m` x 3 -> `1500m` (number and suffix only)."""
    match = _SIMPLE_QUANTITY.match(str(quantity))
    if not match:
        raise ValueError(f"not a plain quantity: {quantity!r} (use a number with an optional suffix, e.g. 32Gi)")
    value = float(match.group(1)) * factor
    return f"{int(value) if value.is_integer() else round(value, 3)}{match.group(2)}"


def _resources(job: Any, cluster: Optional[ClusterInfo] = None) -> dict[str, Any]:
    """Container resources from spec.resources; with `cluster`, cpu/memory requests per GPU by
    default (EvalJob and server pods call this without: only what their spec says)."""
    res = job.spec.resources
    units = max(res.gpus_per_node, 1)
    defaults = {} if cluster is None else {
        "cpu": scale_quantity(cluster.cpu_per_gpu, units), "memory": scale_quantity(cluster.memory_per_gpu, units)
    }
    # A key with a limit but no request gets the limit as its request (Kubernetes' own default),
    # never a platform default that could exceed the limit.
    requests = {k: v for k, v in defaults.items() if k not in res.limits}
    requests.update({k: str(v) for k, v in res.requests.items()})
    limits = {k: str(v) for k, v in res.limits.items()}
    if res.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpus_per_node)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _volumes(job: FineTuneJob, names: ChildNames, paths: ClusterPaths) -> tuple[list[dict], list[dict]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.config_map}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(job.spec.resources.shm_size)}},
        # /tmp holds HOME and the Hugging Face cache: bounded, so a runaway cache evicts this pod
        # (the kubelet enforces sizeLimit) instead of filling the node's disk.
        {"name": "tmp", "emptyDir": {"sizeLimit": str(job.spec.resources.scratch_size)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    pvcs: list[PvcMount] = [m.mount for m in (paths.model, paths.dataset, paths.output) if m.mount is not None]
    for pvc in pvcs:
        volumes.append({"name": pvc.volume, "persistentVolumeClaim": {"claimName": pvc.claim, "readOnly": pvc.read_only}})
        mounts.append({"name": pvc.volume, "mountPath": pvc.mount_path, "readOnly": pvc.read_only})
    if paths.output_is_ephemeral:
        volumes.append({"name": "output", "emptyDir": {}})
        mounts.append({"name": "output", "mountPath": paths.output.path})
    if paths.remote:
        volumes.append(cache_volume(job.spec))
        mounts.append({"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT, "readOnly": True})  # the initializer writes it
    return volumes, mounts


def cache_volume(spec: Any) -> dict[str, Any]:
    """The initializer's cache (any kind's spec.cache): a PVC kept across runs, else an emptyDir."""
    cache = spec.cache
    if cache.claim_name:
        return {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache.claim_name}}
    return {"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": str(cache.size_limit)} if cache.size_limit is not None else {}}


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def initializer_container(spec: Any, sources: list[RemoteSource], *, image: str) -> dict[str, Any]:
    """The init container that fetches hf:// and s3:// `sources` into the cache volume, for any
    kind (FineTuneJob, EvalJob, ModelDeployment): `image` (one with kubetune: the trainer or the
    kubetune server image) running `kubetune initialize` on the plan the kind's ConfigMap holds
    at CONFIG_DIR/sources.yaml (initializer_plan). It gets the Hub token and the S3 keys from
    their Secrets, and no other secret of the spec."""
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf-home"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += [{"name": var.name, "value": var.value or ""} for var in spec.env if var.secret_key_ref is None]  # e.g. HF_ENDPOINT
    if spec.secrets.hf_token and any(s.scheme == "hf" for s in sources):
        ref = spec.secrets.hf_token
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if spec.secrets.s3 and any(s.scheme == "s3" for s in sources):
        for key in S3_SECRET_KEYS:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": spec.secrets.s3.name, "key": key}}})
    container: dict[str, Any] = {
        "name": INIT_CONTAINER,
        "image": image,
        "command": list(INIT_ARGV),
        "env": env,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            # the only writer of the cache (a TrainJob's runtime runs the initializer with no sources too)
            *([{"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT}] if sources else []),
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _security_context(),
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def initializer_plan(spec: Any, sources: list[RemoteSource]) -> str:
    """The initializer's plan (the ConfigMap's sources.yaml): each remote source and its place in the cache."""
    return render_sources(sources_document(sources, CACHE_MOUNT, endpoint=spec.s3.endpoint, region=spec.s3.region))


def _container(
    job: FineTuneJob, names: ChildNames, paths: ClusterPaths, cluster: Optional[ClusterInfo] = None, *, name: str, argv: list[str],
    env_extra: list[dict],
) -> dict[str, Any]:
    _, mounts = _volumes(job, names, paths)
    container: dict[str, Any] = {
        "name": name,
        "image": job.spec.image,
        "command": argv,
        "env": env_extra + _env(job),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _security_context(),
    }
    if job.spec.image_pull_policy:
        container["imagePullPolicy"] = job.spec.image_pull_policy
    container["resources"] = _resources(job, cluster)
    return container


def _pod_spec(job: FineTuneJob, names: ChildNames, paths: ClusterPaths, container: dict[str, Any]) -> dict[str, Any]:
    spec = job.spec
    volumes, _ = _volumes(job, names, paths)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if paths.remote:
        pod["initContainers"] = [initializer_container(spec, paths.remote, image=spec.image)]
    pod.update(pod_account_and_scheduling(spec))
    return pod


def pod_security_context() -> dict[str, Any]:
    """Every planned pod's: non-root with our numeric ids, RuntimeDefault seccomp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        # Chown a volume only when its root is not ours yet: not a full walk of a model
        # PVC (hundreds of GB) at every pod start.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_account_and_scheduling(spec: Any) -> dict[str, Any]:
    """The pod fields every kind takes from its spec: the ServiceAccount (without one, no API token
    at all: the trainer and the server never talk to the API) and the scheduling fields."""
    pod: dict[str, Any] = {}
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    else:
        pod["automountServiceAccountToken"] = False
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:  # as given (typed and checked as the API server checks a pod spec)
        pod["tolerations"] = [pod_fields(t) for t in spec.tolerations]
    if spec.affinity:
        pod["affinity"] = pod_fields(spec.affinity)
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    return pod


def trainer_pod_template(job: FineTuneJob, names: ChildNames, paths: ClusterPaths, *, container_name: str, argv: list[str], env_extra: list[dict]) -> dict[str, Any]:
    """The pod template every backend runs: only the container's name, the rendezvous flags
    and env differ between backends (the wrappers add those)."""
    container = _container(job, names, paths, ClusterInfo(), name=container_name, argv=argv, env_extra=env_extra)
    return {"metadata": {"labels": labels(job)}, "spec": _pod_spec(job, names, paths, container)}


def workload_metadata(job: FineTuneJob, name: str) -> dict[str, Any]:
    """The workload's metadata: the children's, plus the Kueue queue label when queued."""
    return _metadata(job, name, _workload_labels(job))


def _workload_labels(job: FineTuneJob) -> dict[str, str]:
    return {KUEUE_QUEUE_LABEL: job.spec.queue_name} if job.spec.queue_name else {}


def is_suspended(spec: FineTuneJobSpec) -> bool:
    """Suspended by the user, or waiting for Kueue to admit it (Kueue unsuspends)."""
    return spec.suspend or bool(spec.queue_name)


# ---------------------------------------------------------------------------------------------
# The children


def render_config(recipe: str, config: dict[str, Any]) -> str:
    """The trainer's config file: `recipe:` first (as in the built-in configs), then the keys."""
    return f"recipe: {recipe}\n" + yaml.dump(config, Dumper=_YAML_DUMPER, sort_keys=True)


def config_map(job: FineTuneJob, names: ChildNames, config: dict[str, Any], paths: Optional[ClusterPaths] = None) -> dict[str, Any]:
    data = {"config.yaml": render_config(job.spec.recipe, config)}
    if paths is not None:
        data[SOURCES_KEY] = initializer_plan(job.spec, paths.remote)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names.config_map),
        "data": data,
    }


def headless_service(job: FineTuneJob, names: ChildNames) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names.service),
        "spec": {
            "clusterIP": "None",
            # Rendezvous starts before the pods are Ready: their DNS names must resolve anyway.
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: names.base},
            "ports": [
                {"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT},
            ],
        },
    }


def rendezvous_args(job: FineTuneJob, names: ChildNames) -> list[str]:
    """torchrun's flags: elastic c10d rendezvous hosted by pod 0 at a stable DNS name.

    A static rendezvous (--master-addr + --node-rank) cannot take a restarted node back: its
    peers hang holding GPUs. With c10d, a worker failure makes every agent restart its workers
    together (up to --max-restarts = spec.runPolicy.backoffLimit), and a replaced pod rejoins
    the same rendezvous; all resume from the last checkpoint. The endpoint `<job>-0.<service>`
    outlives pod restarts, and ranks follow the sorted node names (torch.distributed.elastic
    dynamic_rendezvous), so pod 0 stays rank 0, the one that serves metrics."""
    res = job.spec.resources
    return [
        f"--nnodes={res.nodes}",
        f"--nproc-per-node={max(res.gpus_per_node, 1)}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={names.master_addr}:{MASTER_PORT}",
        f"--rdzv-id={job.metadata.uid or names.base}",
        f"--max-restarts={job.spec.run_policy.backoff_limit}",
    ]


# Exit code of the trainer for a bad config (KubetuneError): retrying cannot help.
CONFIG_ERROR_EXIT_CODE = 2


def pod_failure_policy(container: str) -> dict[str, Any]:
    """Disruptions (preemption, eviction, node drain: the DisruptionTarget condition) do not count
    against backoffLimit; a config error fails the Job at once; other failures count."""
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": [CONFIG_ERROR_EXIT_CODE]}},
        ]
    }


def indexed_job(job: FineTuneJob, names: ChildNames, paths: ClusterPaths, cluster: ClusterInfo) -> dict[str, Any]:
    res = job.spec.resources
    container = _container(
        job, names, paths, cluster, name=CONTAINER, argv=torchrun_argv(job.spec.recipe, rendezvous=rendezvous_args(job, names)), env_extra=[]
    )
    pod = _pod_spec(job, names, paths, container)
    pod["subdomain"] = names.service
    policy = job.spec.run_policy
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": res.nodes,
        "parallelism": res.nodes,
        "backoffLimit": policy.backoff_limit * res.nodes,  # a group restart can fail every node once
        "podFailurePolicy": pod_failure_policy(CONTAINER),
        "suspend": is_suspended(job.spec),
        "template": {"metadata": {"labels": labels(job)}, "spec": pod},
        **_optional_limits(policy),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, names.workload, _workload_labels(job)),
        "spec": spec,
    }


def _optional_limits(policy: RunPolicy) -> dict[str, int]:
    """The deadline and TTL keys that a batch/v1 Job spec and a PyTorchJob runPolicy name alike, when set."""
    limits = {}
    if policy.active_deadline_seconds is not None:
        limits["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        limits["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return limits


def pytorch_job(job: FineTuneJob, names: ChildNames, paths: ClusterPaths, cluster: ClusterInfo) -> dict[str, Any]:
    res = job.spec.resources
    # The training-operator sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ... which torchrun
    # reads as its defaults: no rendezvous flags here.
    container = _container(job, names, paths, cluster, name=PYTORCHJOB_CONTAINER, argv=torchrun_argv(job.spec.recipe), env_extra=[])
    container["ports"].append({"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"})
    template = {"metadata": {"labels": labels(job)}, "spec": _pod_spec(job, names, paths, container)}
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if res.nodes > 1:
        replicas["Worker"] = {"replicas": res.nodes - 1, "restartPolicy": "Never", "template": copy.deepcopy(template)}
    policy = job.spec.run_policy
    # cleanPodPolicy Running: when the job ends, pods still running (hung workers) are deleted.
    run_policy: dict[str, Any] = {"cleanPodPolicy": "Running", "backoffLimit": policy.backoff_limit, "suspend": is_suspended(job.spec),
                                  **_optional_limits(policy)}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(job, names.workload, _workload_labels(job)),
        "spec": {"nprocPerNode": str(max(res.gpus_per_node, 1)), "runPolicy": run_policy, "pytorchReplicaSpecs": replicas},
    }


def with_image(job: FineTuneJob, default_image: str) -> FineTuneJob:
    """The job with spec.image filled in when the manifest names none."""
    if job.spec.image:
        return job
    return job.model_copy(update={"spec": job.spec.model_copy(update={"image": default_image})})


def plan(job: FineTuneJob, cluster: ClusterInfo, *, backend: Optional[str] = None, start_model: Optional[str] = None) -> list[dict[str, Any]]:
    """The children of a FineTuneJob, in creation order (the workload last, once its config exists).

    backend: the one recorded in status when the workload was first made (the operator plans
    from it forever after); None: decide from spec.backend and the cluster.
    start_model: with spec.fineTuneJob, the source of that job's model.
    Raises ConfigError / SourceError (KubetuneError) naming the field when the spec cannot run."""
    job = with_image(job, cluster.trainer_image)
    names = child_names(job.metadata.name)
    paths = cluster_paths(job, start_model)
    config = cluster_trainer_config(job, start_model)
    children = [config_map(job, names, config, paths)]
    backend = backend or choose_backend(job.spec, cluster)
    if backend in ("jobset", "trainjob"):
        from kubetune.operator.backends import workload  # backends import this module

        children.append(workload(backend, job, names, paths))
    elif backend == "pytorchjob":
        children.append(pytorch_job(job, names, paths, cluster))
    else:
        children += [headless_service(job, names), indexed_job(job, names, paths, cluster)]
    return children
