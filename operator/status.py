"""Status of a FineTuneJob from its workload, its pods and rank 0's metrics. Pure functions.

The operator (from the Kubernetes API) and the local backend (from a subprocess) both build
`status` with these, so `kubectl get ftj` and `kubetune get` say the same things.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families

from kubetune.operator.api import API_VERSION
from kubetune.operator.planner import COMPLETION_INDEX, PYTORCHJOB_REPLICA_TYPE
from kubetune.operator.scrape import pod_metrics_url

# Stalled (kstatus' abnormal-true convention, as Flux and cli-utils read it): True while the pods
# cannot make progress for a reason someone must fix (unschedulable, quota, bad image, volumes).
CONDITION_TYPES = ("Created", "Running", "Succeeded", "Failed", "Suspended", "Stalled")

# Trainer metric name -> status.progress field (docs/architecture.md, trainer run contract).
PROGRESS_METRICS = {
    "kubetune_train_step": "step",
    "kubetune_train_total_steps": "totalSteps",
    "kubetune_train_epoch": "epoch",
    "kubetune_train_loss": "loss",
    "kubetune_train_learning_rate": "learningRate",
    "kubetune_train_tokens_per_second": "tokensPerSecond",
    "kubetune_train_last_checkpoint_step": "lastCheckpointStep",
}
_INT_FIELDS = {"step", "totalSteps", "epoch", "lastCheckpointStep"}

# Termination summary keys (camelCase already) that status.result carries as fields.
RESULT_FIELDS = ("finalLoss", "evalLoss", "steps", "checkpoint", "adapter", "tokensPerSecond")


def now_iso(now: Optional[dt.datetime] = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Optional[str]) -> Optional[dt.datetime]:
    if not value:
        return None
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class WorkloadState:
    phase: str
    reason: str
    message: str
    started: bool = False  # pods have run at some point (for startTime)
    stalled: bool = False  # the pods cannot progress until someone fixes what the message says


# ---------------------------------------------------------------------------------------------
# Phase


def _true_conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def job_state(job: dict[str, Any], *, name: str, queue_name: Optional[str]) -> WorkloadState:
    """A batch/v1 Job -> phase, reason and a message a human can act on."""
    status = job.get("status") or {}
    conds = _true_conditions(job)
    logs = f"`kubectl logs -l kubetune.dev/job={name} --tail=50` shows the trainer's last words"
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        return WorkloadState("Succeeded", "TrainingComplete", "the trainer finished; the summary is in status.result", True)
    if "Failed" in conds or "FailureTarget" in conds:
        cond = conds.get("Failed") or conds["FailureTarget"]
        reason = cond.get("reason") or "JobFailed"
        detail = cond.get("message") or "the trainer pods failed"
        if reason == "DeadlineExceeded":
            hint = "raise spec.runPolicy.activeDeadlineSeconds or lower the step count"
        else:
            hint = logs
        return WorkloadState("Failed", reason, f"{detail}; {hint}", True)
    started = bool(status.get("startTime") or status.get("active") or status.get("succeeded") or status.get("failed"))
    if (job.get("spec") or {}).get("suspend"):
        if queue_name and not started:
            return WorkloadState("Queued", "WaitingForAdmission", f"waiting for Kueue to admit the job from queue {queue_name}")
        return WorkloadState("Suspended", "Suspended", "spec.suspend is true; set it to false to resume", started)
    if status.get("active"):
        return WorkloadState("Running", "PodsRunning", f"{status['active']} trainer pod(s) running", True)
    return WorkloadState("Pending", "WaitingForPods", "the trainer pods are being scheduled", started)


def pytorchjob_state(ptj: dict[str, Any], *, name: str, queue_name: Optional[str]) -> WorkloadState:
    conds = _true_conditions(ptj)
    if "Succeeded" in conds:
        return WorkloadState("Succeeded", "TrainingComplete", "the trainer finished; the summary is in status.result", True)
    if "Failed" in conds:
        detail = conds["Failed"].get("message") or "the PyTorchJob failed"
        return WorkloadState("Failed", conds["Failed"].get("reason") or "PyTorchJobFailed", f"{detail}; `kubectl describe pytorchjob {name}` says more", True)
    if "Suspended" in conds or ((ptj.get("spec") or {}).get("runPolicy") or {}).get("suspend"):
        started = "Running" in conds or bool((ptj.get("status") or {}).get("startTime"))
        if queue_name and not started:
            return WorkloadState("Queued", "WaitingForAdmission", f"waiting for Kueue to admit the job from queue {queue_name}")
        return WorkloadState("Suspended", "Suspended", "spec.suspend is true; set it to false to resume", started)
    if "Running" in conds:
        return WorkloadState("Running", "PodsRunning", "the PyTorchJob is running", True)
    return WorkloadState("Pending", "WaitingForPods", "the PyTorchJob's pods are being scheduled")


def pod_problem(pods: list[dict[str, Any]], image: str) -> Optional[WorkloadState]:
    """Pods stuck for a reason the user must fix (bad image, missing secret, unschedulable)."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason", "")
            if reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
                return WorkloadState("Pending", reason, f"cannot pull the trainer image {image}: check spec.image and pull secrets", stalled=True)
            if reason == "CreateContainerConfigError":
                return WorkloadState(
                    "Pending", reason, f"{waiting.get('message', 'bad container config')}: check the Secrets in spec.secrets / spec.env", stalled=True
                )
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                name = (pod.get("metadata") or {}).get("name", "a trainer pod")
                message = cond.get("message") or "no node fits"
                return WorkloadState("Pending", "Unschedulable", f"pod {name} cannot be scheduled: {message}; {_scheduling_fix(message)}", stalled=True)
    return None


