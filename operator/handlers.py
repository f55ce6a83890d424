"""The kopf handlers of the operator: small functions; the logic is in planner.py and status.py.

build_registry(state) returns a fresh kopf registry with every handler bound to one
OperatorState, so `kubetune operator`, the tests and the benchmark each run their own.

- create/resume: plan the children and create-or-adopt them (never duplicates);
- spec.suspend: suspend or resume the workload;
- one sync loop (not a kopf timer: timers need a finalizer, and deleting a job must never wait
  for the operator) reads workload and pods into phase and conditions, scrapes rank 0's
  /metrics into status.progress and copies the termination summary into status.result.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import kopf

from kubetune.errors import KubetuneError
from kubetune.operator.api import API_VERSION, GROUP, VERSION, describe, parse_object
from kubetune.operator.accounting import accounting, ephemeral_output_condition
from kubetune.operator.api.common import DEFAULT_SERVER_IMAGE, DEFAULT_TRAINER_IMAGE, TERMINAL_PHASES
from kubetune.operator.api.finetune import FineTuneJob
from kubetune.operator.backends import jobset, trainjob
from kubetune.operator.initializers import initializer_failure
from kubetune.operator.kube import ApiError, KubeClient
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.peering import Peering
from kubetune.operator.planner import JOB_LABEL, MANAGED_BY, UNRESOLVED_START, ClusterInfo, choose_backend, plan
from kubetune.operator.references import Wait, finetune_start_model, finetune_wait, pvc_source_of
from kubetune.operator.scrape import scrape_metrics
from kubetune.operator.status import (
    WorkloadState,
    conditions_for,
    make_event,
    job_state,
    metrics_url,
    next_status,
    now_iso,
    parse_time,
    pod_failure,
    pod_problem,
    pytorchjob_state,
    rank0_pod,
    scheduling_problem,
    set_condition,
    spec_applied_conditions,
    suspend_reflected,
)
from kubetune.operator.tenancy import Policy, TenancyCheck
from kubetune.operator.workloads import (
    LIVE_FIELDS,
    SPEC_HASH_ANNOTATION,
    ChildError,
    Ensured,
    adoption_problem,
    child_error_state,
    lost_state,
    model_spec_hash,
    recorded_backend,
    spec_hash,
    stamp,
    workload_fate,
    workload_record,
)

FTJ = (GROUP, VERSION, "finetunejobs")
ADMISSION_ID = "validate-finetunejob"  # the webhook's URL path
KIND = "FineTuneJob"
log = logging.getLogger("kubetune.operator")


@dataclass
class OperatorConfig:
    sync_interval: float = 5.0  # seconds between status syncs of each running job
    sync_concurrency: int = 32  # jobs synced in parallel (API calls and scrapes)
    scrape_timeout: float = 2.0
    metrics_port: Optional[int] = 8080  # None: no metrics server
    metrics_addr: str = "0.0.0.0"
    admission: bool = False  # register the validating webhook handler
    trainer_image: str = DEFAULT_TRAINER_IMAGE  # for workloads whose spec.image is empty
    server_image: str = DEFAULT_SERVER_IMAGE  # for ModelDeployments whose spec.image is empty
    retry_delay: float = 2.0
    login: Optional[Callable[..., Any]] = None  # a kopf login function; default: service account, then kubeconfig
    tenancy: Policy = field(default_factory=Policy)  # allow-lists checked at admission (operator/tenancy.py)
    cpu_per_gpu: str = "4"  # the platform's default pod requests, per GPU (KUBETUNE_CPU_PER_GPU)
    memory_per_gpu: str = "32Gi"  # (KUBETUNE_MEMORY_PER_GPU)
    peering: Optional[Peering] = None  # under kopf peering, the sync loops run only while this replica serves
    # A FineTuneJob whose spec.fineTuneJob does not exist waits this long (`kubectl apply -f folder/`
    # may create it later), then fails (KUBETUNE_REFERENCE_GRACE_SECONDS).
    reference_grace: float = 300.0
    # A resource waiting for the one it references starts when that one's phase changes (a watch
    # event, operator/chaining.py); this slow poll only covers an event missed
    # (KUBETUNE_REFERENCE_POLL_SECONDS).
    reference_poll: float = 60.0


@dataclass
class OperatorState:
    config: OperatorConfig
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    connection: Any = None
    cluster: Optional[ClusterInfo] = None
    metrics_port: Optional[int] = None
    jobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (namespace, name) -> body
    sync_task: Optional[asyncio.Task] = None
    login_kwargs: dict[str, Any] = field(default_factory=dict)  # what kopf passed the login handler (settings, logger)
    # Starting a FineTuneJob: one lock per job, since kopf's handler and a wake-up (chaining.py)
    # may both try; `decided`: what kopf's handler decided (workload, base model, Failed) before
    # kopf wrote it, by (namespace, name) -> (uid, status fields); `next_poll`: when a job kopf's
    # handler left waiting for its spec.fineTuneJob is looked at again without an event
    # (time.monotonic()).
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    decided: dict[tuple[str, str], tuple[Optional[str], dict[str, Any]]] = field(default_factory=dict)
    next_poll: dict[tuple[str, str], float] = field(default_factory=dict)
    _kube: Optional[KubeClient] = None
    _discovery: Optional[asyncio.Lock] = None

    def log_in(self, **kwargs: Any) -> Any:
        """Credentials, as the login handler gets them: the configured login function, else the
        service account (its token file read afresh each time), else the kubeconfig."""
        if self.config.login is not None:
            return self.config.login(**kwargs)
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    async def relogin(self) -> Any:
        """Log in again after the API answered 401 to the operator's own client (a rotated
        service-account token): kopf re-logs in on its own 401s only, and its watches, which
        authenticated once, may not meet one for many minutes."""
        info = await asyncio.to_thread(self.log_in, **self.login_kwargs)
        if info is not None:
            log.info("the API refused the operator's credentials (401): logged in again")
            self.connection = info
        return info

    @property
    def kube(self) -> KubeClient:
        if self.connection is None:
            raise kopf.TemporaryError("not logged in to the API yet", delay=1)
        if self._kube is None:
            self._kube = KubeClient(self.connection, relogin=self.relogin)
        self._kube.use(self.connection)  # kopf logged in again (its own 401): the new credentials
        return self._kube

    def lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def with_decided(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body, its status overlaid with what was decided for this very object (its uid)."""
        meta = body.get("metadata") or {}
        uid, fields = self.decided.get((meta.get("namespace"), meta.get("name")), (None, {}))
        if not fields or uid != meta.get("uid"):
            return body
        return {**body, "status": {**(body.get("status") or {}), **fields}}

    def forget(self, key: tuple[str, str]) -> None:
        for memory in (self.jobs, self.locks, self.decided, self.next_poll):
            memory.pop(key, None)

    async def cluster_info(self) -> ClusterInfo:
        self._discovery = self._discovery or asyncio.Lock()
        async with self._discovery:
            if self.cluster is None:
                self.cluster = await discover(
                    self.kube, trainer_image=self.config.trainer_image,
                    cpu_per_gpu=self.config.cpu_per_gpu, memory_per_gpu=self.config.memory_per_gpu,
                )
        return self.cluster

    async def serving(self) -> bool:
        """Whether this replica's own loops may run (always, without peering: operator/peering.py)."""
        if self.config.peering is None:
            return True
        return await self.config.peering.serving(self.kube)

    async def close(self) -> None:
        if self.sync_task is not None:
            self.sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sync_task
            self.sync_task = None
        if self._kube is not None:
            await self._kube.close()
            self._kube = None
        self.metrics.stop()


