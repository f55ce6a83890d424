"""The ModelDeployment planner: a ModelDeployment (and the FineTuneJob it names) -> a Service, a
NetworkPolicy, an apps/v1 Deployment and, with spec.autoscaling, a HorizontalPodAutoscaler. Pure.
hf:// and s3:// models and adapters are fetched by the initializer (an init container, its plan
in a ConfigMap `<name>-sources`) into the cache volume (spec.cache) before the server starts.

Runtimes (an argv list each, no shell):
- kubetune: `kubetune serve MODEL --host 0.0.0.0 --port P --served-model-name NAME
  --max-concurrency N [--max-model-len L] [--adapter NAME=DIR ...]`; probes /readyz and /healthz.
- vllm: `vllm serve MODEL --host 0.0.0.0 --port P --served-model-name NAME --max-num-seqs N
  --tensor-parallel-size GPUS [--max-model-len L] [--enable-lora --max-loras K --lora-modules NAME=DIR ...]`
  (flags checked against vLLM's CLI in tests/operator/data/vllm_cli_flags.yaml); probes /health.
spec.extraArgs are appended as they are.

API keys (spec.apiKeySecret) never appear in an argument, an env value or the status: runtime
kubetune reads them from the Secret's key mounted as a file (`--api-key-file`, one key per line);
vLLM, which takes no key file, from the env var VLLM_API_KEY filled by the kubelet (secretKeyRef).

The NetworkPolicy (spec.networkPolicy, on by default) selects the server pods and admits ingress
only to the API port, only from this namespace's pods unless spec.networkPolicy.from names others:
everything else (other namespaces, other ports) is denied where the network plugin enforces it.

Rolling updates never take a ready replica away (maxUnavailable 0, maxSurge 1): a new model is
served by new pods before old ones go. The pod template carries the model's identity
(annotation kubetune.dev/model-id) and the Deployment a hash of its planned spec
(kubetune.dev/spec-hash), which the reconciler compares to decide whether to roll out.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from kubetune.errors import KubetuneError
from kubetune.operator.api.common import DEFAULT_SERVER_IMAGE
from kubetune.operator.api.evaljob import ModelDeployment
from kubetune.operator.initializers import SOURCES_KEY
from kubetune.operator.inputs import ModelInputs, cluster_inputs
from kubetune.operator.planner import CONFIG_DIR, base_name, initializer_plan
from kubetune.operator.podspec import (
    base_labels,
    container_security,
    env,
    initializer_wiring,
    metadata,
    pod_spec,
    pvc_volumes,
    remote_sources_of,
    resources,
    scratch_volumes,
)
from kubetune.operator.sources import MappedSource, map_cluster_source

DEPLOYMENT_LABEL = "kubetune.dev/modeldeployment"
MODEL_ID_ANNOTATION = "kubetune.dev/model-id"
SPEC_HASH_ANNOTATION = "kubetune.dev/spec-hash"
CONTAINER = "server"
# runtime kubetune: the operator's server image (KUBETUNE_DEFAULT_SERVER_IMAGE); vllm: vLLM's own image.
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.8.5"
# Model loading can take minutes: the startup probe allows up to 30 min before liveness applies.
STARTUP_SECONDS = 1800
PROBE_PERIOD = 10
# Requests in flight per pod, as the servers export them (a custom metrics adapter must serve
# them to the HPA under these names; vLLM's own name is vllm:num_requests_running).
IN_FLIGHT_METRIC = {"kubetune": "kubetune_serve_running_sequences", "vllm": "vllm_num_requests_running"}
HEALTH = {"kubetune": ("/readyz", "/healthz"), "vllm": ("/health", "/health")}
API_KEYS_DIR = "/etc/kubetune/api-keys"
API_KEYS_FILE = "keys"
API_KEYS_VOLUME = "api-keys"
VLLM_API_KEY_ENV = "VLLM_API_KEY"


def labels(mdep: ModelDeployment) -> dict[str, str]:
    return base_labels(DEPLOYMENT_LABEL, base_name(mdep.metadata.name), "server")


def selector(mdep: ModelDeployment) -> dict[str, str]:
    return {DEPLOYMENT_LABEL: base_name(mdep.metadata.name)}


def served_name(mdep: ModelDeployment) -> str:
    return mdep.spec.served_model_name or mdep.metadata.name


def served_models(mdep: ModelDeployment, inputs: ModelInputs) -> list[str]:
    """Names clients put in `model`: the base model's, the FineTuneJob's adapter (under the job's
    name), then spec.adapters. Refuses a name served twice."""
    names = [served_name(mdep)]
    if inputs.adapter is not None:
        names.append(inputs.adapter_name or f"{served_name(mdep)}-adapter")
    names += [adapter.name for adapter in mdep.spec.adapters]
    for name in names:
        if names.count(name) > 1:
            raise KubetuneError(
                f"spec.adapters: the name '{name}' is served twice (adapters, the FineTuneJob's adapter and "
                "the model's served name (spec.servedModelName, default the resource's name) must differ)"
            )
    return names


def adapters(mdep: ModelDeployment, inputs: ModelInputs, map_source: Any) -> list[tuple[str, str]]:
    """(name, path) of every adapter served: the FineTuneJob's under its name, then spec.adapters."""
    names = served_models(mdep, inputs)[1:]
    paths = ([inputs.adapter.path] if inputs.adapter is not None else []) + [
        map_source(adapter.source, index).path for index, adapter in enumerate(mdep.spec.adapters)
    ]
    return list(zip(names, paths))