def _rank_of(pod: dict[str, Any]) -> str:
    """The pod's rank as a user names it: the Job's completion index, or the PyTorchJob replica."""
    meta = pod.get("metadata") or {}
    found = {**(meta.get("labels") or {}), **(meta.get("annotations") or {})}
    if COMPLETION_INDEX in found:
        return f"rank {found[COMPLETION_INDEX]}"
    replica, index = found.get(PYTORCHJOB_REPLICA_TYPE), found.get("training.kubeflow.org/replica-index")
    if replica:
        return f"{replica} {index}" if index is not None else replica
    return "a trainer pod"


def pod_failure(pods: list[dict[str, Any]]) -> Optional[WorkloadState]:
    """Why the trainer failed, from its pods' terminated containers: the first failure (the
    others are usually collateral: torchrun stops the ranks left when one dies). An OOM kill
    (exit 137, reason OOMKilled) says how to use less memory; any other exit names the rank,
    the exit code and where its last words are. None when no container failed."""
    failures = []
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "a trainer pod")
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in ((cs.get("state") or {}).get("terminated"), (cs.get("lastState") or {}).get("terminated")):
                if state and state.get("exitCode") not in (None, 0):
                    oom = state.get("reason") == "OOMKilled"
                    failures.append((state.get("finishedAt") or "", not oom, name, _rank_of(pod), cs.get("name", "trainer"), state))
    if not failures:
        return None
    _, _, name, rank, container, state = min(failures, key=lambda f: f[:2])
    code, why = state.get("exitCode"), state.get("reason") or "Error"
    if why == "OOMKilled":
        return WorkloadState(
            "Failed", "OOMKilled",
            f"{rank} (pod {name}, container {container}) was killed for using more memory than its limit (exit {code}, OOMKilled): "
            "raise spec.resources.limits.memory (or the requests), or use less: lower batch_size or max_seq_len in spec.config, "
            "or set activation_checkpointing: true",
            True,
        )
    last_words = (state.get("message") or "").strip().splitlines()
    detail = f": {last_words[-1][:300]}" if last_words else ""
    return WorkloadState(
        "Failed", "RankFailed",
        f"{rank} (pod {name}, container {container}) exited with code {code} ({why}){detail}; "
        f"`kubectl logs {name} -c {container}` shows its last words",
        True,
    )


