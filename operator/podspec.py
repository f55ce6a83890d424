"""Pod pieces every kubetune workload shares (EvalJob pods, model servers): identity and
scheduling from the spec, the restricted security context, metadata with owner and labels.

The FineTuneJob planner (planner.py) builds the same things for the trainer; these take any of
the three kinds (their specs share PodOptions, env, secrets and resources).
"""
from __future__ import annotations

from typing import Any, Optional

from kubetune.operator.api import API_VERSION
from kubetune.operator.initializers import CACHE_MOUNT, CACHE_VOLUME, RemoteSource
from kubetune.operator.planner import (
    MANAGED_BY,
    _env,
    _resources,
    cache_volume,
    initializer_container,
    pod_account_and_scheduling,
    pod_security_context,
)
from kubetune.operator.sources import MappedSource, PvcMount

CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def owner_reference(obj: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": obj.kind,
        "name": obj.metadata.name,
        "uid": obj.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(obj: Any, name: str, labels: dict[str, str], annotations: Optional[dict[str, str]] = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if obj.metadata.namespace:
        meta["namespace"] = obj.metadata.namespace
    if annotations:
        meta["annotations"] = dict(annotations)
    meta["ownerReferences"] = [owner_reference(obj)]
    return meta


def base_labels(label: str, base: str, component: str) -> dict[str, str]:
    return {MANAGED_BY: "kubetune", label: base, "app.kubernetes.io/component": component}


def env(obj: Any) -> list[dict[str, Any]]:
    """HOME/HF_HOME under /tmp, HF_TOKEN and spec.env (secrets only through secretKeyRef)."""
    return _env(obj)


def resources(obj: Any) -> dict[str, Any]:
    """requests/limits from spec.resources plus nvidia.com/gpu = gpusPerNode."""
    return _resources(obj)


def container_security() -> dict[str, Any]:
    return {**CONTAINER_SECURITY, "capabilities": {"drop": ["ALL"]}}


def pod_spec(obj: Any, containers: list[dict[str, Any]], volumes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Non-root, RuntimeDefault seccomp, no API token unless a ServiceAccount is named, scheduling as the spec says."""
    pod: dict[str, Any] = {
        **extra,
        "securityContext": pod_security_context(),
        "containers": containers,
        "volumes": volumes,
    }
    pod.update(pod_account_and_scheduling(obj.spec))
    return pod


def scratch_volumes(shm_size: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """/tmp (HOME; the root filesystem is read-only) and an in-memory /dev/shm."""
    volumes = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(shm_size)}},
    ]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    return volumes, mounts


def pvc_volumes(sources: list[Optional[MappedSource]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One volume and mount per distinct PVC mount of the sources (read-only unless said otherwise)."""
    seen: dict[str, PvcMount] = {}
    for source in sources:
        if source is not None and source.mount is not None:
            seen.setdefault(source.mount.volume, source.mount)
    volumes = [{"name": m.volume, "persistentVolumeClaim": {"claimName": m.claim, "readOnly": m.read_only}} for m in seen.values()]
    mounts = [{"name": m.volume, "mountPath": m.mount_path, "readOnly": m.read_only} for m in seen.values()]
    return volumes, mounts


def remote_sources_of(sources: list[Optional[MappedSource]]) -> list[RemoteSource]:
    """The hf:// and s3:// sources among the mapped ones, each URI once (the model and the
    baseline are often the same)."""
    seen: dict[str, RemoteSource] = {}
    for source in sources:
        if source is not None and source.remote is not None:
            seen.setdefault(source.remote.uri, source.remote)
    return list(seen.values())


def initializer_wiring(obj: Any, remote: list[RemoteSource], *, image: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(init containers, volumes, mounts of the main containers) that fetch `remote` into the
    cache before the main containers start, which read it read-only. The pod must also have the
    `config` volume with the plan (planner.initializer_plan) at /etc/kubetune, and `tmp`."""
    if not remote:
        return [], [], []
    init = initializer_container(obj.spec, remote, image=image)
    return [init], [cache_volume(obj.spec)], [{"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT, "readOnly": True}]
