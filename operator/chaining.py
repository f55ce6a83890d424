"""Chained resources react when what they reference changes, not at their next poll.

A FineTuneJob with spec.fineTuneJob, an EvalJob of a FineTuneJob and a ModelDeployment of a
FineTuneJob (or gated by an EvalJob, spec.promotion) wait for that object. Rather than each
waiting resource reading its reference every interval:

- three kopf indexes (`kopf.index`) map each reference, (namespace, kind, name), to the names of
  the resources waiting on it; kopf keeps them from its watches (an object's entries are
  replaced on each of its events and dropped when it is deleted);
- an event handler on FineTuneJobs and one on EvalJobs notice when an object's status.phase (or
  uid) changes, or it appears or is deleted, and wake what waits on it at once: a FineTuneJob
  starts (or fails) right away (handlers.py), an EvalJob or ModelDeployment is reconciled now
  (pipeline_handlers.py);
- a waiting resource is still looked at every `reference_poll` seconds
  (KUBETUNE_REFERENCE_POLL_SECONDS), so an event missed never strands it.

Waking writes nothing to the waiting resource; a lock per resource keeps a wake-up and kopf's
own handler from starting it twice.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Iterable, Optional

import kopf

from kubetune.operator.api import GROUP, VERSION
from kubetune.operator.api.common import TERMINAL_PHASES

FTJ = (GROUP, VERSION, "finetunejobs")
EVJ = (GROUP, VERSION, "evaljobs")
MDEP = (GROUP, VERSION, "modeldeployments")
# The indexes' ids: kopf passes each index to every handler as a keyword argument of that name.
FINETUNEJOBS_WAITING = "finetunejobs_waiting"
EVALJOBS_WAITING = "evaljobs_waiting"
MODELDEPLOYMENTS_WAITING = "modeldeployments_waiting"
log = logging.getLogger("kubetune.operator.chaining")

Ref = tuple[Optional[str], str, str]  # (namespace, kind, name) of a referenced object


def _fields(body: Any) -> tuple[Optional[str], str, dict[str, Any], dict[str, Any]]:
    meta = body.get("metadata") or {}
    return meta.get("namespace"), meta.get("name", ""), dict(body.get("spec") or {}), dict(body.get("status") or {})


def finetunejob_waits_on(body: Any) -> dict[Ref, str]:
    """{the FineTuneJob it starts from: its name} while it has not resolved that reference (no
    status.baseModel) nor ended; {} otherwise (an empty mapping clears its index entries)."""
    ns, name, spec, status = _fields(body)
    ref = (spec.get("fineTuneJob") or {}).get("name")
    if not ref or status.get("baseModel") or status.get("workload") or status.get("phase") in TERMINAL_PHASES:
        return {}
    return {(ns, "FineTuneJob", ref): name}


def evaljob_waits_on(body: Any) -> dict[Ref, str]:
    """{its FineTuneJob: its name} until its eval Job exists (a started EvalJob never looks back)."""
    ns, name, spec, status = _fields(body)
    ref = (spec.get("fineTuneJob") or {}).get("name")
    if not ref or status.get("workload") or status.get("phase") in TERMINAL_PHASES:
        return {}
    return {(ns, "FineTuneJob", ref): name}


def modeldeployment_waits_on(body: Any) -> dict[Ref, str]:
    """Its FineTuneJob and its promotion's EvalJob, always: a deployment follows a re-run of its
    FineTuneJob, and a new EvalJob result may promote a held model."""
    ns, name, spec, _ = _fields(body)
    refs: dict[Ref, str] = {}
    if (spec.get("fineTuneJob") or {}).get("name"):
        refs[(ns, "FineTuneJob", spec["fineTuneJob"]["name"])] = name
    if (spec.get("promotion") or {}).get("evalJob"):
        refs[(ns, "EvalJob", spec["promotion"]["evalJob"])] = name
    return refs


class Changes:
    """Which referenced objects changed in a way that matters to what waits on them: a new
    status.phase, another uid (deleted and made again), first seen, deleted."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, Optional[str], str], tuple[Any, Any]] = {}

    def changed(self, kind: str, type_: Optional[str], body: Any) -> bool:
        ns, name, _, status = _fields(body)
        key = (kind, ns, name)
        if type_ == "DELETED":
            self.seen.pop(key, None)
            return True
        now = ((body.get("metadata") or {}).get("uid"), status.get("phase"))
        before, self.seen[key] = self.seen.get(key), now
        return before != now


def waiting_on(index: Any, ref: Ref) -> set[str]:
    """Names in a kopf index under `ref` (none if the key is absent)."""
    store = index.get(ref) if index is not None else None
    return set(store) if store is not None else set()


def register(
    registry: kopf.OperatorRegistry,
    *,
    wake_finetunejobs: Callable[[Optional[str], Iterable[str]], Awaitable[None]],
    wake_pipeline: Callable[[Iterable[tuple[str, Optional[str], str]]], Awaitable[None]],
) -> Changes:
    """The indexes of waiting resources and the handlers that wake them. wake_finetunejobs(ns,
    names) starts FineTuneJobs; wake_pipeline([(kind, ns, name)]) reconciles EvalJobs and
    ModelDeployments now."""
    changes = Changes()

    @kopf.index(*FTJ, id=FINETUNEJOBS_WAITING, registry=registry)
    async def finetunejobs_waiting(body: Any, **_: Any) -> dict[Ref, str]:
        return finetunejob_waits_on(body)

    @kopf.index(*EVJ, id=EVALJOBS_WAITING, registry=registry)
    async def evaljobs_waiting(body: Any, **_: Any) -> dict[Ref, str]:
        return evaljob_waits_on(body)

    @kopf.index(*MDEP, id=MODELDEPLOYMENTS_WAITING, registry=registry)
    async def modeldeployments_waiting(body: Any, **_: Any) -> dict[Ref, str]:
        return modeldeployment_waits_on(body)

    async def wake(kind: str, type_: Optional[str], body: Any, indices: dict[str, Any]) -> None:
        if not changes.changed(kind, type_, body):
            return
        ns, name, _, _ = _fields(body)
        ref = (ns, kind, name)
        finetunejobs = waiting_on(indices.get(FINETUNEJOBS_WAITING), ref)
        pipeline = [("EvalJob", ns, n) for n in sorted(waiting_on(indices.get(EVALJOBS_WAITING), ref))]
        pipeline += [("ModelDeployment", ns, n) for n in sorted(waiting_on(indices.get(MODELDEPLOYMENTS_WAITING), ref))]
        if not finetunejobs and not pipeline:
            return
        log.debug("%s %s/%s changed: waking %s", kind, ns, name, sorted(finetunejobs) + [f"{k}/{n}" for k, _, n in pipeline])
        results = await asyncio.gather(wake_finetunejobs(ns, sorted(finetunejobs)), wake_pipeline(pipeline), return_exceptions=True)
        for result in results:  # the slow poll picks up what a failed wake-up left
            if isinstance(result, Exception):
                log.warning("waking what waits on %s %s/%s failed, the next poll retries: %s", kind, ns, name, result)

    @kopf.on.event(*FTJ, registry=registry)
    async def finetunejob_changed(type: Optional[str], body: Any, **kwargs: Any) -> None:
        await wake("FineTuneJob", type, body, kwargs)

    @kopf.on.event(*EVJ, registry=registry)
    async def evaljob_changed(type: Optional[str], body: Any, **kwargs: Any) -> None:
        await wake("EvalJob", type, body, kwargs)

    return changes