async def discover(
    kube: KubeClient, *, trainer_image: str = DEFAULT_TRAINER_IMAGE, cpu_per_gpu: str = "4", memory_per_gpu: str = "32Gi"
) -> ClusterInfo:
    """Which optional backends the API serves (for `backend: auto`). A TrainJob also needs
    kubetune's ClusterTrainingRuntime: without it (or without the right to read it) the Trainer
    would refuse the TrainJob, so auto passes to the next backend."""
    has_trainjob = await kube.serves(trainjob.API_VERSION, "trainjobs")
    if has_trainjob:
        try:
            runtime = await kube.get(trainjob.API_VERSION, trainjob.RUNTIME_KIND, None, trainjob.RUNTIME)
        except ApiError as err:
            if err.retriable:
                raise
            runtime = None  # 403: the operator may not read runtimes; do not guess
        has_trainjob = runtime is not None
    return ClusterInfo(
        has_pytorchjob=await kube.serves("kubeflow.org/v1", "pytorchjobs"),
        has_jobset=await kube.serves(jobset.API_VERSION, "jobsets"),
        has_trainjob=has_trainjob,
        trainer_image=trainer_image,
        cpu_per_gpu=cpu_per_gpu,
        memory_per_gpu=memory_per_gpu,
    )


def workload_state(kind: str, workload: dict[str, Any], *, base: str, queue_name: Optional[str]) -> WorkloadState:
    if kind == "Job":
        return job_state(workload, name=base, queue_name=queue_name)
    if kind == jobset.KIND:
        return jobset.jobset_state(workload, queue_name=queue_name)
    if kind == trainjob.KIND:
        return trainjob.trainjob_state(workload, queue_name=queue_name)
    return pytorchjob_state(workload, name=workload["metadata"]["name"], queue_name=queue_name)


