"""Pod faults as the kubelet and the scheduler report them (issue #25): a failed rank, an OOM-killed
pod, an image that cannot be pulled, an unschedulable pod. Each test sets the pod's status over
HTTP, as the kubelet would, and reads the FineTuneJob's conditions: they name which fault, the
reason and the fix. (The unschedulable pod with no GPU node: test_operator_conditions.py.)"""
from __future__ import annotations

import pytest

from ophelpers import NS, eventually, manifest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

JOBS = "batch/v1/jobs"
JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs/tiny"
PODS = f"/api/v1/namespaces/{NS}/pods"
BACKOFF = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}


def condition(api, type_: str) -> dict:
    return next((c for c in api.status("tiny").get("conditions", []) if c["type"] == type_), {})


def rank_pod(job: dict, rank: int, name: str) -> dict:
    """A pod of the indexed Job, as the Job controller makes it."""
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"], "uid": job["metadata"]["uid"], "controller": True}
    index = {"batch.kubernetes.io/job-completion-index": str(rank)}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "ownerReferences": [owner], "annotations": index,
                     "labels": {**job["spec"]["template"]["metadata"]["labels"], **index}},
        "spec": {"containers": [{"name": "trainer", "image": "x"}]},
    }


def terminated(exit_code: int, reason: str, finished: str, message: str = "") -> dict:
    state = {"exitCode": exit_code, "reason": reason, "startedAt": "2026-01-01T00:00:00Z", "finishedAt": finished}
    if message:
        state["message"] = message
    return {"status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "state": {"terminated": state}}]}}


async def two_rank_job(api) -> dict:
    await api.create_ftj(manifest(**{"spec.resources": {"nodes": 2, "gpusPerNode": 1}}))
    await eventually(lambda: api.status("tiny").get("phase") == "Pending")
    (job,) = api.children(JOBS)
    return job


async def fail(api, job: dict, pods: dict[str, dict]) -> None:
    """The pods end as given (pod name -> status), then the Job controller gives up."""
    for rank, (name, status) in enumerate(pods.items()):
        await api.post(PODS, rank_pod(job, rank, name))
        await api.patch(f"{PODS}/{name}/status", status)
    await api.patch(f"{JOB_PATH}/status", {"status": {"failed": 2, "startTime": "2026-01-01T00:00:00Z", "conditions": [BACKOFF]}})
    await eventually(lambda: api.status("tiny").get("phase") == "Failed", what="Failed")


async def test_an_oom_killed_rank_is_named_with_the_fix(api, operator):
    async with operator():
        job = await two_rank_job(api)
        await fail(api, job, {
            # rank 1 was OOM-killed first; torchrun then stopped rank 0 (SIGTERM: 143), collateral
            "tiny-0-aaaaa": terminated(143, "Error", "2026-01-01T00:10:05Z"),
            "tiny-1-bbbbb": terminated(137, "OOMKilled", "2026-01-01T00:10:00Z"),
        })
    failed = condition(api, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "OOMKilled"
    assert "rank 1 (pod tiny-1-bbbbb" in failed["message"] and "exit 137" in failed["message"]
    assert "spec.resources.limits.memory" in failed["message"] and "batch_size" in failed["message"]  # the fix
    assert "BackoffLimitExceeded" in failed["message"]  # and what the Job said
    events = [e for e in api.children("v1/events") if e.get("reason") == "OOMKilled"]
    assert events and events[0]["type"] == "Warning"


async def test_a_failed_rank_is_named_with_its_exit_code_and_last_words(api, operator):
    async with operator():
        job = await two_rank_job(api)
        await fail(api, job, {
            "tiny-0-aaaaa": terminated(1, "Error", "2026-01-01T00:10:00Z", message="Traceback ...\nRuntimeError: NCCL error: unhandled system error"),
            "tiny-1-bbbbb": terminated(143, "Error", "2026-01-01T00:10:03Z"),
        })
    failed = condition(api, "Failed")
    assert failed["reason"] == "RankFailed"
    message = failed["message"]
    assert "rank 0 (pod tiny-0-aaaaa" in message and "exited with code 1" in message
    assert "RuntimeError: NCCL error" in message and "kubectl logs tiny-0-aaaaa -c trainer" in message


async def test_a_job_that_failed_without_pods_keeps_the_jobs_own_reason(api, operator):
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending")
        await api.patch(f"{JOB_PATH}/status", {"status": {"failed": 1, "conditions": [BACKOFF]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Failed")
    assert condition(api, "Failed")["reason"] == "BackoffLimitExceeded"


@pytest.mark.parametrize("reason", ["ImagePullBackOff", "ErrImagePull"])
async def test_an_image_that_cannot_be_pulled_stalls_the_job_naming_the_image(api, operator, reason):
    image = "ghcr.io/example/trainer:does-not-exist"
    async with operator():
        await api.create_ftj(manifest(**{"spec.image": image}))
        await eventually(lambda: api.status("tiny").get("phase") == "Pending")
        (job,) = api.children(JOBS)
        await api.post(PODS, rank_pod(job, 0, "tiny-0-aaaaa"))
        waiting = {"reason": reason, "message": f'Back-off pulling image "{image}"'}
        await api.patch(f"{PODS}/tiny-0-aaaaa/status", {"status": {"phase": "Pending", "containerStatuses": [
            {"name": "trainer", "ready": False, "restartCount": 0, "image": image, "state": {"waiting": waiting}}]}})
        await eventually(lambda: condition(api, "Stalled").get("status") == "True", what="Stalled")
        stalled = condition(api, "Stalled")
        assert stalled["reason"] == reason and image in stalled["message"]
        assert "spec.image" in stalled["message"] and "pull secrets" in stalled["message"]
        assert api.status("tiny")["phase"] == "Pending"  # not failed: fixing the image or the secret lets it run
        await eventually(lambda: any(e.get("reason") == reason and e.get("type") == "Warning" for e in api.children("v1/events")), what="event")
