"""References between the three kinds, as pure functions the operator and the local backend share.

Each kind names either a model (spec.model) or a FineTuneJob whose output it uses
(spec.fineTuneJob); a ModelDeployment's promotion gate names an EvalJob. Here:

- `finetune_wait(name, ftj, seen_uid)`: whether the referenced FineTuneJob is usable, or why not
  (ModelReady=False with reason WaitingForFineTuneJob / FineTuneJobFailed / FineTuneJobNotFound);
- `finetune_output(ftj)`: what it wrote (its full model, or its adapter on top of its base model);
- `finetune_start_model(name, ftj)`: the full model another FineTuneJob starts from (spec.fineTuneJob);
  `pvc_source_of(...)`: that path, which the referenced job's pod saw, as a pvc:// source;
- `promotion_metric_error(promotion, evj)` and `promotion_verdict(...)`: the promotion gate;
- `dependency_order(objects)`: each object after those it references (a FineTuneJob after the one
  it starts from), refusing cycles.

Messages are the same on a cluster and locally, so both refuse the same things the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from kubetune.errors import KubetuneError

# Metrics each local task type reports (docs/architecture.md, Evaluation); lm-eval tasks report
# their own, which only the run itself knows.
LOCAL_TASK_METRICS = {
    "perplexity": ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"),
    "multiple_choice": ("acc", "acc_norm"),
}


class PipelineReferenceError(KubetuneError):
    """A reference that cannot be satisfied (missing object, unknown metric, a cycle)."""


@dataclass(frozen=True)
class Wait:
    """Why the referenced FineTuneJob cannot be used yet (phase Pending) or at all (phase Failed)."""

    phase: str  # Pending | Failed
    reason: str
    message: str


def finetune_wait(name: str, ftj: Optional[dict[str, Any]], seen_uid: Optional[str]) -> Optional[Wait]:
    """None when FineTuneJob `name` succeeded and wrote a model or an adapter; else why not.

    `seen_uid`: the uid recorded when it was first seen. A FineTuneJob that is gone (or replaced by
    another of the same name) after it was seen fails the dependent; one never seen is waited for,
    since `kubectl apply -f folder/` may create the dependent first."""
    if ftj is None:
        if seen_uid:
            return Wait("Failed", "FineTuneJobNotFound", f"FineTuneJob {name} was deleted; re-create it, then this resource")
        return Wait(
            "Pending", "FineTuneJobNotFound",
            f"FineTuneJob {name} does not exist (yet); create it or fix spec.fineTuneJob.name",
        )
    uid = (ftj.get("metadata") or {}).get("uid")
    if seen_uid and uid and uid != seen_uid:
        return Wait("Failed", "FineTuneJobNotFound", f"FineTuneJob {name} was deleted and re-created; re-create this resource to use the new run")
    status = ftj.get("status") or {}
    phase = status.get("phase")
    if phase == "Failed":
        failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed" and c.get("status") == "True"), {})
        detail = failed.get("message") or failed.get("reason") or "see its conditions"
        return Wait("Failed", "FineTuneJobFailed", f"FineTuneJob {name} failed: {detail}")
    if phase != "Succeeded":
        return Wait("Pending", "WaitingForFineTuneJob", f"waiting for FineTuneJob {name} to succeed (phase {phase or 'Pending'})")
    model, adapter = finetune_output(ftj)
    if model is None and adapter is None:
        return Wait("Failed", "FineTuneJobOutputMissing", f"FineTuneJob {name} succeeded but its status.result names no model or adapter")
    return None


def finetune_output(ftj: dict[str, Any]) -> tuple[Optional[str], Optional[str]]:
    """(full model folder, None) or (None, adapter folder): what the trainer's summary says it wrote.

    A LoRA run that also saved a merged model reports both; the adapter wins (it is what the
    job trained, it is small, and servers load it by name on the shared base)."""
    result = (ftj.get("status") or {}).get("result") or {}
    if result.get("adapter"):
        return None, result["adapter"]
    if result.get("checkpoint"):
        return result["checkpoint"], None
    return None, None


def finetune_start_model(name: str, ftj: dict[str, Any]) -> str:
    """The full model FineTuneJob `name` wrote, as its trainer named it: a full fine-tune's model,
    or a LoRA run's merged model (save_merged). A FineTuneJob starts from a whole model, so an
    adapter alone is refused, saying how to get one."""
    result = (ftj.get("status") or {}).get("result") or {}
    checkpoint, adapter = result.get("checkpoint"), result.get("adapter")
    if checkpoint and checkpoint != adapter:  # a LoRA run without save_merged reports its adapter as both
        return checkpoint
    raise PipelineReferenceError(
        f"spec.fineTuneJob: FineTuneJob {name} wrote only a LoRA adapter ({adapter or 'no model'}); a FineTuneJob "
        f"starts from a whole model: give FineTuneJob {name} spec.config.save_merged: true and run it again"
    )


def pvc_source_of(name: str, ftj: dict[str, Any], path: str) -> str:
    """`path`, as the pods of FineTuneJob `name` saw it under their output volume, as a
    pvc://CLAIM/... source another pod can mount (read-only)."""
    from kubetune.operator.sources import map_cluster_source

    output = ((ftj.get("spec") or {}).get("output") or {}).get("source")
    if not output:
        raise PipelineReferenceError(
            f"spec.fineTuneJob: FineTuneJob {name} wrote its output to an emptyDir (it has no spec.output.source), "
            "which went away with its pod; give it spec.output.source: pvc://CLAIM/path and run it again"
        )
    mounted = map_cluster_source(output, "output", f"spec.output.source of FineTuneJob {name}", read_only=False).path
    if path != mounted and not path.startswith(mounted + "/"):
        raise PipelineReferenceError(f"spec.fineTuneJob: FineTuneJob {name} reports {path}, which is outside its output {output}")
    return output.rstrip("/") + path[len(mounted):]


