"""The EvalJob and ModelDeployment reconcilers: level-triggered, one loop, small steps.

Both depend on other objects (the FineTuneJob they name, the EvalJob of a promotion gate, their
own Job or Deployment), so instead of one-shot create handlers each resource is reconciled every
`sync_interval` from its latest body (kept by a watch) and the current state of what it
references, like a controller-runtime reconciler:

EvalJob: referenced FineTuneJob usable? (else ModelReady=False: WaitingForFineTuneJob, or Failed:
FineTuneJobFailed / FineTuneJobNotFound) -> plan -> create-or-adopt (owner uid only) the ConfigMap
and Job once, recording the Job's uid -> the Job's and pod's state into phase and conditions ->
the termination messages into status.result. A finished EvalJob is never re-run; a Job deleted
under a running EvalJob fails it (WorkloadMissing) rather than silently running it again.

ModelDeployment: model usable? -> plan -> a new model (identity differs from the one rolled
out) passes the promotion gate, else the Deployment is left alone (the old model keeps serving)
and Promoted=False says why with the measured value -> create or merge-patch the Deployment
(rolling update, maxUnavailable 0) -> Available/Progressing mirrored, readyReplicas, ready, url.

No finalizers: deleting either resource never waits for the operator; children go with their
owner (ownerReferences).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, Iterable, Optional

import kopf

from kubetune.errors import KubetuneError
from kubetune.operator.api import API_VERSION, GROUP, VERSION, describe, parse_object
from kubetune.operator.api.common import TERMINAL_PHASES
from kubetune.operator.deployplanner import (
    MODEL_ID_ANNOTATION,
    SPEC_HASH_ANNOTATION,
    check_spec,
    plan_deployment,
    selector,
    served_models,
    service_url,
)
from kubetune.operator.evalplanner import (
    BASELINE_CONTAINER,
    EVAL_CONTAINER,
    EVAL_LABEL,
    RESULTS_DIR,
    cluster_task_source,
    eval_configs,
    plan_eval,
    task_configs,
)
from kubetune.operator.inputs import ModelInputs, cluster_inputs
from kubetune.operator.initializers import initializer_failure
from kubetune.operator.kube import ApiError, KubeClient
from kubetune.operator.pipeline_status import (
    container_message,
    deployment_state,
    eval_result,
    eval_state,
    mirror_conditions,
    model_ready,
    newest,
)
from kubetune.operator.planner import base_name, child_names
from kubetune.operator.references import Verdict, Wait, finetune_wait, promotion_metric_error, promotion_verdict
from kubetune.operator.sources import MappedSource
from kubetune.operator.status import WorkloadState, conditions_for, make_event, now_iso, set_condition
from kubetune.operator.tenancy import TenancyCheck

EVJ = (GROUP, VERSION, "evaljobs")
MDEP = (GROUP, VERSION, "modeldeployments")
EVAL_ADMISSION_ID = "validate-evaljob"  # the webhook URL paths (the Helm chart's /validate-<singular>)
DEPLOYMENT_ADMISSION_ID = "validate-modeldeployment"
log = logging.getLogger("kubetune.operator.pipeline")


class ChildConflict(KubetuneError):
    """A child's name is taken by an object this resource does not own."""


async def ensure_owned(kube: KubeClient, child: dict[str, Any], owner_uid: str) -> dict[str, Any]:
    """Create the child, or take the existing one only if it names this owner's uid: never a
    duplicate, never someone else's object. Returns the object as the API has it."""
    meta = child["metadata"]
    try:
        return await kube.create(child)
    except ApiError as err:
        if err.status != 409:
            raise
    existing = await kube.get(child["apiVersion"], child["kind"], meta.get("namespace"), meta["name"])
    if existing is None:  # deleted between our create and get: next round
        raise ApiError(409, "Conflict", f"{child['kind']} {meta['name']} is being deleted")
    if owned_by(existing, owner_uid):
        return existing
    raise ChildConflict(
        f"{child['kind']} {meta['name']} already exists and does not belong to this resource; "
        "delete it or give this resource another name"
    )


