"""backend: trainjob -> one Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1,
written from Kubeflow Trainer v2.3.0's API).

A TrainJob names a ClusterTrainingRuntime (kubetune ships one: examples/kubeflow/
clustertrainingruntime.yaml, `kubetune-torch`) that holds the JobSet template; the TrainJob
then sets what its `trainer` field can (image, command, env, numNodes, numProcPerNode,
resourcesPerNode) and patches the rest of the pod (volumes, security contexts, mounts,
scheduling) through a runtime patch of the runtime's `node` replicated job. The runtime also
holds kubetune's initializer init container (`kubetune initialize`), which the patch gives its
mounts and Secrets. The Trainer's torch
plugin sets torchrun's PET_* rendezvous variables, as the training-operator does for a
PyTorchJob, so the command has no rendezvous flags.

What a TrainJob cannot say per job (the runtime owns it): retries (the runtime's JobSet
failurePolicy), a TTL, the priority class and the image pull policy. unsupported_fields names
them, so an explicit `backend: trainjob` fails clearly and `auto` passes to the next backend.
"""
from __future__ import annotations

from typing import Any, Optional

from kubetune.operator.api.finetune import FineTuneJob, FineTuneJobSpec
from kubetune.operator.backends.jobset import JOBSET_NAME_LABEL, MAX_NAME, RESTART_ATTEMPT_LABEL, jobs_status_state
from kubetune.operator.planner import (
    ChildNames,
    ClusterPaths,
    base_name,
    initializer_container,
    is_suspended,
    torchrun_argv,
    trainer_pod_template,
    workload_metadata,
)
from kubetune.operator.status import WorkloadState

API_VERSION = "trainer.kubeflow.org/v1alpha1"
KIND = "TrainJob"
RUNTIME = "kubetune-torch"  # the ClusterTrainingRuntime kubetune ships
RUNTIME_API_GROUP = "trainer.kubeflow.org"
RUNTIME_KIND = "ClusterTrainingRuntime"
REPLICATED_JOB = "node"  # the runtime's trainer step (label trainer.kubeflow.org/trainjob-ancestor-step: trainer)
CONTAINER = "node"  # the Trainer finds the trainer container by this name
PATCH_MANAGER = "kubetune.dev/operator"
# The pod-spec keys a TrainJob's runtime patch can set (PodSpecPatch in trainjob_types.go).
POD_PATCH_KEYS = ("serviceAccountName", "volumes", "securityContext", "nodeSelector", "affinity", "tolerations")
# The container keys it can set (ContainerPatch): the rest comes from the trainer field or the runtime.
CONTAINER_PATCH_KEYS = ("volumeMounts", "securityContext")


def trainjob_name(job_name: str) -> str:
    """The Trainer names the JobSet after the TrainJob: the same hostname limit applies."""
    return base_name(job_name, MAX_NAME)


def unsupported_fields(spec: FineTuneJobSpec) -> list[str]:
    problems = []
    if spec.run_policy.backoff_limit:
        problems.append(
            "spec.runPolicy.backoffLimit: a TrainJob takes its restarts from the ClusterTrainingRuntime "
            f"({RUNTIME}: spec.template.spec.failurePolicy.maxRestarts); remove it or use backend: jobset"
        )
    if spec.run_policy.ttl_seconds_after_finished is not None:
        problems.append(
            "spec.runPolicy.ttlSecondsAfterFinished: a TrainJob takes it from the ClusterTrainingRuntime's JobSet "
            "template; remove it or use backend: jobset"
        )
    if spec.priority_class_name:
        problems.append(
            "spec.priorityClassName: a TrainJob cannot set it per job (its runtime patch has no such field); "
            "set it in the ClusterTrainingRuntime, use a Kueue WorkloadPriorityClass, or use backend: jobset"
        )
    if spec.image_pull_policy:
        problems.append(
            "spec.imagePullPolicy: a TrainJob cannot set it per job; set it in the ClusterTrainingRuntime or use backend: jobset"
        )
    return problems


def trainjob(job: FineTuneJob, names: ChildNames, paths: ClusterPaths) -> dict[str, Any]:
    res, policy = job.spec.resources, job.spec.run_policy
    template = trainer_pod_template(job, names, paths, container_name=CONTAINER, argv=torchrun_argv(job.spec.recipe), env_extra=[])
    pod = template["spec"]
    (container,) = pod["containers"]
    trainer: dict[str, Any] = {
        "image": container["image"],
        "command": container["command"],
        "env": container["env"],
        "numNodes": res.nodes,
        "numProcPerNode": max(res.gpus_per_node, 1),
    }
    if container.get("resources"):
        trainer["resourcesPerNode"] = container["resources"]
    pod_patch: dict[str, Any] = {key: pod[key] for key in POD_PATCH_KEYS if key in pod}
    pod_patch["containers"] = [{"name": CONTAINER, **{key: container[key] for key in CONTAINER_PATCH_KEYS}}]
    # The runtime runs kubetune's initializer in every TrainJob (a patch cannot add a container):
    # it gets its mounts, Secrets and security context here; with no remote source its plan is empty.
    init = initializer_container(job.spec, paths.remote, image=container["image"])
    pod_patch["initContainers"] = [{"name": init["name"], "env": init["env"], **{k: init[k] for k in CONTAINER_PATCH_KEYS}}]
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {"name": REPLICATED_JOB, "template": {"spec": {"template": {"metadata": template["metadata"], "spec": pod_patch}}}}
                    ]
                }
            }
        },
    }
    spec: dict[str, Any] = {
        "runtimeRef": {"name": RUNTIME, "apiGroup": RUNTIME_API_GROUP, "kind": RUNTIME_KIND},
        "trainer": trainer,
        "runtimePatches": [patch],
        "suspend": is_suspended(job.spec),
    }
    if policy.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": workload_metadata(job, trainjob_name(job.metadata.name)), "spec": spec}


def trainjob_state(obj: dict[str, Any], *, queue_name: Optional[str]) -> WorkloadState:
    """TrainJob conditions Complete / Failed / Suspended, and status.jobsStatus counts."""
    return jobs_status_state(KIND, obj, (obj.get("status") or {}).get("jobsStatus") or [], done="Complete", queue_name=queue_name)


def owns_pod(obj: dict[str, Any], pod: dict[str, Any]) -> bool:
    """A pod of this TrainJob: the Trainer names its JobSet after the TrainJob, and the JobSet
    controller labels its pods with that name (its uid is not in the TrainJob's status)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    owners = (pod.get("metadata") or {}).get("ownerReferences") or []
    by_job = any(o.get("kind") == "Job" and o.get("controller") for o in owners)
    return by_job and labels.get(JOBSET_NAME_LABEL) == obj["metadata"]["name"]


def trainjob_restarts(pods: list[dict[str, Any]]) -> int:
    """The TrainJob's status has no restart count: the JobSet labels each pod with its restart attempt."""
    attempts = [((p.get("metadata") or {}).get("labels") or {}).get(RESTART_ATTEMPT_LABEL) for p in pods]
    return max((int(a) for a in attempts if a and a.isdigit()), default=0)