def _scheduling_fix(message: str) -> str:
    """What to do about a scheduler's 'Unschedulable' message."""
    if "Insufficient nvidia.com/gpu" in message:
        return "no node has that many free GPUs: lower spec.resources.gpusPerNode, or wait for GPUs (a Kueue queue waits for you)"
    if "Insufficient cpu" in message or "Insufficient memory" in message:
        return "no node has the cpu/memory requested: set spec.resources.requests lower (the default is per GPU)"
    if "untolerated taint" in message:
        return "the nodes are tainted: add the matching spec.tolerations (e.g. nvidia.com/gpu NoSchedule)"
    if "node affinity/selector" in message:
        return "no node matches spec.nodeSelector / spec.affinity: fix the labels"
    if "PersistentVolumeClaim" in message or "persistentvolumeclaim" in message:
        return "a volume claim is missing or unbound: check the pvc:// claims in spec.model, spec.dataset and spec.output"
    return "`kubectl describe pod` shows the scheduler's view"


def scheduling_problem(events: list[dict[str, Any]], workload_uid: Optional[str], pod_uids: set[str]) -> Optional[WorkloadState]:
    """Rejections that only events tell (the newest first): the workload's controller could not
    create pods (ResourceQuota, Pod Security, an admission webhook), or a volume cannot attach
    or mount (Multi-Attach of a ReadWriteOnce claim on two nodes)."""
    mine = [e for e in events if (e.get("involvedObject") or {}).get("uid") in ({workload_uid} | pod_uids) and e.get("type") == "Warning"]
    mine.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "", reverse=True)
    for event in mine:
        reason, message = event.get("reason", ""), event.get("message", "")
        if reason == "FailedCreate":
            if "exceeded quota" in message:
                return WorkloadState("Pending", "QuotaExceeded", f"{message}; lower spec.resources (cpu/memory default per GPU) or ask for a larger ResourceQuota", stalled=True)
            if "PodSecurity" in message:
                return WorkloadState("Pending", "PodSecurityRejected", f"{message}; the namespace's Pod Security level refuses the trainer pod: ask the platform team", stalled=True)
            return WorkloadState("Pending", "PodCreateRejected", f"{message}; an admission policy refuses the trainer pod: ask the platform team", stalled=True)
        if reason == "FailedAttachVolume" and "Multi-Attach" in message:
            return WorkloadState(
                "Pending", "VolumeMultiAttach",
                f"{message}; a ReadWriteOnce claim is in use on another node: use a ReadWriteMany claim for multi-node jobs, or wait for the other pod to end",
                stalled=True,
            )
        if reason in ("FailedMount", "FailedAttachVolume"):
            return WorkloadState("Pending", "VolumeMountFailed", f"{message}; check the pvc:// claims in spec.model, spec.dataset and spec.output", stalled=True)
    return None


def suspend_reflected(spec: Any, workload: dict[str, Any]) -> bool:
    """Whether the workload's suspend matches spec.suspend (with a Kueue queue and suspend false,
    Kueue decides, so either way is right)."""
    body = workload.get("spec") or {}
    suspended = bool(body.get("suspend") if "suspend" in body else (body.get("runPolicy") or {}).get("suspend"))
    if spec.suspend:
        return suspended
    return bool(spec.queue_name) or not suspended