def finetune_identity(name: str, uid: Optional[str]) -> str:
    return f"finetunejob/{name}" + (f"@{uid}" if uid else "")


def source_identity(model: str, adapter: Optional[str] = None) -> str:
    return model + (f"+{adapter}" if adapter else "")


# ---------------------------------------------------------------------------------------------
# The promotion gate


def task_metrics(task: Any) -> Optional[tuple[str, ...]]:
    """Metric names a local task reports; None for lm-eval tasks (strings: only the run knows)."""
    if isinstance(task, str):
        return None
    if task.type == "generate":
        match = (task.options or {}).get("match", "exact")
        return (f"{match}_match",)
    return LOCAL_TASK_METRICS.get(task.type)


def promotion_metric_error(promotion: Any, evj: Any) -> Optional[str]:
    """Why `promotion.metric` can never appear in that EvalJob's results; None if it can."""
    task_name, _, metric = promotion.metric.partition("/")
    tasks = {t if isinstance(t, str) else t.name: t for t in evj.spec.tasks}
    if task_name not in tasks:
        return (
            f"spec.promotion.metric: EvalJob {evj.metadata.name} has no task '{task_name}' "
            f"(its tasks: {', '.join(tasks)}); use task/metric with one of them"
        )
    known = task_metrics(tasks[task_name])
    if known is not None and metric not in known:
        return (
            f"spec.promotion.metric: task '{task_name}' of EvalJob {evj.metadata.name} reports "
            f"{', '.join(known)}, not '{metric}'"
        )
    return None


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    reason: str
    message: str
    value: Optional[float] = None


def promotion_verdict(promotion: Any, evj: Optional[dict[str, Any]], model_id: str) -> Verdict:
    """Whether the model `model_id` may roll out: the EvalJob evaluated that very model, succeeded,
    and its metric is past the threshold. The message says why not, with the measured value."""
    name, metric = promotion.eval_job, promotion.metric
    if evj is None:
        return Verdict(False, "EvalJobNotFound", f"EvalJob {name} does not exist (yet); create it or fix spec.promotion.evalJob")
    status = evj.get("status") or {}
    phase = status.get("phase")
    if phase == "Failed":
        return Verdict(False, "EvalJobFailed", f"EvalJob {name} failed; the new model is not promoted")
    if phase != "Succeeded":
        return Verdict(False, "WaitingForEvalJob", f"waiting for EvalJob {name} to succeed (phase {phase or 'Pending'})")
    if status.get("modelId") != model_id:
        return Verdict(
            False, "EvalJobModelMismatch",
            f"EvalJob {name} evaluated {status.get('model') or 'another model'}, not the model to roll out; "
            "point it at the same model (or FineTuneJob)",
        )
    metrics = (status.get("result") or {}).get("metrics") or {}
    value = metrics.get(metric)
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return Verdict(False, "MetricNotFound", f"EvalJob {name} reported no {metric} (it has: {', '.join(sorted(metrics)) or 'none'})")
    value = float(value)
    if promotion.min is not None:
        passed, rule = value >= promotion.min, f">= min {promotion.min:g}"
    else:
        passed, rule = value <= promotion.max, f"<= max {promotion.max:g}"
    if passed:
        return Verdict(True, "MetricPassed", f"{metric} = {value:g} {rule} (EvalJob {name})", value)
    return Verdict(False, "MetricBelowThreshold", f"{metric} = {value:g}, not {rule} (EvalJob {name}); the previous model keeps serving", value)


# ---------------------------------------------------------------------------------------------
# Dependency order


def references_of(obj: Any) -> list[tuple[str, str]]:
    """(kind, name) of what an object waits for (any kind's spec.fineTuneJob, a promotion's EvalJob)."""
    refs: list[tuple[str, str]] = []
    spec = obj.spec
    if getattr(spec, "fine_tune_job", None) is not None:
        refs.append(("FineTuneJob", spec.fine_tune_job.name))
    if getattr(spec, "promotion", None) is not None:
        refs.append(("EvalJob", spec.promotion.eval_job))
    return refs


def dependency_order(objects: Sequence[Any]) -> list[Any]:
    """The objects with each one after those it references (stable otherwise); a cycle is refused."""
    by_key = {(o.kind, o.metadata.name): o for o in objects}
    done: list[Any] = []
    state: dict[tuple[str, str], str] = {}

    def visit(key: tuple[str, str], path: list[tuple[str, str]]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            cycle = " -> ".join(f"{k}/{n}" for k, n in [*path[path.index(key):], key])
            raise PipelineReferenceError(f"the manifests reference each other in a cycle: {cycle}")
        state[key] = "visiting"
        for ref in references_of(by_key[key]):
            if ref in by_key:
                visit(ref, [*path, key])
        state[key] = "done"
        done.append(by_key[key])

    for obj in objects:
        visit((obj.kind, obj.metadata.name), [])
    return done