def check_spec(mdep: ModelDeployment) -> None:
    spec = mdep.spec
    if spec.resources.nodes != 1:
        raise KubetuneError("spec.resources.nodes: a ModelDeployment runs single-pod servers; scale with spec.replicas or spec.autoscaling")
    if spec.runtime == "vllm" and spec.resources.gpus_per_node < 1:
        raise KubetuneError("spec.resources.gpusPerNode: runtime vllm needs at least one GPU per pod (or use runtime: kubetune on CPUs)")
    scaling = spec.autoscaling
    if scaling is not None and scaling.metric == "cpu" and "cpu" not in spec.resources.requests:
        raise KubetuneError("spec.autoscaling.metric cpu: utilization is measured against spec.resources.requests.cpu; set it")


def kubetune_argv(mdep: ModelDeployment, model: str, adapter_list: list[tuple[str, str]]) -> list[str]:
    spec = mdep.spec
    argv = ["kubetune", "serve", model, "--host", "0.0.0.0", "--port", str(spec.port),
            "--served-model-name", served_name(mdep), "--max-concurrency", str(spec.max_concurrency)]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.api_key_secret is not None:  # the file's path, never the key
        argv += ["--api-key-file", f"{API_KEYS_DIR}/{API_KEYS_FILE}"]
    for name, path in adapter_list:
        argv += ["--adapter", f"{name}={path}"]
    return argv + list(spec.extra_args)


def vllm_argv(mdep: ModelDeployment, model: str, adapter_list: list[tuple[str, str]]) -> list[str]:
    spec = mdep.spec
    argv = ["vllm", "serve", model, "--host", "0.0.0.0", "--port", str(spec.port),
            "--served-model-name", served_name(mdep), "--max-num-seqs", str(spec.max_concurrency),
            "--tensor-parallel-size", str(max(spec.resources.gpus_per_node, 1))]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if adapter_list:
        argv += ["--enable-lora", "--max-loras", str(len(adapter_list)),
                 "--lora-modules", *(f"{name}={path}" for name, path in adapter_list)]
    return argv + list(spec.extra_args)