def rank0_pod(pods: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Pod 0 of the indexed Job, or the Master of a PyTorchJob (the newest if retried)."""
    candidates = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        index = (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(COMPLETION_INDEX)
        replica = (meta.get("labels") or {}).get(PYTORCHJOB_REPLICA_TYPE)
        if index == "0" or replica == "master":
            candidates.append(pod)
    candidates.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    return candidates[-1] if candidates else None


def metrics_url(pod: dict[str, Any], default_port: int = 9090) -> Optional[str]:
    """The pod's own metrics endpoint (an IP literal and a valid port), or None: see scrape.pod_metrics_url."""
    return pod_metrics_url(pod, default_port)


def termination_message(pod: dict[str, Any]) -> Optional[str]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
        if terminated.get("message"):
            return terminated["message"]
    return None


# ---------------------------------------------------------------------------------------------
# Progress and result


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value} for the trainer's gauges (unlabelled samples)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in PROGRESS_METRICS or sample.name.startswith("kubetune_train_"):
                values[sample.name] = sample.value
    return values


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_from_metrics(values: dict[str, float], *, started_at: Optional[dt.datetime], now: dt.datetime) -> dict[str, Any]:
    """The trainer's gauges -> status.progress, with percent and an ETA from the mean step time."""
    progress: dict[str, Any] = {}
    for metric, field in PROGRESS_METRICS.items():
        value = values.get(metric)
        if value is None or math.isnan(value):
            continue
        progress[field] = int(value) if field in _INT_FIELDS else float(value)
    step, total = progress.get("step"), progress.get("totalSteps")
    if step is not None and total:
        progress["percent"] = round(100.0 * min(step, total) / total, 1)
        if started_at is not None and step > 0:
            per_step = (now - started_at).total_seconds() / step
            progress["eta"] = format_duration(per_step * max(total - step, 0))
    progress["updatedAt"] = now_iso(now)
    return progress


def final_progress(progress: Optional[dict[str, Any]], result: dict[str, Any]) -> dict[str, Any]:
    """The progress of a finished run: the last scrape may predate the last step, the summary does not."""
    final = {**(progress or {}), "percent": 100.0, "eta": "0s"}
    if result.get("steps") is not None:
        final["step"] = result["steps"]
        final.setdefault("totalSteps", result["steps"])
    if result.get("finalLoss") is not None:
        final["loss"] = result["finalLoss"]
    return final


def parse_result(message: Optional[str]) -> Optional[dict[str, Any]]:
    """The trainer's one-line JSON summary -> status.result (other keys under result.metrics)."""
    if not message:
        return None
    for line in reversed(message.strip().splitlines()):  # FallbackToLogsOnError may add log lines
        try:
            summary = json.loads(line)
        except ValueError:
            continue
        if isinstance(summary, dict):
            result = {key: summary[key] for key in RESULT_FIELDS if summary.get(key) is not None}
            extra = {key: value for key, value in summary.items() if key not in RESULT_FIELDS}
            if extra:
                result["metrics"] = extra
            return result
    return None


# ---------------------------------------------------------------------------------------------
# Conditions


