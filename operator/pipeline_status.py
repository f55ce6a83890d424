"""Status of EvalJobs and ModelDeployments from their workloads. Pure functions.

The operator (from the Kubernetes API) and the local backend (from processes) both build status
with these, so `kubectl get evj|mdep` and `kubetune get evj|mdep` say the same things.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional

from kubetune.operator.status import WorkloadState, job_state, set_condition

EVAL_CONTAINER = "eval"
BASELINE_CONTAINER = "baseline"


# ---------------------------------------------------------------------------------------------
# EvalJob


def summary_line(message: Optional[str]) -> Optional[dict[str, Any]]:
    """The eval recipe's one-line JSON summary (the last JSON line: FallbackToLogsOnError may add logs)."""
    for line in reversed((message or "").strip().splitlines()):
        try:
            summary = json.loads(line)
        except ValueError:
            continue
        if isinstance(summary, dict):
            return summary
    return None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def eval_result(model_message: Optional[str], baseline_message: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Summaries -> status.result: metrics, and with a baseline its metrics and the differences.

    mainMetric gets the change vs the baseline appended, so `kubectl get evj` answers "did
    fine-tuning help?" in one column: `tiny_facts/acc=0.917 (+0.667 vs baseline)`."""
    summary = summary_line(model_message)
    if summary is None:
        return None
    result: dict[str, Any] = {"metrics": dict(summary.get("metrics") or {})}
    if summary.get("mainMetric"):
        result["mainMetric"] = summary["mainMetric"]
    base = summary_line(baseline_message)
    if base is not None:
        result["baseline"] = dict(base.get("metrics") or {})
        if base.get("mainMetric"):
            result["baselineMainMetric"] = base["mainMetric"]
        delta = {}
        for key, value in result["metrics"].items():
            tuned, before = _number(value), _number(result["baseline"].get(key))
            if tuned is not None and before is not None:
                delta[key] = round(tuned - before, 6)
        result["delta"] = delta
        main_key = (result.get("mainMetric") or "").partition("=")[0]
        if main_key in delta:
            result["mainMetric"] += f" ({delta[main_key]:+.4g} vs baseline)"
    return result


def container_message(pod: dict[str, Any], name: str) -> Optional[str]:
    """The termination message of container (or init container) `name`."""
    status = pod.get("status") or {}
    for cs in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
        if cs.get("name") != name:
            continue
        terminated = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
        if terminated.get("message"):
            return terminated["message"]
    return None


def newest(pods: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    pods = sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    return pods[-1] if pods else None


def eval_state(job: dict[str, Any], *, name: str, queue_name: Optional[str]) -> WorkloadState:
    """The eval Job -> phase, reason and a message about the eval (not the trainer)."""
    state = job_state(job, name=name, queue_name=queue_name)
    logs = f"`kubectl logs -l kubetune.dev/evaljob={name} --all-containers --tail=50` shows its last words"
    if state.phase == "Succeeded":
        return WorkloadState("Succeeded", "EvalComplete", "the eval finished; the metrics are in status.result", True)
    if state.phase == "Failed" and state.reason != "DeadlineExceeded":
        detail = state.message.split(";")[0]
        return WorkloadState("Failed", state.reason, f"{detail}; {logs}", True)
    if state.phase == "Running":
        return WorkloadState("Running", "PodsRunning", "the eval pod is running", True)
    if state.phase == "Pending" and "trainer" in state.message:
        return WorkloadState("Pending", state.reason, "the eval pod is being scheduled", state.started)
    return state


def model_ready(conditions: list[dict[str, Any]], ready: bool, reason: str, message: str, *, now: str, generation: Optional[int]) -> list[dict[str, Any]]:
    return set_condition(conditions, "ModelReady", ready, reason, message, now=now, generation=generation)


# ---------------------------------------------------------------------------------------------
# ModelDeployment


def deployment_state(deployment: Optional[dict[str, Any]], desired: int) -> tuple[str, int, dict[str, dict[str, Any]]]:
    """(phase, ready replicas, the Deployment's conditions by type) of a server Deployment."""
    if deployment is None:
        return "Pending", 0, {}
    status = deployment.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    progressing = conds.get("Progressing") or {}
    if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return "Failed", ready, conds
    if status.get("observedGeneration") is not None and status["observedGeneration"] < int((deployment.get("metadata") or {}).get("generation") or 0):
        return "Progressing", ready, conds  # the controller has not seen the newest spec yet
    available = (conds.get("Available") or {}).get("status") == "True"
    if ready >= desired and updated >= desired and (available or desired == 0):
        return "Ready", ready, conds
    return "Progressing", ready, conds


def mirror_conditions(
    conditions: list[dict[str, Any]], deployment_conditions: dict[str, dict[str, Any]], *, now: str, generation: Optional[int]
) -> list[dict[str, Any]]:
    """Available and Progressing, as the Deployment reports them (Unknown-free: False until reported)."""
    out = conditions
    for type_ in ("Available", "Progressing"):
        cond = deployment_conditions.get(type_)
        if cond is None:
            out = set_condition(out, type_, False, "NoDeployment" if not deployment_conditions else "NotReported",
                                "the server Deployment has not reported it yet", now=now, generation=generation)
        else:
            out = set_condition(out, type_, cond.get("status") == "True", cond.get("reason") or type_,
                                cond.get("message") or "", now=now, generation=generation)
    return out