def workload_pods(kind: str, workload: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only pods the workload's controllers made: a look-alike pod with our labels must not
    steer the operator's scrape to another address."""
    if kind == jobset.KIND:
        return [p for p in pods if jobset.owns_pod(workload, p)]
    if kind == trainjob.KIND:
        return [p for p in pods if trainjob.owns_pod(workload, p)]
    workload_uid = (workload.get("metadata") or {}).get("uid")
    return [p for p in pods if any(o.get("uid") == workload_uid for o in (p.get("metadata") or {}).get("ownerReferences") or [])]


Events = list[tuple[str, str, str]]  # (type, reason, message) to post on the object


class ReferenceWait(Exception):
    """spec.fineTuneJob has not succeeded yet: look again in `delay` seconds, or when it changes."""

    def __init__(self, delay: float):
        super().__init__(f"waiting for spec.fineTuneJob; polled again in {delay:g}s")
        self.delay = delay


class NameConflict(KubetuneError):
    """A child's name is taken by an object this FineTuneJob does not own."""


def plain(body: Any) -> dict[str, Any]:
    """kopf's Body view -> a plain, independent dict (a JSON round trip: several times faster
    than copy.deepcopy, and a body is JSON anyway)."""
    return json.loads(json.dumps({key: body[key] for key in body}))


def admission_error(body: dict[str, Any]) -> Optional[str]:
    """What is wrong with a FineTuneJob, naming the field; None when it can run."""
    try:
        job = parse_object(body, describe("FineTuneJob", body))
        start = UNRESOLVED_START if job.spec.fine_tune_job else None  # spec.fineTuneJob's output: known once it ran
        plan(job, ClusterInfo(), start_model=start)  # validates spec.config with the recipe's config model, and the sources
    except KubetuneError as err:
        return str(err)
    return None


def review_error(operation: Optional[str], new: Optional[dict[str, Any]], old: Optional[dict[str, Any]]) -> Optional[str]:
    """The admission decision (None: allowed). Only CREATE and UPDATE are ever judged:

    - DELETE (and CONNECT) are always allowed: an object that no longer plans (a recipe removed
      from a newer trainer, say) must stay deletable;
    - UPDATE that leaves the planned spec alone (metadata, spec.suspend, status) is allowed without
      planning, so a job that no longer plans can still be suspended, relabelled or cleaned up;
      any other spec change is refused (the CRD's CEL rule says the same; this also covers
      spec.config, whose unknown keys CEL on a real API server compares only in part);
    - CREATE: the planner must accept it."""
    if operation == "CREATE" and new is not None:
        return admission_error(new)
    if operation == "UPDATE" and new is not None and old is not None:
        if spec_hash(new.get("spec") or {}) != spec_hash(old.get("spec") or {}):
            changed = sorted(
                key for key in set(new.get("spec") or {}) | set(old.get("spec") or {})
                if key not in LIVE_FIELDS and (new.get("spec") or {}).get(key) != (old.get("spec") or {}).get(key)
            )
            return (
                f"spec.{', spec.'.join(changed)}: cannot change once the job exists (only spec.suspend can); "
                "create a new FineTuneJob"
            )
    return None


async def ensure_child(kube: KubeClient, child: dict[str, Any], owner_uid: str) -> dict[str, Any]:
    """Create the child, or adopt the one already there when it is ours (controller
    ownerReference = owner_uid and the same spec hash): never a duplicate, never a look-alike.
    -> the object as the API has it."""
    meta = child["metadata"]
    try:
        return await kube.create(child) or child
    except ApiError as err:
        if err.status != 409:
            raise ChildError(err, "create", child) from err
    try:
        existing = await kube.get(child["apiVersion"], child["kind"], meta.get("namespace"), meta["name"])
    except ApiError as err:
        raise ChildError(err, "get", child) from err
    if existing is None:  # deleted between our create and get: try again later
        raise ApiError(409, "Conflict", f"{child['kind']} {meta['name']} is being deleted")
    problem = adoption_problem(existing, owner_uid, (meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION, ""))
    if problem is None:
        return existing
    raise NameConflict(
        f"{child['kind']} {meta['name']} already exists and {problem}; "
        "delete it or give the FineTuneJob another name"
    )


def first_state(job: FineTuneJob) -> WorkloadState:
    if job.spec.suspend:
        return WorkloadState("Suspended", "Suspended", "spec.suspend is true; set it to false to resume")
    if job.spec.queue_name:
        return WorkloadState("Queued", "WaitingForAdmission", f"waiting for Kueue to admit the job from queue {job.spec.queue_name}")
    return WorkloadState("Pending", "WaitingForPods", "the trainer pods are being scheduled")


def build_registry(state: OperatorState) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    config = state.config
    metrics = state.metrics

    @contextlib.contextmanager
    def timed(handler: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except ReferenceWait:
            raise  # waiting, not an error
        except Exception:
            metrics.reconcile_errors.labels(kind=KIND, handler=handler).inc()
            raise
        finally:
            metrics.reconcile_seconds.labels(kind=KIND, handler=handler).observe(time.perf_counter() - started)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        state.login_kwargs = kwargs  # kept for the client's own re-login on 401 (OperatorState.relogin)
        info = state.log_in(**kwargs)
        state.connection = info
        return info

    @kopf.on.startup(registry=registry)
    async def startup(**_: Any) -> None:
        if config.metrics_port is not None and state.metrics_port is None:
            state.metrics_port = metrics.serve(config.metrics_port, config.metrics_addr)
            log.info("operator metrics on :%s/metrics", state.metrics_port)
        state.sync_task = asyncio.get_running_loop().create_task(sync_loop())

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await state.close()

    async def ensure_all(job: FineTuneJob, record: Optional[dict[str, Any]], *, started: bool, start_model: Optional[str] = None) -> Ensured:
        """Plan (from the recorded backend, if any) and create-or-adopt the children; the workload
        only when workload_fate says so: a started or finished workload is never made again."""
        digest = model_spec_hash(job.spec)
        if record and record.get("specHash") not in (None, digest):
            return Ensured("keep", record, [])  # spec changed under a running workload: sync reports it
        backend = recorded_backend(record) or choose_backend(job.spec, await state.cluster_info())
        children = stamp(plan(job, await state.cluster_info(), backend=backend, start_model=start_model), digest)
        *support, workload = children
        existing = None
        if record:
            try:
                existing = await state.kube.get(record["apiVersion"], record["kind"], job.metadata.namespace, record["name"])
            except ApiError as err:
                raise ChildError(err, "get", workload) from err
        fate = workload_fate(record, existing, started=started)
        if fate == "lost":
            return Ensured(fate, record, [])
        owner = job.metadata.uid or ""
        for child in support:
            await ensure_child(state.kube, child, owner)
        if fate == "keep" and existing is not None:
            return Ensured(fate, workload_record(existing, backend, (record or {}).get("specHash") or digest), children)
        made = await ensure_child(state.kube, workload, owner)
        return Ensured(fate, workload_record({**workload, **made}, backend, digest), children)

    def set_conditions(body: Any, patch: kopf.Patch, current: WorkloadState, *, created: bool) -> None:
        old = body.get("status") or {}
        generation = body.metadata.get("generation")
        base = patch.status.get("conditions") or old.get("conditions") or []  # on top of what this handler set already
        patch.status["conditions"] = conditions_for(base, current, now=now_iso(), generation=generation, created=created)
        patch.status["phase"] = current.phase
        patch.status["observedGeneration"] = generation

    def end_lost(body: Any, patch: kopf.Patch, record: dict[str, Any], events: Events) -> None:
        old = body.get("status") or {}
        current = lost_state(record)
        set_conditions(body, patch, current, created=True)
        patch.status["completionTime"] = old.get("completionTime") or now_iso()
        events.append(("Warning", current.reason, current.message))
        metrics.set_phase(KIND, body.metadata.namespace, body.metadata.name, current.phase)

    async def start_model(body: Any, job: FineTuneJob, patch: kopf.Patch, events: Events) -> Optional[str]:
        """With spec.fineTuneJob: the pvc:// source of that job's model once it succeeded (also kept
        in status.baseModel). Until then the job stays Pending with ModelReady=False naming it, and
        this raises ReferenceWait: the job starts when the reference's phase changes (chaining.py
        wakes it) or at its slow poll; a failed, deleted or unusable reference, or one still
        missing after reference_grace, fails the job."""
        ref = job.spec.fine_tune_job
        old = body.get("status") or {}
        if ref is None:
            return None
        if old.get("baseModel"):  # resolved before (a restart, a workload made again): keep that model
            return old["baseModel"]
        try:
            ftj = await state.kube.get(API_VERSION, KIND, body.metadata.namespace, ref.name)
        except ApiError as err:
            raise kopf.TemporaryError(f"API error reading FineTuneJob {ref.name}, retrying: {err}", delay=config.retry_delay)
        seen = old.get("fineTuneJobUid")
        if ftj is not None and not seen:
            seen = patch.status["fineTuneJobUid"] = (ftj.get("metadata") or {}).get("uid")
        wait = finetune_wait(ref.name, ftj, seen)
        created = parse_time(body.metadata.get("creationTimestamp"))
        if wait is not None and wait.phase == "Pending" and ftj is None and created is not None and (
                dt.datetime.now(dt.timezone.utc) - created).total_seconds() > config.reference_grace:
            wait = Wait("Failed", "FineTuneJobNotFound", f"FineTuneJob {ref.name} still does not exist "
                        f"{config.reference_grace:g}s after this job was created; create it, or fix spec.fineTuneJob.name and create this job again")
        source = None
        if wait is None:
            try:
                source = pvc_source_of(ref.name, ftj, finetune_start_model(ref.name, ftj))
            except KubetuneError as err:
                wait = Wait("Failed", "FineTuneJobOutputUnusable", str(err))
        now, generation = now_iso(), body.metadata.get("generation")
        if wait is None:
            patch.status["baseModel"] = source
            patch.status["conditions"] = set_condition(
                old.get("conditions") or [], "ModelReady", True, "ModelResolved",
                f"starting from FineTuneJob {ref.name}'s model {source}", now=now, generation=generation)
            return source
        set_conditions(body, patch, WorkloadState(wait.phase, wait.reason, wait.message), created=False)
        patch.status["conditions"] = set_condition(patch.status["conditions"], "ModelReady", False, wait.reason, wait.message,
                                                   now=now, generation=generation)
        if wait.phase == "Failed":
            patch.status["completionTime"] = old.get("completionTime") or now
            events.append(("Warning", wait.reason, wait.message))
            metrics.set_phase(KIND, body.metadata.namespace, body.metadata.name, "Failed")
            raise kopf.PermanentError(wait.message)
        if next((c.get("reason") for c in old.get("conditions") or [] if c["type"] == "ModelReady"), None) != wait.reason:
            events.append(("Normal", wait.reason, wait.message))  # once per reason, not once per poll
        metrics.set_phase(KIND, body.metadata.namespace, body.metadata.name, "Pending")
        delay = config.reference_poll
        if ftj is None and not seen and created is not None:  # look again when its grace ends
            grace_left = config.reference_grace - (dt.datetime.now(dt.timezone.utc) - created).total_seconds()
            delay = min(delay, max(grace_left, 0.0) + 0.1)
        raise ReferenceWait(delay)

    async def write_status(body: Any, changes: dict[str, Any]) -> None:
        """Patch status now (not through kopf's patch after the handler) and keep the body the
        sync loop and the wake-ups read in step until the watch brings the new one."""
        ns, name = body["metadata"].get("namespace"), body["metadata"]["name"]
        await state.kube.patch(API_VERSION, KIND, ns, name, {"status": changes}, subresource="status")
        latest = state.jobs.get((ns, name))
        if latest is not None and (latest.get("metadata") or {}).get("uid") == body["metadata"].get("uid"):
            state.jobs[(ns, name)] = {**latest, "status": {**(latest.get("status") or {}), **changes}}

    def chained_not_started(body: dict[str, Any]) -> bool:
        """A job with spec.fineTuneJob, reconciled once (phase Pending) and without a workload yet:
        waiting for its reference, or resolved it and met an error making its children (retried
        here too, since kopf's handler ended when it began to wait)."""
        status = body.get("status") or {}
        return bool(((body.get("spec") or {}).get("fineTuneJob") or {}).get("name")) and status.get("phase") == "Pending" \
            and not status.get("workload") and not body["metadata"].get("deletionTimestamp")

    @kopf.on.resume(*FTJ, registry=registry)
    @kopf.on.create(*FTJ, registry=registry)
    async def reconcile(body: Any, patch: kopf.Patch, retry: int = 0, **_: Any) -> None:
        """Create (or adopt) the children; set the first phase and conditions. A job waiting for its
        spec.fineTuneJob is done here: it is started by a wake-up or its poll (start_waiting)."""
        key = (body.metadata.namespace, body.metadata.name)
        async with state.lock(key):
            raw = state.with_decided(plain(body))
            events: Events = []
            try:
                await advance(kopf.Body(raw), patch, retry, events)
            except ReferenceWait as wait:
                # Written now, under the lock: a wake-up that starts the job right after must not be
                # overwritten by kopf's patch of this waiting status.
                state.next_poll[key] = time.monotonic() + wait.delay
                try:
                    await write_status(raw, patch.pop("status"))
                except ApiError as err:
                    raise kopf.TemporaryError(f"API error, retrying: {err}", delay=config.retry_delay)
            finally:
                # What kopf will write after this handler, for a wake-up that comes first (with_decided).
                status = patch.get("status") or {}
                if status.get("workload") or status.get("phase") in TERMINAL_PHASES:
                    fields = ("workload", "baseModel", "fineTuneJobUid", "phase")
                    state.decided[key] = (body.metadata.get("uid"), {k: status[k] for k in fields if k in status})
                for type_, reason, message in events:
                    (kopf.warn if type_ == "Warning" else kopf.info)(body, reason=reason, message=message)

    async def start_waiting(ns: str, name: str) -> None:
        """A job waiting for its spec.fineTuneJob, woken (that job's phase changed) or polled:
        the same steps as the handler, under the same lock, the status written directly."""
        key = (ns, name)
        async with state.lock(key):
            if key not in state.jobs:
                return
            raw = state.with_decided(state.jobs[key])
            if not chained_not_started(raw):
                return  # started, ended or not reconciled yet (kopf's handler does that)
            state.next_poll.pop(key, None)
            patch, events = kopf.Patch(), []
            try:
                await advance(kopf.Body(raw), patch, 0, events)
            except ReferenceWait as wait:
                state.next_poll[key] = time.monotonic() + wait.delay
            except kopf.PermanentError:
                pass  # Failed: the patch says why
            except kopf.TemporaryError as err:
                state.next_poll[key] = time.monotonic() + (err.delay or config.retry_delay)
            except Exception:
                state.next_poll[key] = time.monotonic() + config.retry_delay
                raise
            if patch.get("status"):
                await write_status(raw, patch["status"])
            for event in events:  # kopf posts only its handlers' events
                await post_event(raw, *event)

    async def wake_jobs(ns: str, names: Iterable[str]) -> None:
        await asyncio.gather(*(start_waiting(ns, name) for name in names))

    async def poll_waiting() -> None:
        """The slow poll of jobs waiting for their spec.fineTuneJob (an event may have been missed),
        and the retry of those whose children could not be made yet."""
        now = time.monotonic()
        # Only jobs handed over to it (kopf's handler ended with them waiting): kopf retries its own.
        due = [key for key, at in list(state.next_poll.items()) if now >= at and key in state.jobs and chained_not_started(state.jobs[key])]
        for key, result in zip(due, await asyncio.gather(*(start_waiting(*key) for key in due), return_exceptions=True)):
            if isinstance(result, Exception):
                log.warning("looking at %s/%s's spec.fineTuneJob failed, will retry: %s", *key, result)

    async def advance(body: Any, patch: kopf.Patch, retry: int, events: Events) -> None:
        """Create (or adopt) the children and set the first phase and conditions, into `patch`,
        and the Events to post into `events` (kopf posts a handler's; a wake-up posts its own).
        Raises ReferenceWait while spec.fineTuneJob has not succeeded (the status says so in
        `patch`), kopf.TemporaryError to be called again, kopf.PermanentError when it failed."""
        with timed("reconcile"):
            ns, name = body.metadata.namespace, body.metadata.name
            old = body.get("status") or {}
            if old.get("phase") in TERMINAL_PHASES:
                metrics.set_phase(KIND, ns, name, old["phase"])
                return
            if body.metadata.get("deletionTimestamp"):
                return  # being deleted (e.g. a foreground delete took the workload first): never recreate
            record = old.get("workload")
            try:
                job = parse_object(plain(body), f"FineTuneJob {ns}/{name}")
                start = await start_model(body, job, patch, events)  # spec.fineTuneJob: ReferenceWait until it succeeded
                ensured = await ensure_all(job, record, started=bool(old.get("startTime")), start_model=start)
            except NameConflict as err:
                events.append(("Warning", "NameConflict", str(err)))
                set_conditions(body, patch, WorkloadState(old.get("phase") or "Pending", "NameConflict", str(err)), created=False)
                raise kopf.TemporaryError(str(err), delay=config.retry_delay * 5)
            except ChildError as err:
                state_ = child_error_state(err, old.get("phase") or "Pending")
                if state_ is None:
                    raise kopf.TemporaryError(f"API error, retrying: {err}", delay=config.retry_delay)
                if retry == 0 or state_.phase == "Failed":  # one event, not one per retry
                    events.append(("Warning", state_.reason, state_.message))
                set_conditions(body, patch, state_, created=False)
                if state_.phase == "Failed":  # the API refused the object itself: retrying cannot help
                    patch.status["completionTime"] = old.get("completionTime") or now_iso()
                    metrics.set_phase(KIND, ns, name, "Failed")
                    raise kopf.PermanentError(state_.message)
                raise kopf.TemporaryError(state_.message, delay=min(config.retry_delay * 2 ** min(retry, 10), 300))
            except ApiError as err:
                raise kopf.TemporaryError(f"API error, retrying: {err}", delay=config.retry_delay)
            except KubetuneError as err:  # a spec that cannot run: say which field, once
                set_conditions(body, patch, WorkloadState("Failed", "InvalidSpec", str(err)), created=False)
                patch.status["completionTime"] = old.get("completionTime") or now_iso()
                events.append(("Warning", "InvalidSpec", str(err)))
                metrics.set_phase(KIND, ns, name, "Failed")
                raise kopf.PermanentError(str(err))
            if ensured.fate == "lost":
                end_lost(body, patch, record or {}, events)
                return
            if record and ensured.fate == "keep":  # resumed after a restart: the sync loop owns phase and conditions
                if ensured.record != record:
                    patch.status["workload"] = ensured.record
                if old.get("phase"):
                    metrics.set_phase(KIND, ns, name, old["phase"])
                return
            current = first_state(job)
            kinds = ", ".join(f"{c['kind']} {c['metadata']['name']}" for c in ensured.children)
            verb = "recreated (it had not started)" if record else "created"
            events.append(("Normal", "Created", f"{verb} {kinds}"))
            set_conditions(body, patch, current, created=True)
            if not job.spec.output.source:  # a restart there starts from scratch: say so where people look
                type_, ok, reason, message = ephemeral_output_condition()
                patch.status["conditions"] = set_condition(
                    patch.status["conditions"], type_, ok, reason, message, now=now_iso(), generation=body.metadata.get("generation")
                )
                events.append(("Warning", reason, message))
            patch.status["workload"] = ensured.record
            metrics.set_phase(KIND, ns, name, current.phase)

    @kopf.on.update(*FTJ, field="spec.suspend", registry=registry)
    async def suspend_changed(body: Any, new: Any, **_: Any) -> None:
        """spec.suspend flips the workload's suspend; with a Kueue queue, resuming is Kueue's call."""
        workload = (body.get("status") or {}).get("workload")
        if not workload or (not new and (body.get("spec") or {}).get("queueName")):
            return
        with timed("suspend"):
            ns = body.metadata.namespace
            if workload["kind"] in ("Job", jobset.KIND, trainjob.KIND):
                suspend_patch = {"spec": {"suspend": bool(new)}}
            else:
                suspend_patch = {"spec": {"runPolicy": {"suspend": bool(new)}}}
            try:
                await state.kube.patch(workload["apiVersion"], workload["kind"], ns, workload["name"], suspend_patch)
            except ApiError as err:
                raise kopf.TemporaryError(f"could not {'suspend' if new else 'resume'} {workload['name']}: {err}", delay=config.retry_delay)
            verb = "suspended" if new else "resumed"
            kopf.info(body, reason=verb.capitalize(), message=f"{workload['kind']} {workload['name']} {verb}")

    @kopf.on.event(*FTJ, registry=registry)
    async def remember(type: Optional[str], body: Any, **_: Any) -> None:
        """Keep the latest body of every FineTuneJob for the sync loop. (async: kopf runs sync
        handlers in a thread pool, and this one runs on every watch event.)"""
        key = (body.metadata.namespace, body.metadata.name)
        if type == "DELETED":
            state.forget(key)
            metrics.forget(KIND, *key)  # no finalizer: the children go with their owner (ownerReferences)
        else:
            state.jobs[key] = plain(body)
            status = body.get("status") or {}
            if status.get("workload") or status.get("phase") in TERMINAL_PHASES:
                state.decided.pop(key, None)  # the body says it now

    async def sync_loop() -> None:
        while True:
            await asyncio.sleep(config.sync_interval)
            if state.connection is None or not await state.serving():
                continue
            await poll_waiting()
            due = [body for body in list(state.jobs.values()) if needs_sync(body)]
            by_namespace: dict[str, list[dict[str, Any]]] = {}
            for body in due:
                by_namespace.setdefault(body["metadata"].get("namespace"), []).append(body)
            await asyncio.gather(*(sync_namespace(ns, bodies) for ns, bodies in by_namespace.items()))

    async def sync_namespace(ns: str, bodies: list[dict[str, Any]]) -> None:
        """One LIST of workloads and one of pods per namespace and round, like an informer,
        instead of a GET and a LIST per job: 500 jobs cost the API two requests, not a thousand."""
        managed = {MANAGED_BY: "kubetune"}
        try:
            kinds = {ref["kind"]: ref["apiVersion"] for ref in (b["status"]["workload"] for b in bodies)}
            workloads: dict[tuple[str, str], dict[str, Any]] = {}
            for kind, api_version in kinds.items():
                for obj in await state.kube.list(api_version, kind, ns, label_selector=managed):
                    workloads[(kind, obj["metadata"]["name"])] = obj
            pods_by_job: dict[str, list[dict[str, Any]]] = {}
            for pod in await state.kube.list("v1", "Pod", ns, label_selector=managed):
                pods_by_job.setdefault((pod["metadata"].get("labels") or {}).get(JOB_LABEL, ""), []).append(pod)
            # Quota, Pod Security and volume problems are only told by events: read them while
            # some job here waits for its pods (events do not carry our labels).
            waiting = any((b.get("status") or {}).get("phase") in (None, "Pending") for b in bodies)
            events = await state.kube.list("v1", "Event", ns) if waiting else []
        except ApiError as err:
            log.warning("listing workloads in %s failed, will retry: %s", ns, err)
            return
        limit = asyncio.Semaphore(config.sync_concurrency)

        async def one(body: dict[str, Any]) -> None:
            async with limit:
                try:
                    with timed("sync"):
                        ref = body["status"]["workload"]
                        base = ref["name"]  # the workload is named after the base (which a newer operator may compute otherwise)
                        await sync(body, workloads.get((ref["kind"], ref["name"])), pods_by_job.get(base, []), events)
                except Exception as err:  # retried on the next round
                    log.warning("sync of %s/%s failed, will retry: %s", ns, body["metadata"]["name"], err)

        await asyncio.gather(*(one(body) for body in bodies))

    def needs_sync(body: dict[str, Any]) -> bool:
        status = body.get("status") or {}
        return bool(status.get("workload")) and status.get("phase") not in TERMINAL_PHASES

    async def sync(body: dict[str, Any], workload: Optional[dict[str, Any]], pods: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        """Workload and pods -> phase and conditions; rank 0's /metrics -> progress; summary -> result."""
        meta = body["metadata"]
        ns, name = meta.get("namespace"), meta["name"]
        old = body.get("status") or {}
        try:
            job = parse_object(body, f"FineTuneJob {ns}/{name}")
        except KubetuneError:
            return  # reconcile reported it
        ref = old["workload"]
        if workload is None:  # listed before the create, or gone: look again before deciding
            workload = await state.kube.get(ref["apiVersion"], ref["kind"], ns, ref["name"])
        fate = workload_fate(ref, workload, started=bool(old.get("startTime")) or old.get("phase") == "Running")
        if fate != "keep":
            if (ns, name) not in state.jobs or meta.get("deletionTimestamp"):
                return  # the job is going away (a foreground delete takes the workload first)
            if fate == "lost":
                current = lost_state(ref)
                changes = {"phase": current.phase, "completionTime": old.get("completionTime") or now_iso(),
                           "conditions": conditions_for(old.get("conditions") or [], current, now=now_iso(), generation=old.get("observedGeneration"))}
                await state.kube.patch(API_VERSION, KIND, ns, name, {"status": changes}, subresource="status")
                state.jobs[(ns, name)] = {**body, "status": {**old, **changes}}
                metrics.set_phase(KIND, ns, name, current.phase)
                await post_event(body, "Warning", current.reason, current.message)
                return
            ensured = await ensure_all(job, ref, started=False, start_model=old.get("baseModel"))  # it never started: making it again is safe
            if ensured.record != ref:
                await state.kube.patch(API_VERSION, KIND, ns, name, {"status": {"workload": ensured.record}}, subresource="status")
                state.jobs[(ns, name)] = {**body, "status": {**old, "workload": ensured.record}}
            await post_event(body, "Warning", "Recreated", f"{ref['kind']} {ref['name']} was deleted before it started and has been recreated")
            return
        base = ref["name"]  # the workload is named after the base (which a newer operator may compute otherwise)
        pods = workload_pods(ref["kind"], workload, pods)
        workload_uid = (workload.get("metadata") or {}).get("uid")
        current = workload_state(ref["kind"], workload, base=base, queue_name=job.spec.queue_name)
        fetch_failed = initializer_failure(pods) if current.phase in ("Pending", "Failed") else None
        if fetch_failed:  # say why, rather than the workload's generic backoff message
            current = WorkloadState(current.phase, "InitializerFailed", f"the initializer could not fetch a source: {fetch_failed}", current.started)
        if current.phase == "Failed" and not fetch_failed and current.reason != "DeadlineExceeded":
            died = pod_failure(pods)  # which rank died and why (the workload only says that it failed)
            if died is not None:
                current = WorkloadState("Failed", died.reason, f"{died.message} (the {ref['kind']} failed: {current.reason})", True)
        if current.phase == "Pending":
            pod_uids = {(p.get("metadata") or {}).get("uid") for p in pods}
            image = job.spec.image or config.trainer_image
            current = pod_problem(pods, image) or scheduling_problem(events, workload_uid, pod_uids) or current
        pod0 = rank0_pod(pods)
        metrics_text = None
        url = metrics_url(pod0) if pod0 is not None else None
        if current.phase == "Running" and url:
            try:
                metrics_text = await scrape_metrics(url, timeout=config.scrape_timeout)
            except Exception as err:  # the trainer may not serve yet: keep the last progress
                log.debug("scraping %s for %s/%s failed: %s", url, ns, name, err)
        # observedGeneration tells the truth: it advances only when the workload reflects this
        # generation (the planned spec unchanged, spec.suspend applied).
        spec_applied = not ref.get("specHash") or ref["specHash"] == model_spec_hash(job.spec)
        generation = meta.get("generation") if spec_applied and suspend_reflected(job.spec, workload) else old.get("observedGeneration")
        now = dt.datetime.now(dt.timezone.utc)
        # in a thread: parsing the pod's metrics text must not hold the shared event loop
        changes, event = await asyncio.to_thread(
            next_status, old, current, pod0, metrics_text, generation=generation, now=now
        )
        conditions, ignored = spec_applied_conditions(
            changes.get("conditions") or old.get("conditions") or [], spec_applied, generation=generation,
            current_generation=meta.get("generation"), now=now_iso(),
        )
        if conditions != (changes.get("conditions") or old.get("conditions") or []):
            changes["conditions"] = conditions
            if ignored is not None:
                event = event or ignored
        counted = accounting(old, ref["kind"], workload, pods, phase=current.phase, output_ephemeral=not job.spec.output.source, now=now)
        changes.update(counted)
        if "restarts" in counted:
            restarted = ("Warning", "Restarted", f"{ref['kind']} {ref['name']} restarted the trainer after a failure "
                         f"(restart {counted['restarts']}); it resumes from step {counted['resumedFromStep']}")
            await post_event(body, *restarted)
        metrics.set_phase(KIND, ns, name, current.phase)
        if changes.get("progress"):
            metrics.set_progress(ns, name, changes["progress"])
        if changes:
            await state.kube.patch(API_VERSION, KIND, ns, name, {"status": changes}, subresource="status")
            if (ns, name) in state.jobs:  # until the watch brings the new body, do not repeat the event
                state.jobs[(ns, name)] = {**body, "status": {**old, **changes}}
        if event is not None:
            await post_event(body, *event)

    async def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            await state.kube.create(make_event(body, type_, reason, message))
        except ApiError as err:  # events are best-effort, as for kubelet and controllers
            log.debug("could not post event %s: %s", reason, err)

    # EvalJobs and ModelDeployments: their own watches and reconcile loop (pipeline_handlers.py).
    from kubetune.operator.chaining import register as register_chaining
    from kubetune.operator.pipeline_handlers import register as register_pipeline

    reconciler = register_pipeline(registry, state)
    # Resources waiting for another start when its phase changes (operator/chaining.py).
    register_chaining(registry, wake_finetunejobs=wake_jobs, wake_pipeline=reconciler.wake)

    if config.admission:

        # The served paths only: the ValidatingWebhookConfiguration is a static manifest
        # (deploy/admission/), the operator never writes one.
        @kopf.on.validate(*FTJ, id=ADMISSION_ID, operations=["CREATE", "UPDATE"], registry=registry)
        async def validate(operation: Optional[str], new: Any, old: Any, userinfo: Any, **_: Any) -> None:
            new_body = plain(new) if new is not None else None
            error = review_error(operation, new_body, plain(old) if old is not None else None)
            if error:
                raise kopf.AdmissionError(error, code=422)
            if operation == "CREATE" and new_body is not None:  # the spec cannot change later
                job = parse_object(new_body, "FineTuneJob")
                try:
                    refused = await TenancyCheck(state.kube.create, config.tenancy).errors(job, dict(userinfo or {}))
                except ApiError as err:  # cannot ask: refuse (failurePolicy Fail would too)
                    raise kopf.AdmissionError(f"cannot check the requester's rights (SubjectAccessReview: {err}); try again", code=503)
                if refused:
                    raise kopf.AdmissionError("; ".join(refused), code=403)

    return registry
