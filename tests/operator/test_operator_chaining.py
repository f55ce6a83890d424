"""Chained resources react to what they reference at once (operator/chaining.py), against the
emulator over real HTTP: a FineTuneJob from another's output, an EvalJob and a ModelDeployment of
a FineTuneJob start within a moment of its turning Succeeded while their polls are set far longer
(so polling could not explain it) and read nothing while they wait; a failed or deleted
reference still fails them; an event the operator never saw is caught by the slow poll."""
from __future__ import annotations

import asyncio
import time

import pytest

from ophelpers import NS, eventually
from test_operator_pipeline import KT, chained, condition, evaljob, finetunejob, modeldeployment, no_children, status

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

PROMPT = 2.0  # seconds from the reference's change to the dependent's reaction; the polls are 30-60 s


def reads_of(emulator, name: str) -> int:
    """GETs of one FineTuneJob (kopf watches the collection; only a reference check reads one)."""
    return sum(1 for r in emulator if r.method.value == "GET" and r.url.path == f"{KT}/finetunejobs/{name}")


def workload_named(api, plural: str, name: str):
    return next((c for c in api.children(plural) if c["metadata"]["name"] == name), None)


async def succeed(api, name: str = "tiny", **result) -> float:
    """What the FineTuneJob's sync writes when its trainer finished (phase and result in one patch);
    the time it was written."""
    await eventually(lambda: status(api, "finetunejobs", name).get("phase") == "Pending", what=f"{name} reconciled")
    await api.patch(f"{KT}/finetunejobs/{name}/status", {"status": {"phase": "Succeeded", "result": {
        "adapter": "/mnt/output/adapter", "checkpoint": "/mnt/output/tiny/model", **result}}})
    return time.monotonic()


async def test_a_chained_finetunejob_starts_the_moment_its_reference_succeeds(api, operator):
    async with operator(sync_interval=30, reference_poll=30):
        await api.create_ftj(finetunejob())
        await api.create_ftj(chained())
        await eventually(lambda: condition(api, "finetunejobs", "instruct", "ModelReady").get("reason") == "WaitingForFineTuneJob", what="waiting")
        assert no_children(api, "instruct")

        written = await succeed(api)
        await eventually(lambda: workload_named(api, "batch/v1/jobs", "instruct"), timeout=PROMPT, what="instruct's Job within 2 s")
        elapsed = time.monotonic() - written
        await eventually(lambda: status(api, "finetunejobs", "instruct").get("workload"), timeout=PROMPT, what="status.workload")
        st = status(api, "finetunejobs", "instruct")
        assert st["baseModel"] == "pvc://outputs/tiny/model" and st["phase"] == "Pending" and elapsed < PROMPT
        assert condition(api, "finetunejobs", "instruct", "ModelReady")["status"] == "True"
        assert len([j for j in api.children("batch/v1/jobs") if j["metadata"]["name"] == "instruct"]) == 1
        await eventually(lambda: "Created" in {e.get("reason") for e in api.children("v1/events")
                                               if e.get("involvedObject", {}).get("name") == "instruct"}, what="Created event")