async def apply_owned(kube: KubeClient, child: dict[str, Any], owner_uid: str) -> dict[str, Any]:
    """ensure_owned, then bring a child that carries a spec hash (the NetworkPolicy, the
    initializer's ConfigMap) up to date when what it was made from changed."""
    existing = await ensure_owned(kube, child, owner_uid)
    want = (child["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    have = ((existing.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    if want is None or want == have:
        return existing
    meta = child["metadata"]
    body = "data" if child["kind"] == "ConfigMap" else "spec"
    patch = {"metadata": {"annotations": meta["annotations"]}, body: child[body]}
    return await kube.patch(child["apiVersion"], child["kind"], meta.get("namespace"), meta["name"], patch)


async def open_owned_policy(kube: KubeClient, ns: Optional[str], name: str, owner_uid: str) -> None:
    """spec.networkPolicy.enabled turned false: the policy this resource made (if any) admits all
    ingress to the server pods from now on. Patched, not deleted: the operator holds no delete
    right on anything (children go with their owner)."""
    existing = await kube.get("networking.k8s.io/v1", "NetworkPolicy", ns, name)
    if existing is None or not owned_by(existing, owner_uid) or (existing.get("spec") or {}).get("ingress") == [{}]:
        return
    await kube.patch("networking.k8s.io/v1", "NetworkPolicy", ns, name,
                     {"metadata": {"annotations": {SPEC_HASH_ANNOTATION: None}}, "spec": {"ingress": [{}]}})


def api_refusal(err: ApiError, what: str) -> Optional[tuple[bool, str, str]]:
    """(terminal, reason, message) for an API answer no retry will change by itself: 403 (the
    operator's RBAC: retried, since someone may grant it) and 400/422 (the object is refused:
    terminal). None for the rest (5xx, 429, 409, no answer), which are retried quietly."""
    if err.status == 403:
        return False, "Forbidden", (
            f"the API server does not let the operator {what}: {err.message}; grant it in the operator's Role or "
            "ClusterRole (docs/operator.md, RBAC); retrying")
    if err.status in (400, 422):
        return True, "ApiRefused", f"the API server refused to {what}: {err.message}; fix the spec (or the policy refusing it)"
    return None


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _without_time(conditions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions]


def status_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Only what changed (conditions compared without their timestamps)."""
    changes = {}
    for key, value in new.items():
        if key == "conditions":
            if _without_time(value) != _without_time(old.get("conditions") or []):
                changes[key] = value
        elif old.get(key) != value:
            changes[key] = value
    return changes


class PipelineReconciler:
    """Reconciles every EvalJob and ModelDeployment the watches have shown, each round."""

    def __init__(self, state: Any):
        self.state = state  # handlers.OperatorState: kube client, config, metrics
        self.bodies: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, namespace, name) -> body
        self.task: Optional[asyncio.Task] = None
        # One reconcile of a resource at a time (a round and a wake-up may both want it).
        self.locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        # Resources that wait for what they reference, with nothing of theirs to follow: skipped by
        # the rounds until this time (time.monotonic()), reconciled at once when woken (chaining.py).
        self.parked: dict[tuple[str, str, str], float] = {}

    @property
    def kube(self) -> KubeClient:
        return self.state.kube

    # -- plumbing ---------------------------------------------------------------------------

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.state.config.sync_interval)
            if self.state.connection is None or not await self.state.serving():
                continue
            await self.round()

    async def round(self) -> None:
        limit = asyncio.Semaphore(self.state.config.sync_concurrency)

        async def one(key: tuple[str, str, str]) -> None:
            async with limit:
                await self.reconcile(key)

        now = time.monotonic()
        due = [k for k, b in list(self.bodies.items())
               if not (k[0] == "EvalJob" and (b.get("status") or {}).get("phase") in TERMINAL_PHASES) and self.parked.get(k, 0.0) <= now]
        await asyncio.gather(*(one(k) for k in due))

    async def wake(self, keys: Iterable[tuple[str, Optional[str], str]]) -> None:
        """Reconcile these now: what they reference changed (chaining.py)."""
        await asyncio.gather(*(self.reconcile(key) for key in keys))

    async def reconcile(self, key: tuple[str, Any, str]) -> None:
        """One resource from its latest body, under its lock; errors are logged and retried."""
        kind = key[0]
        async with self.locks.setdefault(key, asyncio.Lock()):
            body = self.bodies.get(key)  # read under the lock: what a reconcile just before wrote
            if body is None or (kind == "EvalJob" and (body.get("status") or {}).get("phase") in TERMINAL_PHASES):
                return
            self.parked.pop(key, None)
            started = time.perf_counter()
            try:
                if kind == "EvalJob":
                    await self.reconcile_eval(body)
                else:
                    await self.reconcile_deployment(body)
            except Exception as err:  # retried next round; the operator never crashes on one object
                self.state.metrics.reconcile_errors.labels(kind=kind, handler="sync").inc()
                log.warning("reconcile of %s %s/%s failed, will retry: %s", kind, key[1], key[2], err)
            finally:
                self.state.metrics.reconcile_seconds.labels(kind=kind, handler="sync").observe(time.perf_counter() - started)

    def park(self, body: dict[str, Any]) -> None:
        """`body` waits for what it references: skip it in the rounds until its slow poll is due."""
        meta = body["metadata"]
        self.parked[(body["kind"], meta.get("namespace"), meta["name"])] = time.monotonic() + self.state.config.reference_poll

    def remember(self, kind: str, type_: Optional[str], body: Any) -> None:
        key = (kind, body["metadata"].get("namespace"), body["metadata"]["name"])
        if type_ == "DELETED":
            for memory in (self.bodies, self.locks, self.parked):
                memory.pop(key, None)
            self.state.metrics.set_phase(kind, key[1], key[2], None)
        else:
            before = self.bodies.get(key)
            self.bodies[key] = json.loads(json.dumps({k: body[k] for k in body}))
            if before is None or (before.get("metadata") or {}).get("generation") != body["metadata"].get("generation"):
                self.parked.pop(key, None)  # a new spec: look at it now

    async def write_status(self, body: dict[str, Any], new: dict[str, Any], event_: Optional[tuple[str, str, str]] = None) -> None:
        meta = body["metadata"]
        ns, name, kind = meta.get("namespace"), meta["name"], body["kind"]
        old = body.get("status") or {}
        changes = status_changes(old, new)
        if new.get("phase"):
            self.state.metrics.set_phase(kind, ns, name, new["phase"])
        if changes:
            await self.kube.patch(API_VERSION, kind, ns, name, {"status": changes}, subresource="status")
            key = (kind, ns, name)
            if key in self.bodies:  # until the watch brings the new body, do not repeat events
                self.bodies[key] = {**body, "status": {**old, **changes}}
        if event_ is not None and ("phase" in changes or "conditions" in changes):  # one event per transition
            await self.post_event(body, *event_)

    async def post_event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            await self.kube.create(make_event(body, type_, reason, message))
        except ApiError as err:  # best-effort, as for kubelet and controllers
            log.debug("could not post event %s: %s", reason, err)

    async def finetunejob(self, ns: str, name: str) -> Optional[dict[str, Any]]:
        return await self.kube.get(API_VERSION, "FineTuneJob", ns, name)

    # -- EvalJob ----------------------------------------------------------------------------

    async def reconcile_eval(self, body: dict[str, Any]) -> None:
        meta, old = body["metadata"], body.get("status") or {}
        ns, name, generation = meta.get("namespace"), meta["name"], meta.get("generation")
        now = now_iso()

        def conditions(state: WorkloadState, *, created: bool, ready: tuple[bool, str, str]) -> list[dict[str, Any]]:
            conds = conditions_for(old.get("conditions") or [], state, now=now, generation=generation, created=created)
            return model_ready(conds, *ready, now=now, generation=generation)

        def failed(state: WorkloadState, ready: tuple[bool, str, str] = (False, "NotEvaluated", "the eval did not run")) -> dict[str, Any]:
            return {"phase": "Failed", "observedGeneration": generation, "completionTime": old.get("completionTime") or now,
                    "conditions": conditions(state, created=bool(old.get("workload")), ready=ready)}

        try:
            evj = parse_object(body, f"EvalJob {ns}/{name}")
        except KubetuneError as err:
            state = WorkloadState("Failed", "InvalidSpec", str(err))
            return await self.write_status(body, failed(state), ("Warning", "InvalidSpec", str(err)))

        if not old.get("workload"):
            return await self.start_eval(body, evj, old, conditions, failed)

        ref = old["workload"]
        job = await self.kube.get(ref["apiVersion"], ref["kind"], ns, ref["name"])
        if job is None or (ref.get("uid") and (job.get("metadata") or {}).get("uid") != ref["uid"]):
            state = WorkloadState("Failed", "WorkloadMissing", f"Job {ref['name']} was deleted while the eval ran; delete and re-create the EvalJob to run it again", True)
            return await self.write_status(body, failed(state, (True, "ModelResolved", old.get("model") or "")), ("Warning", "WorkloadMissing", state.message))
        base = child_names(name).base
        job_uid = (job.get("metadata") or {}).get("uid")
        pods = [p for p in await self.kube.list("v1", "Pod", ns, label_selector={EVAL_LABEL: base}) if owned_by(p, job_uid)]
        state = eval_state(job, name=base, queue_name=evj.spec.queue_name)
        fetch_failed = initializer_failure(pods) if state.phase in ("Pending", "Failed") else None
        if fetch_failed:  # say why, rather than the Job's generic backoff message
            state = WorkloadState(state.phase, "InitializerFailed", f"the initializer could not fetch a source: {fetch_failed}", state.started)
        new: dict[str, Any] = {"phase": state.phase, "observedGeneration": generation,
                               "conditions": conditions(state, created=True, ready=(True, "ModelResolved", f"evaluating {old.get('model')}"))}
        if state.started and not old.get("startTime"):
            new["startTime"] = now
        if state.phase in TERMINAL_PHASES:
            new["completionTime"] = old.get("completionTime") or now
            pod = newest(pods)
            result = eval_result(container_message(pod, EVAL_CONTAINER), container_message(pod, BASELINE_CONTAINER)) if pod else None
            if result:
                new["result"] = result
        kind = "Warning" if state.phase == "Failed" else "Normal"
        await self.write_status(body, new, (kind, state.reason if state.phase == "Failed" else state.phase, f"phase {old.get('phase') or '-'} -> {state.phase}: {state.message}"))

    async def start_eval(self, body: dict[str, Any], evj: Any, old: dict[str, Any], conditions: Any, failed: Any) -> None:
        meta = body["metadata"]
        ns, generation = meta.get("namespace"), meta.get("generation")
        ftj, seen = None, old.get("fineTuneJobUid")
        extra: dict[str, Any] = {}
        if evj.spec.fine_tune_job is not None:
            ref = evj.spec.fine_tune_job.name
            ftj = await self.finetunejob(ns, ref)
            extra["model"] = f"finetunejob/{ref}"
            if ftj is not None and not seen:
                extra["fineTuneJobUid"] = seen = ftj["metadata"].get("uid")
            wait = finetune_wait(ref, ftj, seen)
            if wait is not None:
                return await self.write_waiting(body, wait, conditions, failed, extra)
        try:
            children = plan_eval(evj, ftj, image=self.state.config.trainer_image)
            inputs = cluster_inputs(evj, ftj)
        except KubetuneError as err:
            state = WorkloadState("Failed", "InvalidSpec", str(err))
            return await self.write_status(body, {**failed(state), **extra}, ("Warning", "InvalidSpec", str(err)))
        created = []
        try:
            for child in children:
                created.append(await ensure_owned(self.kube, child, meta.get("uid") or ""))
        except ChildConflict as err:
            state = WorkloadState(old.get("phase") or "Pending", "NameConflict", str(err))
            new = {"phase": state.phase, "conditions": conditions(state, created=False, ready=(True, "ModelResolved", inputs.description)), **extra}
            return await self.write_status(body, new, ("Warning", "NameConflict", str(err)))
        except ApiError as err:
            refusal = api_refusal(err, f"create {child['kind']} {child['metadata']['name']}")
            if refusal is None:
                raise
            terminal, reason, message = refusal
            state = WorkloadState("Failed" if terminal else old.get("phase") or "Pending", reason, message)
            ready = (True, "ModelResolved", inputs.description)
            new = {**(failed(state, ready) if terminal else
                      {"phase": state.phase, "conditions": conditions(state, created=False, ready=ready)}), **extra}
            return await self.write_status(body, new, ("Warning", reason, message))
        job = created[-1]
        workload = {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"], "uid": (job.get("metadata") or {}).get("uid")}
        state = WorkloadState("Queued", "WaitingForAdmission", f"waiting for Kueue to admit the eval from queue {evj.spec.queue_name}") \
            if evj.spec.queue_name else WorkloadState("Pending", "WaitingForPods", "the eval pod is being scheduled")
        new = {"phase": state.phase, "observedGeneration": generation, "workload": workload, "model": inputs.description,
               "modelId": inputs.identity, **extra,
               "conditions": conditions(state, created=True, ready=(True, "ModelResolved", f"evaluating {inputs.description}"))}
        kinds = ", ".join(f"{c['kind']} {c['metadata']['name']}" for c in children)
        await self.write_status(body, new, ("Normal", "Created", f"created {kinds}"))

    async def write_waiting(self, body: dict[str, Any], wait: Wait, conditions: Any, failed: Any, extra: dict[str, Any]) -> None:
        state = WorkloadState(wait.phase, wait.reason, wait.message)
        if wait.phase == "Failed":
            new = {**failed(state, (False, wait.reason, wait.message)), **extra}
            return await self.write_status(body, new, ("Warning", wait.reason, wait.message))
        generation = body["metadata"].get("generation")
        new = {"phase": "Pending", "observedGeneration": generation, **extra,
               "conditions": conditions(state, created=False, ready=(False, wait.reason, wait.message))}
        await self.write_status(body, new, ("Normal", wait.reason, wait.message))
        self.park(body)  # until its FineTuneJob changes (or the slow poll)

    # -- ModelDeployment --------------------------------------------------------------------

    async def reconcile_deployment(self, body: dict[str, Any]) -> None:
        meta, old = body["metadata"], body.get("status") or {}
        ns, name, generation, uid = meta.get("namespace"), meta["name"], meta.get("generation"), meta.get("uid") or ""
        now = now_iso()
        conds = list(old.get("conditions") or [])
        new: dict[str, Any] = {"observedGeneration": generation}
        try:
            mdep = parse_object(body, f"ModelDeployment {ns}/{name}")
        except KubetuneError as err:
            conds = set_condition(conds, "ModelReady", False, "InvalidSpec", str(err), now=now, generation=generation)
            return await self.write_status(body, {**new, "phase": "Failed", "conditions": conds}, ("Warning", "InvalidSpec", str(err)))

        deployment = await self.kube.get("apps/v1", "Deployment", ns, base_name(name))
        if deployment is not None and not owned_by(deployment, uid):
            message = f"Deployment {base_name(name)} already exists and does not belong to this ModelDeployment; delete it or rename this one"
            conds = set_condition(conds, "ModelReady", False, "NameConflict", message, now=now, generation=generation)
            return await self.write_status(body, {**new, "phase": "Failed", "conditions": conds}, ("Warning", "NameConflict", message))

        ftj, problem = None, None
        if mdep.spec.fine_tune_job is not None:
            ref = mdep.spec.fine_tune_job.name
            ftj = await self.finetunejob(ns, ref)
            if ftj is not None:
                new["fineTuneJobUid"] = ftj["metadata"].get("uid")
            # Unlike an EvalJob, a deployment follows its FineTuneJob across re-runs (a new uid is a
            # new model to roll out); while it is gone or running again, the old model keeps serving.
            wait = finetune_wait(ref, ftj, None)
            if wait is not None:
                problem = (wait.phase, wait.reason, wait.message)
        children: list[dict[str, Any]] = []
        if problem is None:
            try:
                children = plan_deployment(mdep, ftj, server_image=self.state.config.server_image)
                inputs = cluster_inputs(mdep, ftj)
            except KubetuneError as err:
                problem = ("Failed", "InvalidSpec", str(err))
        if problem is not None:
            phase, reason, message = problem
            conds = set_condition(conds, "ModelReady", False, reason, message, now=now, generation=generation)
            if deployment is None:  # nothing serves yet
                new["model"] = old.get("model") or (f"finetunejob/{mdep.spec.fine_tune_job.name}" if mdep.spec.fine_tune_job else None)
                conds = mirror_conditions(conds, {}, now=now, generation=generation)
                await self.write_status(body, {**new, "phase": phase, "conditions": conds},
                                        ("Warning" if phase == "Failed" else "Normal", reason, message))
                if phase == "Pending":  # waiting for its FineTuneJob, with nothing to follow meanwhile
                    self.park(body)
                return
            # The previous model keeps serving: report the Deployment as it is.
            return await self.write_served(body, mdep, deployment, new, conds, (("Warning" if phase == "Failed" else "Normal"), reason, message))

        conds = set_condition(conds, "ModelReady", True, "ModelResolved", f"serving {inputs.description}", now=now, generation=generation)
        desired = next(c for c in children if c["kind"] == "Deployment")
        current_id = ((deployment or {}).get("metadata") or {}).get("annotations", {}).get(MODEL_ID_ANNOTATION)
        roll = True
        if mdep.spec.promotion is not None and inputs.identity != current_id:
            verdict = await self.promotion(ns, mdep, inputs.identity)
            conds = set_condition(conds, "Promoted", verdict.promoted, verdict.reason, verdict.message, now=now, generation=generation)
            roll = verdict.promoted
        elif mdep.spec.promotion is None:
            conds = [c for c in conds if c.get("type") != "Promoted"]
        event_: Optional[tuple[str, str, str]] = None
        if not roll:
            event_ = ("Normal", "PromotionHeld", next(c["message"] for c in conds if c["type"] == "Promoted"))
            return await self.write_served(body, mdep, deployment, new, conds, event_)
        verb = "create"
        child = desired
        try:
            for child in children:
                if child["kind"] != "Deployment":
                    await apply_owned(self.kube, child, uid)
            if not mdep.spec.network_policy.enabled:
                verb, child = "patch", {"kind": "NetworkPolicy", "metadata": {"name": base_name(name)}}
                await open_owned_policy(self.kube, ns, base_name(name), uid)
            verb, child = "create", desired
            if deployment is None:
                deployment = await ensure_owned(self.kube, desired, uid)
                event_ = ("Normal", "Created", f"created Deployment {base_name(name)} serving {inputs.description}")
            elif deployment["metadata"].get("annotations", {}).get(SPEC_HASH_ANNOTATION) != desired["metadata"]["annotations"][SPEC_HASH_ANNOTATION]:
                verb = "patch"
                patch = {"metadata": {"annotations": desired["metadata"]["annotations"]}, "spec": desired["spec"]}
                deployment = await self.kube.patch("apps/v1", "Deployment", ns, base_name(name), patch)
                what = f"rolling out {inputs.description}" if inputs.identity != current_id else "updating the server Deployment"
                event_ = ("Normal", "RollingOut", what)
        except ApiError as err:
            refusal = api_refusal(err, f"{verb} {child['kind']} {child['metadata']['name']}")
            if refusal is None:
                raise
            terminal, reason, message = refusal
            conds = set_condition(conds, "Reconciled", False, reason, message, now=now, generation=generation)
            return await self.write_served(body, mdep, deployment, new, conds, ("Warning", reason, message), failed=terminal)
        except ChildConflict as err:  # e.g. a NetworkPolicy of that name made by someone else
            conds = set_condition(conds, "Reconciled", False, "NameConflict", str(err), now=now, generation=generation)
            return await self.write_served(body, mdep, deployment, new, conds, ("Warning", "NameConflict", str(err)), failed=True)
        conds = set_condition(conds, "Reconciled", True, "ChildrenApplied", "the Service, NetworkPolicy, Deployment (and autoscaler) match the spec",
                              now=now, generation=generation)
        new.update(model=inputs.description, modelId=inputs.identity)
        new["servedModels"] = served_models(mdep, inputs)
        await self.write_served(body, mdep, deployment, new, conds, event_)

    async def promotion(self, ns: str, mdep: Any, identity: str) -> Verdict:
        promotion = mdep.spec.promotion
        evj_body = await self.kube.get(API_VERSION, "EvalJob", ns, promotion.eval_job)
        if evj_body is not None:
            try:
                evj = parse_object(evj_body, f"EvalJob {ns}/{promotion.eval_job}")
            except KubetuneError:
                evj = None
            error = promotion_metric_error(promotion, evj) if evj is not None else None
            if error:
                return Verdict(False, "MetricNotFound", error)
        return promotion_verdict(promotion, evj_body, identity)

    async def server_initializer_failure(self, ns: Optional[str], mdep: Any) -> Optional[str]:
        """The initializer's last words in a server pod of this deployment (made by one of its
        ReplicaSets), if it failed there; None when none did, or the pods cannot be read now."""
        prefix = f"{base_name(mdep.metadata.name)}-"
        try:
            pods = await self.kube.list("v1", "Pod", ns, label_selector=selector(mdep))
        except ApiError:
            return None
        ours = [p for p in pods if any(o.get("kind") == "ReplicaSet" and str(o.get("name", "")).startswith(prefix)
                                       for o in (p.get("metadata") or {}).get("ownerReferences") or [])]
        return initializer_failure(ours)

    async def write_served(self, body: dict[str, Any], mdep: Any, deployment: Optional[dict[str, Any]], new: dict[str, Any],
                           conds: list[dict[str, Any]], event_: Optional[tuple[str, str, str]], *, failed: bool = False) -> None:
        generation = body["metadata"].get("generation")
        now = now_iso()
        if deployment is not None and mdep.spec.autoscaling is None:
            desired = int((deployment.get("spec") or {}).get("replicas") or 0)
        elif deployment is not None:
            desired = int((deployment.get("status") or {}).get("replicas") or mdep.spec.autoscaling.min_replicas)
        else:
            desired = mdep.spec.replicas if mdep.spec.autoscaling is None else mdep.spec.autoscaling.min_replicas
        phase, ready, dconds = deployment_state(deployment, desired)
        if failed and deployment is None:  # refused before anything served
            phase = "Failed"
        if deployment is not None and phase != "Ready":
            fetch_failed = await self.server_initializer_failure(body["metadata"].get("namespace"), mdep)
            if fetch_failed:  # say why new pods never start, rather than "waiting for replicas"
                conds = set_condition(conds, "ModelReady", False, "InitializerFailed",
                                      f"the initializer could not fetch a source: {fetch_failed}", now=now, generation=generation)
        conds = mirror_conditions(conds, dconds, now=now, generation=generation)
        new.update(phase=phase, conditions=conds, readyReplicas=ready, replicas=desired, ready=f"{ready}/{desired}")
        if deployment is not None:
            new["url"] = service_url(mdep)
        if event_ is None and phase != (body.get("status") or {}).get("phase"):
            event_ = ("Normal", phase, f"{ready}/{desired} replicas ready")
        await self.write_status(body, new, event_)


async def refuse_what_the_requester_may_not_use(
    state: Any, new_body: dict[str, Any], old: Any, operation: Optional[str], userinfo: Any
) -> None:
    """Tenancy as for FineTuneJobs (operator/tenancy.py): the pods of an EvalJob or a
    ModelDeployment must not use a ServiceAccount, Secret or claim the requester may not use.
    Checked on CREATE and on every spec change (a ModelDeployment's spec may change to roll out a
    new model); updates that leave the spec alone (kopf's own finalizer, labels) are not checked."""
    if operation == "UPDATE" and old is not None and dict(old).get("spec") == new_body.get("spec"):
        return
    obj = parse_object(new_body, new_body.get("kind", "object"))
    try:
        refused = await TenancyCheck(state.kube.create, state.config.tenancy).errors(obj, dict(userinfo or {}))
    except ApiError as err:  # cannot ask: refuse (failurePolicy Fail would too)
        raise kopf.AdmissionError(f"cannot check the requester's rights (SubjectAccessReview: {err}); try again", code=503)
    if refused:
        raise kopf.AdmissionError("; ".join(refused), code=403)


def eval_admission_error(body: dict[str, Any]) -> Optional[str]:
    """What is wrong with an EvalJob, naming the field; None when it can run. The model of a
    FineTuneJob is known only once that job succeeds: spec.config is checked with a stand-in path."""
    try:
        evj = parse_object(body, describe("EvalJob", body))
        if evj.spec.fine_tune_job is None:
            plan_eval(evj)
        else:
            stand_in = MappedSource("/mnt/model")
            inputs = ModelInputs(stand_in, MappedSource("/mnt/output/adapter"), stand_in, "", "")
            eval_configs(evj, inputs, task_configs(evj, cluster_task_source), RESULTS_DIR)
    except KubetuneError as err:
        return str(err)
    return None


def deployment_admission_error(body: dict[str, Any]) -> Optional[str]:
    """What is wrong with a ModelDeployment, naming the field; None when it can run."""
    try:
        mdep = parse_object(body, describe("ModelDeployment", body))
        if mdep.spec.fine_tune_job is None:
            plan_deployment(mdep)
        else:
            check_spec(mdep)
            stand_in = MappedSource("/mnt/model")
            served_models(mdep, ModelInputs(stand_in, None, stand_in, "", ""))
    except KubetuneError as err:
        return str(err)
    return None


def register(registry: kopf.OperatorRegistry, state: Any) -> PipelineReconciler:
    """Watch EvalJobs and ModelDeployments and reconcile them in one loop next to the FineTuneJob sync."""
    reconciler = PipelineReconciler(state)

    @kopf.on.event(*EVJ, registry=registry)
    async def remember_eval(type: Optional[str], body: Any, **_: Any) -> None:
        reconciler.remember("EvalJob", type, body)

    @kopf.on.event(*MDEP, registry=registry)
    async def remember_deployment(type: Optional[str], body: Any, **_: Any) -> None:
        reconciler.remember("ModelDeployment", type, body)

    @kopf.on.startup(registry=registry)
    async def start_pipeline(**_: Any) -> None:
        reconciler.task = asyncio.get_running_loop().create_task(reconciler.loop())

    @kopf.on.cleanup(registry=registry)
    async def stop_pipeline(**_: Any) -> None:
        if reconciler.task is not None:
            reconciler.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconciler.task

    if state.config.admission:  # the same webhook server as FineTuneJobs' (docs/operator.md)

        # CREATE and UPDATE only: a DELETE must never be refused (issue #26)
        @kopf.on.validate(*EVJ, id=EVAL_ADMISSION_ID, operations=["CREATE", "UPDATE"], registry=registry)
        async def validate_eval(body: Any, old: Any, operation: Optional[str], userinfo: Any, **_: Any) -> None:
            new_body = json.loads(json.dumps({k: body[k] for k in body}))
            error = eval_admission_error(new_body)
            if error:
                raise kopf.AdmissionError(error, code=422)
            await refuse_what_the_requester_may_not_use(state, new_body, old, operation, userinfo)

        @kopf.on.validate(*MDEP, id=DEPLOYMENT_ADMISSION_ID, operations=["CREATE", "UPDATE"], registry=registry)
        async def validate_deployment(body: Any, old: Any, operation: Optional[str], userinfo: Any, **_: Any) -> None:
            new_body = json.loads(json.dumps({k: body[k] for k in body}))
            error = deployment_admission_error(new_body)
            if error:
                raise kopf.AdmissionError(error, code=422)
            await refuse_what_the_requester_may_not_use(state, new_body, old, operation, userinfo)

    return reconciler