def set_condition(
    conditions: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str, *, now: str, generation: Optional[int]
) -> list[dict[str, Any]]:
    """A new list with `type_` set; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    out, found = [], False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(cond)
            continue
        found = True
        transition = cond.get("lastTransitionTime") if cond.get("status") == value else now
        out.append({**cond, "status": value, "reason": reason, "message": message, "lastTransitionTime": transition, "observedGeneration": generation})
    if not found:
        out.append({"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": now, "observedGeneration": generation})
    return out


def conditions_for(
    conditions: list[dict[str, Any]], state: WorkloadState, *, now: str, generation: Optional[int], created: bool = True
) -> list[dict[str, Any]]:
    """All five condition types, consistent with the phase (the Kubernetes API conventions)."""
    phase = state.phase
    out = set_condition(
        conditions, "Created", created, "ChildrenCreated" if created else state.reason,
        "the trainer config and its workload were created" if created else state.message, now=now, generation=generation,
    )
    for type_, is_true in (
        ("Running", phase == "Running"),
        ("Succeeded", phase == "Succeeded"),
        ("Failed", phase == "Failed"),
        ("Suspended", phase in ("Suspended", "Queued")),
        ("Stalled", state.stalled),
    ):
        reason, message = (state.reason, state.message) if is_true else (f"Not{type_}", f"phase is {phase}")
        out = set_condition(out, type_, is_true, reason, message, now=now, generation=generation)
    return out


# ---------------------------------------------------------------------------------------------
# One sync step


def next_status(
    old: dict[str, Any],
    current: WorkloadState,
    rank0: Optional[dict[str, Any]],
    metrics_text: Optional[str],
    *,
    generation: Optional[int],
    now: dt.datetime,
) -> tuple[dict[str, Any], Optional[tuple[str, str, str]]]:
    """(status changes to patch, an event (type, reason, message) or None) for one sync."""
    stamp = now_iso(now)
    new: dict[str, Any] = {"phase": current.phase}
    if old.get("observedGeneration") != generation:
        new["observedGeneration"] = generation
    if current.started and not old.get("startTime"):
        new["startTime"] = stamp
    if metrics_text:
        started_at = parse_time(old.get("startTime") or new.get("startTime"))
        progress = progress_from_metrics(parse_metrics(metrics_text), started_at=started_at, now=now)
        if progress.get("step") is not None:
            new["progress"] = progress
    if current.phase in ("Succeeded", "Failed"):
        new["completionTime"] = old.get("completionTime") or stamp
        result = parse_result(termination_message(rank0)) if rank0 is not None else None
        if result:
            new["result"] = result
            if current.phase == "Succeeded":
                new["progress"] = final_progress(old.get("progress"), result)
    conditions = conditions_for(old.get("conditions") or [], current, now=stamp, generation=generation)
    if [_without_time(c) for c in conditions] != [_without_time(c) for c in old.get("conditions") or []]:
        new["conditions"] = conditions
    changes = {key: value for key, value in new.items() if old.get(key) != value}
    event = None
    if current.phase != old.get("phase"):
        message = f"phase {old.get('phase') or '-'} -> {current.phase}: {current.message}"
        event = ("Warning", current.reason, message) if current.phase in ("Failed",) or current.stalled else ("Normal", current.phase, message)
    elif current.stalled and _reason_of(old.get("conditions") or [], "Stalled") != current.reason:
        event = ("Warning", current.reason, current.message)
    return changes, event


def spec_applied_conditions(
    conditions: list[dict[str, Any]], applied: bool, *, generation: Optional[int], current_generation: Optional[int], now: str
) -> tuple[list[dict[str, Any]], Optional[tuple[str, str, str]]]:
    """The SpecApplied condition: False (with a Warning event) while the spec differs from the
    one the workload was planned from; back to True once it matches again. Absent until then."""
    existing = next((c for c in conditions if c.get("type") == "SpecApplied"), None)
    if applied:
        if existing is None or existing.get("status") == "True":
            return conditions, None
        return set_condition(conditions, "SpecApplied", True, "SpecMatches", "the spec is the one the workload runs", now=now, generation=generation), None
    message = (
        f"the spec changed after the run was created (generation {current_generation}); only spec.suspend is applied to a "
        f"running job: revert the change or create a new FineTuneJob (status reflects generation {generation})"
    )
    new = set_condition(conditions, "SpecApplied", False, "SpecChangeIgnored", message, now=now, generation=generation)
    event = ("Warning", "SpecChangeIgnored", message) if existing is None or existing.get("status") != "False" else None
    return new, event


def _reason_of(conditions: list[dict[str, Any]], type_: str) -> Optional[str]:
    return next((c.get("reason") for c in conditions if c.get("type") == type_ and c.get("status") == "True"), None)


def _without_time(cond: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cond.items() if k != "lastTransitionTime"}


def make_event(body: dict[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event about one of our objects (what `kubectl describe` lists)."""
    meta = body["metadata"]
    now = now_iso()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name'][:200]}.{time.time_ns():x}", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": API_VERSION, "kind": body.get("kind"), "name": meta["name"],
            "namespace": meta.get("namespace"), "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "kubetune-operator"},
        "reportingComponent": "kubetune-operator",
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