async def test_a_failed_or_deleted_reference_fails_the_chained_finetunejob_at_once(api, operator):
    async with operator(sync_interval=30, reference_poll=30):
        await api.create_ftj(finetunejob())
        await api.create_ftj(chained())
        await api.create_ftj(finetunejob(**{"metadata.name": "other"}))
        await api.create_ftj(chained("after-other", ref="other"))
        for name in ("instruct", "after-other"):
            await eventually(lambda: condition(api, "finetunejobs", name, "ModelReady").get("reason") == "WaitingForFineTuneJob", what=f"{name} waiting")
        for name in ("tiny", "other"):  # their own reconcile done (its status patch would undo the test's)
            await eventually(lambda: status(api, "finetunejobs", name).get("phase") == "Pending", what=f"{name} reconciled")

        await api.patch(f"{KT}/finetunejobs/tiny/status", {"status": {"phase": "Failed", "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "the trainer ran out of memory"}]}})
        await eventually(lambda: status(api, "finetunejobs", "instruct").get("phase") == "Failed", timeout=PROMPT, what="Failed within 2 s")
        failed = condition(api, "finetunejobs", "instruct", "Failed")
        assert failed["reason"] == "FineTuneJobFailed" and "the trainer ran out of memory" in failed["message"]

        await api.delete(f"{KT}/finetunejobs/other")
        await eventually(lambda: status(api, "finetunejobs", "after-other").get("phase") == "Failed", timeout=PROMPT, what="deleted -> Failed")
        assert "FineTuneJob other was deleted" in condition(api, "finetunejobs", "after-other", "Failed")["message"]
        assert no_children(api, "instruct") and no_children(api, "after-other")


async def test_evaljob_and_modeldeployment_wait_without_reading_and_start_when_it_succeeds(api, operator, emulator):
    async with operator(sync_interval=0.3, reference_poll=60):
        await api.create_ftj(finetunejob())
        await api.post(f"{KT}/evaljobs", evaljob())
        await api.post(f"{KT}/modeldeployments", modeldeployment())
        await eventually(lambda: status(api, "finetunejobs", "tiny").get("phase") == "Pending", what="tiny reconciled")
        for plural, name in (("evaljobs", "tiny-eval"), ("modeldeployments", "bot")):
            await eventually(lambda: condition(api, plural, name, "ModelReady").get("reason") == "WaitingForFineTuneJob", what=f"{name} waiting")
        await asyncio.sleep(0.5)  # reconciles already under way end (tiny's Pending wakes them once)
        before = reads_of(emulator, "tiny")
        await asyncio.sleep(2.0)  # about 7 rounds of the pipeline reconciler
        assert reads_of(emulator, "tiny") == before, "a waiting EvalJob or ModelDeployment read its FineTuneJob every round"

        written = await succeed(api)
        await eventually(lambda: workload_named(api, "batch/v1/jobs", "tiny-eval") and workload_named(api, "apps/v1/deployments", "bot"),
                         timeout=PROMPT, what="eval Job and server Deployment within 2 s")
        assert time.monotonic() - written < PROMPT
        await eventually(lambda: status(api, "evaljobs", "tiny-eval").get("workload"), what="EvalJob status")
        assert len([j for j in api.children("batch/v1/jobs") if j["metadata"]["name"] == "tiny-eval"]) == 1


async def test_a_missed_event_is_caught_by_the_slow_poll(api, operator, emulator):
    """The reference's status changes in the store without a watch event (an operator that was
    not watching then): the waiting FineTuneJob and EvalJob start at their next poll."""
    async with operator(sync_interval=0.2, reference_poll=1.5) as state:
        await api.create_ftj(finetunejob())
        await api.create_ftj(chained())
        await api.post(f"{KT}/evaljobs", evaljob())
        await eventually(lambda: condition(api, "finetunejobs", "instruct", "ModelReady").get("reason") == "WaitingForFineTuneJob", what="waiting")
        await eventually(lambda: condition(api, "evaljobs", "tiny-eval", "ModelReady").get("reason") == "WaitingForFineTuneJob", what="eval waiting")
        await eventually(lambda: status(api, "finetunejobs", "tiny").get("phase") == "Pending", what="tiny reconciled")

        emulator.objects["kubetune.dev/v1alpha1/finetunejobs", NS, "tiny"].patch(
            {"status": {"phase": "Succeeded", "result": {"adapter": "/mnt/output/adapter", "checkpoint": "/mnt/output/tiny/model"}}})
        await eventually(lambda: workload_named(api, "batch/v1/jobs", "instruct") and workload_named(api, "batch/v1/jobs", "tiny-eval"),
                         timeout=5, what="both started by the poll")
        await eventually(lambda: status(api, "finetunejobs", "instruct").get("baseModel") == "pvc://outputs/tiny/model", what="status.baseModel")
        assert state.jobs[(NS, "tiny")]["status"]["phase"] == "Pending", "the operator saw the change: no event was missed"


async def test_a_woken_job_whose_workload_cannot_be_made_yet_is_retried_not_stranded(api, operator, emulator):
    """The reference succeeded, the wake-up resolved it, but the API refused the Job twice (500):
    kopf's handler ended long ago, so the operator's own retry makes it, once."""
    async with operator(sync_interval=0.2, reference_poll=30):
        await api.create_ftj(finetunejob())
        await api.create_ftj(chained())
        await eventually(lambda: condition(api, "finetunejobs", "instruct", "ModelReady").get("reason") == "WaitingForFineTuneJob", what="waiting")
        await eventually(lambda: status(api, "finetunejobs", "tiny").get("workload"), what="tiny's own Job made")
        emulator.fail("POST", f"/apis/batch/v1/namespaces/{NS}/jobs$", 500, times=2)
        await succeed(api)
        await eventually(lambda: status(api, "finetunejobs", "instruct").get("workload"), timeout=5, what="workload after the retries")
        assert [h for h in emulator.hits if h[0] == "POST"] and len(emulator.hits) == 2
        assert len([j for j in api.children("batch/v1/jobs") if j["metadata"]["name"] == "instruct"]) == 1
        assert status(api, "finetunejobs", "instruct")["baseModel"] == "pvc://outputs/tiny/model"
