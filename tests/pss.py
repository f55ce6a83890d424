"""The Kubernetes "restricted" Pod Security Standard as a test helper.

`restricted_violations(obj)` takes any object that holds pods (Pod, Deployment, Job, PyTorchJob,
JobSet, TrainJob, ...) and returns what the API server's `pod-security.kubernetes.io/enforce:
restricted` admission would refuse, one readable line per problem; an empty list means it passes.
The rules follow https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the
baseline controls plus the restricted ones, policy version "latest"), read the way the
pod-security admission library reads them: a container-level setting overrides the pod's.
Used for the chart's pods (tests/platform/test_chart.py) and the planner's (any test can import it).
"""
from __future__ import annotations

from typing import Any, Iterator

# Restricted: only these volume types.
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
# Baseline: sysctls known to be namespaced and safe.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def pod_specs(obj: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec inside `obj`: a Pod's spec, and any `template.spec` (Deployments, Jobs,
    PyTorchJob replicas, JobSet replicated jobs, ...), found by walking the object."""
    if obj.get("kind") == "Pod" and not path:
        yield "spec", obj.get("spec", {})
        return
    for key, value in obj.items():
        here = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            if key == "template" and isinstance(value.get("spec"), dict) and "containers" in value["spec"]:
                yield f"{here}.spec", value["spec"]
            else:
                yield from pod_specs(value, here)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    yield from pod_specs(item, f"{here}[{i}]")


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(field) or []:
            yield f"{field}[{c.get('name', '?')}]", c


def pod_spec_violations(spec: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"{flag} is true")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"volume {vol.get('name')!r} has type {sorted(kinds - ALLOWED_VOLUMES)} (restricted allows {sorted(ALLOWED_VOLUMES)})")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl.get('name')} is not in the safe set")
    if (pod_sc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
        problems.append("pod seLinuxOptions.type is not allowed")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod securityContext.runAsUser is 0 (root)")
    if (pod_sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        problems.append("pod appArmorProfile is Unconfined")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: securityContext.capabilities.drop must contain ALL")
        added = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            problems.append(f"{where}: capabilities.add {sorted(added)} (only NET_BIND_SERVICE is allowed)")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{where}: runAsNonRoot must be true (pod or container securityContext)")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser is 0 (root)")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in SECCOMP_OK:
            problems.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (pod or container), got {seccomp}")
        if (sc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
            problems.append(f"{where}: seLinuxOptions.type is not allowed")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}: procMount must be Default")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{where}: appArmorProfile is Unconfined")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{where}: hostPort {port['hostPort']}")
    return problems


def restricted_violations(obj: dict[str, Any]) -> list[str]:
    """What the restricted Pod Security Standard refuses in `obj`'s pods ([] when it passes).
    An object with no pod inside is reported too, so a caller cannot pass by checking nothing."""
    found = list(pod_specs(obj))
    if not found:
        return [f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}: no pod spec found"]
    name = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
    return [f"{name} {path}: {problem}" for path, spec in found for problem in pod_spec_violations(spec)]
