"""backend: jobset -> one JobSet (jobset.x-k8s.io/v1alpha2, written from JobSet v0.12.0's API).

One replicated job `node` of one indexed Job with `nodes` pods: the pods reach each other
through the headless Service the JobSet controller makes (network.subdomain, with
publishNotReadyAddresses so rendezvous DNS works before readiness); pod 0 of job 0
(`<jobset>-node-0-0.<jobset>`) is torchrun's master, and each pod's node rank is its
completion index, as in the indexed-Job backend.

Failure semantics: the Job inside fails at its first failed pod (backoffLimit 0), and the
JobSet's failurePolicy then recreates the whole group (restartStrategy Recreate) up to
spec.runPolicy.backoffLimit times; the trainer resumes from its newest checkpoint
(`resume: auto`). status.restarts of the JobSet counts those restarts.
"""
from __future__ import annotations

from typing import Any, Optional

from kubetune.operator.api.finetune import FineTuneJob
from kubetune.operator.planner import (
    COMPLETION_INDEX,
    CONTAINER,
    MASTER_PORT,
    ChildNames,
    ClusterPaths,
    base_name,
    is_suspended,
    labels,
    torchrun_argv,
    trainer_pod_template,
    workload_metadata,
)
from kubetune.operator.status import WorkloadState

API_VERSION = "jobset.x-k8s.io/v1alpha2"
KIND = "JobSet"
REPLICATED_JOB = "node"
# Pod hostnames are <jobset>-node-0-<index> and must fit a 63-char DNS label for up to 1000
# nodes (3 digits): the JobSet's name gets a shorter cut than the other children.
MAX_NAME = 63 - len(f"-{REPLICATED_JOB}-0-999")

# Labels the JobSet controller puts on its Jobs' pods (api/jobset/v1alpha2/jobset_types.go).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOBSET_UID_LABEL = "jobset.sigs.k8s.io/jobset-uid"
RESTART_ATTEMPT_LABEL = "jobset.sigs.k8s.io/restart-attempt"


def jobset_name(job_name: str) -> str:
    return base_name(job_name, MAX_NAME)


def jobset(job: FineTuneJob, names: ChildNames, paths: ClusterPaths) -> dict[str, Any]:
    res, policy = job.spec.resources, job.spec.run_policy
    name = jobset_name(job.metadata.name)
    rendezvous = [
        f"--nnodes={res.nodes}",
        f"--nproc-per-node={max(res.gpus_per_node, 1)}",
        "--node-rank=$(NODE_RANK)",  # expanded by the kubelet from the env below, not by a shell
        f"--master-addr={name}-{REPLICATED_JOB}-0-0.{name}",
        f"--master-port={MASTER_PORT}",
    ]
    node_rank = {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}}
    template = trainer_pod_template(
        job, names, paths, container_name=CONTAINER, argv=torchrun_argv(job.spec.recipe, rendezvous=rendezvous), env_extra=[node_rank]
    )
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": res.nodes,
        "parallelism": res.nodes,
        "backoffLimit": 0,  # one failed pod fails the Job; the JobSet restarts the whole group
        "template": template,
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds  # per attempt: JobSet has no overall deadline
    spec: dict[str, Any] = {
        "replicatedJobs": [
            {"name": REPLICATED_JOB, "replicas": 1, "template": {"metadata": {"labels": labels(job)}, "spec": job_spec}}
        ],
        "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
        "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
        "failurePolicy": {"maxRestarts": policy.backoff_limit, "restartStrategy": "Recreate"},
        "suspend": is_suspended(job.spec),
    }
    if policy.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": workload_metadata(job, name), "spec": spec}


def _true(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def jobs_status_state(kind: str, obj: dict[str, Any], jobs_status: list[dict[str, Any]], *, done: str, queue_name: Optional[str]) -> WorkloadState:
    """Phase of a JobSet or TrainJob from its conditions (`done`: the success condition's type)
    and its per-replicated-job counts (both APIs report ready/active/succeeded/failed per job)."""
    conds = _true(obj)
    name = obj["metadata"]["name"]
    if done in conds:
        return WorkloadState("Succeeded", "TrainingComplete", "the trainer finished; the summary is in status.result", True)
    if "Failed" in conds:
        cond = conds["Failed"]
        detail = cond.get("message") or f"the {kind} failed"
        return WorkloadState("Failed", cond.get("reason") or f"{kind}Failed", f"{detail}; `kubectl describe {kind.lower()} {name}` says more", True)
    counts = {key: sum(int(entry.get(key) or 0) for entry in jobs_status) for key in ("active", "ready", "succeeded", "failed")}
    started = any(counts.values()) or bool((obj.get("status") or {}).get("restarts"))
    if "Suspended" in conds or (obj.get("spec") or {}).get("suspend"):
        if queue_name and not started:
            return WorkloadState("Queued", "WaitingForAdmission", f"waiting for Kueue to admit the job from queue {queue_name}")
        return WorkloadState("Suspended", "Suspended", "spec.suspend is true; set it to false to resume", started)
    if counts["active"]:
        return WorkloadState("Running", "PodsRunning", f"the {kind} is running ({counts['active']} pod(s) active)", True)
    return WorkloadState("Pending", "WaitingForPods", f"the {kind}'s pods are being scheduled", started)


def jobset_state(obj: dict[str, Any], *, queue_name: Optional[str]) -> WorkloadState:
    return jobs_status_state(KIND, obj, (obj.get("status") or {}).get("replicatedJobsStatus") or [], done="Completed", queue_name=queue_name)


def jobset_restarts(obj: dict[str, Any]) -> int:
    """How often the JobSet recreated its group after a failure (status.restarts)."""
    return int((obj.get("status") or {}).get("restarts") or 0)


def owns_pod(obj: dict[str, Any], pod: dict[str, Any]) -> bool:
    """A pod of this JobSet: the controller labels its pods with the JobSet's uid."""
    uid = (obj.get("metadata") or {}).get("uid")
    return bool(uid) and ((pod.get("metadata") or {}).get("labels") or {}).get(JOBSET_UID_LABEL) == uid