def api_key_wiring(mdep: ModelDeployment) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts, env) that give the server spec.apiKeySecret without the key leaving the Secret."""
    ref = mdep.spec.api_key_secret
    if ref is None:
        return [], [], []
    if mdep.spec.runtime == "vllm":
        return [], [], [{"name": VLLM_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]
    volume = {"name": API_KEYS_VOLUME, "secret": {
        "secretName": ref.name, "items": [{"key": ref.key, "path": API_KEYS_FILE}],
        "defaultMode": 0o440,  # owner root, group fsGroup (the server's group): not world-readable
    }}
    mount = {"name": API_KEYS_VOLUME, "mountPath": API_KEYS_DIR, "readOnly": True}
    return [volume], [mount], []


def sources_config_map(mdep: ModelDeployment, name: str, plan: str) -> dict[str, Any]:
    """The initializer's plan (CONFIG_DIR/sources.yaml in its container). It carries a hash of its
    data, so the reconciler updates it when the sources change (before the Deployment rolls)."""
    data = {SOURCES_KEY: plan}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(mdep, name, labels(mdep), {SPEC_HASH_ANNOTATION: spec_hash(data)}),
        "data": data,
    }


def network_policy(mdep: ModelDeployment, name: str) -> dict[str, Any]:
    """Ingress to the server pods: the API port only, from the peers of spec.networkPolicy.from
    (default: every pod of the namespace). Probes come from the kubelet, which policies do not block."""
    peers = [
        {key: {"matchLabels": dict(selector.match_labels)}
         for key, selector in (("podSelector", peer.pod_selector), ("namespaceSelector", peer.namespace_selector))
         if selector is not None}
        for peer in mdep.spec.network_policy.from_
    ] or [{"podSelector": {}}]
    spec = {
        "podSelector": {"matchLabels": selector(mdep)},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": mdep.spec.port}]}],
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(mdep, name, labels(mdep), {SPEC_HASH_ANNOTATION: spec_hash(spec)}),
        "spec": spec,
    }


def probes(mdep: ModelDeployment) -> dict[str, Any]:
    ready_path, live_path = HEALTH[mdep.spec.runtime]

    def get(path: str, **extra: Any) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": PROBE_PERIOD, **extra}

    return {
        "startupProbe": get(live_path, failureThreshold=STARTUP_SECONDS // PROBE_PERIOD),
        "readinessProbe": get(ready_path, failureThreshold=3),
        "livenessProbe": get(live_path, failureThreshold=3, timeoutSeconds=5),
    }


def spec_hash(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def service_url(mdep: ModelDeployment) -> str:
    ns = mdep.metadata.namespace or "default"
    return f"http://{base_name(mdep.metadata.name)}.{ns}.svc:{mdep.spec.port}/v1"


def plan_deployment(
    mdep: ModelDeployment, ftj: Optional[dict[str, Any]] = None, *, server_image: str = DEFAULT_SERVER_IMAGE
) -> list[dict[str, Any]]:
    """Service, NetworkPolicy (unless disabled), Deployment (and HPA), in creation order. `ftj`: the referenced FineTuneJob (succeeded);
    `server_image`: the operator's default for runtime kubetune when spec.image is empty.

    Raises KubetuneError naming the field when the spec cannot run."""
    check_spec(mdep)
    spec = mdep.spec
    name = base_name(mdep.metadata.name)
    inputs = cluster_inputs(mdep, ftj)
    adapter_sources: list[MappedSource] = []

    def map_adapter(source: str, index: int) -> MappedSource:
        mapped = map_cluster_source(source, f"adapter-{index}", f"spec.adapters[{index}].source", fetch=True)
        adapter_sources.append(mapped)
        return mapped

    adapter_list = adapters(mdep, inputs, map_adapter)
    argv = (vllm_argv if spec.runtime == "vllm" else kubetune_argv)(mdep, inputs.model.path, adapter_list)
    volumes, mounts = scratch_volumes(spec.resources.shm_size)
    pvc_v, pvc_m = pvc_volumes([inputs.model, inputs.adapter, *adapter_sources])
    key_v, key_m, key_env = api_key_wiring(mdep)
    # hf:// and s3:// models and adapters: an init container fetches them into the cache first,
    # with kubetune's server image (vLLM's image has no `kubetune initialize`), from a plan in a
    # ConfigMap of its own.
    remote = remote_sources_of([inputs.model, inputs.adapter, *adapter_sources])
    init_image = spec.image if spec.image and spec.runtime == "kubetune" else server_image
    init_containers, cache_v, cache_m = initializer_wiring(mdep, remote, image=init_image)
    sources_map = sources_config_map(mdep, f"{name}-sources", initializer_plan(spec, remote)) if remote else None
    if sources_map is not None:
        cache_v.append({"name": "config", "configMap": {"name": sources_map["metadata"]["name"]}})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or (DEFAULT_VLLM_IMAGE if spec.runtime == "vllm" else server_image),
        "command": argv,
        "env": env(mdep) + key_env,
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "volumeMounts": mounts + pvc_m + key_m + cache_m,
        "securityContext": container_security(),
        **probes(mdep),
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    res = resources(mdep)
    if res:
        container["resources"] = res
    template = {
        "metadata": {"labels": labels(mdep), "annotations": {MODEL_ID_ANNOTATION: inputs.identity}},
        # In-flight requests finish on SIGTERM (readiness turns 503 first): give them time.
        "spec": pod_spec(mdep, [container], volumes + pvc_v + key_v + cache_v, terminationGracePeriodSeconds=120,
                         **({"initContainers": init_containers} if init_containers else {})),
    }
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector(mdep)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "progressDeadlineSeconds": STARTUP_SECONDS,
        "template": template,
    }
    if spec.autoscaling is None:
        deployment_spec["replicas"] = spec.replicas  # with an HPA, the HPA owns the replica count
    annotations = {SPEC_HASH_ANNOTATION: spec_hash(deployment_spec), MODEL_ID_ANNOTATION: inputs.identity}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(mdep, name, labels(mdep), annotations),
        "spec": deployment_spec,
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(mdep, name, labels(mdep)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(mdep),
            "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    # The policy before the Deployment: its pods never run unprotected.
    children = [service] + ([network_policy(mdep, name)] if spec.network_policy.enabled else []) + ([sources_map] if sources_map else []) + [deployment]
    if spec.autoscaling is not None:
        children.append(autoscaler(mdep, name))
    return children


def autoscaler(mdep: ModelDeployment, name: str) -> dict[str, Any]:
    scaling = mdep.spec.autoscaling
    assert scaling is not None
    if scaling.metric == "cpu":
        metric = {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": scaling.target or 70}}}
    else:
        target = scaling.target or max(mdep.spec.max_concurrency // 2, 1)
        metric = {"type": "Pods", "pods": {"metric": {"name": IN_FLIGHT_METRIC[mdep.spec.runtime]},
                                           "target": {"type": "AverageValue", "averageValue": str(target)}}}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(mdep, name, labels(mdep)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [metric],
        },
    }
