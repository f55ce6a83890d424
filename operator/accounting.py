"""Restarts, resume and GPU time of a FineTuneJob, from its workload and pods. Pure functions.

- status.restarts: how often the workload restarted the trainer after a failure, per backend:
  a JobSet's status.restarts; a TrainJob's pods' restart-attempt label (its JobSet's count); a
  Job's or PyTorchJob's failed pods that were replaced (the final failure of a failed workload
  is not a restart).
- status.resumedFromStep: when restarts goes up, the newest checkpoint step seen before (the one
  `resume: auto` loads); 0 when the output is an emptyDir, which the restart loses.
- status.gpuSeconds / gpuHours: the pods' running time x their GPUs, accumulated at each sync
  over the interval since the last one (status.gpuAccountedAt), so pods that a restart deletes
  keep counting for the time they ran.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from kubetune.operator.backends import jobset as jobset_backend
from kubetune.operator.backends import trainjob as trainjob_backend
from kubetune.operator.status import now_iso, parse_time

GPU_RESOURCE = "nvidia.com/gpu"
EPHEMERAL_CONDITION = "OutputPersistent"


def restarts(kind: str, workload: dict[str, Any], pods: list[dict[str, Any]], *, failed: bool) -> int:
    status = workload.get("status") or {}
    if kind == jobset_backend.KIND:
        return jobset_backend.jobset_restarts(workload)
    if kind == trainjob_backend.KIND:
        return trainjob_backend.trainjob_restarts(pods)
    if kind == "Job":
        failures = int(status.get("failed") or 0)
    else:  # PyTorchJob: failed pods per replica type
        failures = sum(int(r.get("failed") or 0) for r in (status.get("replicaStatuses") or {}).values())
    return max(failures - 1, 0) if failed else failures


def pod_gpus(pod: dict[str, Any]) -> int:
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(GPU_RESOURCE) or (resources.get("requests") or {}).get(GPU_RESOURCE)
        if value is not None:
            total += int(str(value))
    return total


def _running_interval(pod: dict[str, Any], now: dt.datetime) -> Optional[tuple[dt.datetime, dt.datetime]]:
    """When the pod's containers ran: the earliest start to the latest finish (now while running)."""
    starts, ends = [], []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        if state.get("running"):
            starts.append(parse_time(state["running"].get("startedAt")))
            ends.append(now)
        elif state.get("terminated"):
            starts.append(parse_time(state["terminated"].get("startedAt")))
            ends.append(parse_time(state["terminated"].get("finishedAt")) or now)
    starts = [s for s in starts if s is not None]
    if not starts:
        return None
    return min(starts), max(e for e in ends if e is not None)


def gpu_seconds_between(pods: list[dict[str, Any]], since: Optional[dt.datetime], now: dt.datetime) -> float:
    """GPU-seconds the pods ran in (since, now]; since=None: from their start."""
    total = 0.0
    for pod in pods:
        gpus = pod_gpus(pod)
        interval = _running_interval(pod, now) if gpus else None
        if interval is None:
            continue
        start, end = interval
        if since is not None:
            start = max(start, since)
        total += max((min(end, now) - start).total_seconds(), 0.0) * gpus
    return total


def accounting(
    old: dict[str, Any],
    kind: str,
    workload: dict[str, Any],
    pods: list[dict[str, Any]],
    *,
    phase: str,
    output_ephemeral: bool,
    now: dt.datetime,
) -> dict[str, Any]:
    """Status changes for restarts, resumedFromStep and GPU time (only keys that changed)."""
    new: dict[str, Any] = {}
    count = restarts(kind, workload, pods, failed=phase == "Failed")
    if count > int(old.get("restarts") or 0):
        new["restarts"] = count
        checkpoint = (old.get("progress") or {}).get("lastCheckpointStep")
        new["resumedFromStep"] = 0 if output_ephemeral else int(checkpoint or 0)
    now = now.replace(microsecond=0)  # gpuAccountedAt has whole seconds: the intervals must tile exactly
    since = parse_time(old.get("gpuAccountedAt"))
    added = gpu_seconds_between(pods, since, now)
    if added > 0 or (old.get("gpuSeconds") is None and pods):
        total = round(float(old.get("gpuSeconds") or 0.0) + added, 1)
        new["gpuSeconds"] = total
        new["gpuHours"] = round(total / 3600.0, 2)
        new["gpuAccountedAt"] = now_iso(now)
    return {key: value for key, value in new.items() if old.get(key) != value or key in ("restarts", "resumedFromStep")}


def ephemeral_output_condition() -> tuple[str, bool, str, str]:
    """(type, status, reason, message) of the warning a job with an emptyDir output gets."""
    return (
        EPHEMERAL_CONDITION,
        False,
        "EmptyDirOutput",
        "spec.output.source is not set: checkpoints go to an emptyDir, lost when a pod is restarted (training "
        "then starts again from step 0) and when the job ends; set spec.output.source to pvc://CLAIM/path",
    )
