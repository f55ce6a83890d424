"""Never train twice, never two workloads for one job (issue #26, behaviours 1, 2 and 5).

The operator records the workload's uid, backend and spec hash in status, never recreates a
workload that started or finished, adopts a child only when its owner and spec hash match, and
plans from the recorded backend forever after."""
from __future__ import annotations

import pytest

from kube_emulator import PYTORCHJOBS
from ophelpers import NS, eventually, manifest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

JOBS = "batch/v1/jobs"
CONFIGMAPS = "v1/configmaps"
JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs/tiny"


def job_posts(emulator) -> int:
    return sum(1 for r in emulator if r.method.value == "POST" and r.url.path.endswith("/jobs"))


async def test_status_records_the_workload_uid_backend_and_spec_hash(api, operator):
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("workload"), what="workload recorded")
    (job,) = api.children(JOBS)
    record = api.status("tiny")["workload"]
    assert record["uid"] == job["metadata"]["uid"] and record["backend"] == "job" and len(record["specHash"]) == 16
    for child in api.children(JOBS) + api.children(CONFIGMAPS) + api.children("v1/services"):
        assert child["metadata"]["annotations"]["kubetune.dev/spec-hash"] == record["specHash"]


async def test_a_started_job_that_vanishes_is_not_recreated(api, operator, emulator):
    """ttlSecondsAfterFinished: 0 deletes a finished Job at once, maybe before a sync saw it finish."""
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending")
        await api.patch(f"{JOB_PATH}/status", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}})
        await eventually(lambda: api.status("tiny").get("phase") == "Running", what="Running")
        await api.delete(JOB_PATH)
        await eventually(lambda: api.status("tiny").get("phase") == "Failed", what="the run ends")
        posts = job_posts(emulator)
        await eventually(lambda: any(e.get("reason") == "WorkloadDeleted" for e in api.children("v1/events")), what="event")
    assert not api.children(JOBS) and job_posts(emulator) == posts == 1
    failed = next(c for c in api.status("tiny")["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "WorkloadDeleted" and "not recreated" in failed["message"]


async def test_a_job_finished_and_deleted_while_the_operator_was_down_is_not_recreated(api, operator, emulator):
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending")
        await api.patch(f"{JOB_PATH}/status", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}})
        await eventually(lambda: api.status("tiny").get("phase") == "Running", what="Running")
    await api.patch(f"{JOB_PATH}/status", {"status": {"active": 0, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
    await api.delete(JOB_PATH)
    async with operator():
        await eventually(lambda: api.status("tiny").get("phase") == "Failed", what="the run ends on resume")
    assert not api.children(JOBS) and job_posts(emulator) == 1
    assert any(e.get("reason") == "WorkloadDeleted" for e in api.children("v1/events"))


async def test_a_job_deleted_before_it_started_is_recreated_once(api, operator, emulator):
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending")
        first = api.status("tiny")["workload"]["uid"]
        await api.delete(JOB_PATH)
        await eventually(lambda: api.status("tiny")["workload"]["uid"] != first, what="recreated and recorded")
        (job,) = api.children(JOBS)
        assert job["metadata"]["uid"] == api.status("tiny")["workload"]["uid"]
        assert api.status("tiny")["phase"] == "Pending"


async def test_a_restart_after_the_training_operator_appears_plans_no_second_workload(api, operator, emulator):
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("workload"), what="Job created")
    emulator.declare(PYTORCHJOBS)  # the Kubeflow training-operator installed meanwhile
    configmap_posts = sum(1 for r in emulator if r.method.value == "POST" and r.url.path.endswith("/configmaps"))
    async with operator():
        await eventually(
            lambda: sum(1 for r in emulator if r.method.value == "POST" and r.url.path.endswith("/configmaps")) > configmap_posts,
            what="the restarted operator to re-ensure the children",
        )
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="synced")
    assert not api.children("kubeflow.org/v1/pytorchjobs")
    assert len(api.children(JOBS)) == 1 and api.status("tiny")["workload"]["backend"] == "job"


async def test_a_recreated_job_of_the_same_name_does_not_adopt_the_old_children(api, operator):
    """Deleted with orphan propagation and created again with a new config: the old run's
    children carry our labels but not the new object's uid."""
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: len(api.children(JOBS)) == 1)
    (old_job,) = api.children(JOBS)
    orphan = {k: v for k, v in old_job.items() if k != "status"}
    orphan["metadata"] = {k: v for k, v in old_job["metadata"].items() if k in ("name", "namespace", "labels", "annotations")}
    await api.delete(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/tiny")
    await eventually(lambda: not api.children(JOBS))
    await api.post(f"/apis/batch/v1/namespaces/{NS}/jobs", orphan)  # what orphan propagation leaves
    async with operator():
        await api.create_ftj(manifest(**{"spec.config.max_steps": 7}))
        await eventually(lambda: any(c["reason"] == "NameConflict" for c in api.status("tiny").get("conditions", [])), what="NameConflict")
    message = next(c["message"] for c in api.status("tiny")["conditions"] if c["reason"] == "NameConflict")
    assert "Job tiny already exists and does not belong to this resource" in message
    assert not api.status("tiny").get("workload")


async def test_a_child_rejected_by_the_api_fails_the_job_with_the_apis_message(api, operator, emulator):
    emulator.fail("POST", r"/jobs$", 422, times=1, message='Job.batch "tiny" is invalid: spec.template.spec.containers[0].resources.requests[memory]: Invalid value: "32GB"')
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Failed", what="Failed")
    failed = next(c for c in api.status("tiny")["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ChildRejected" and 'Invalid value: "32GB"' in failed["message"]
    assert [status for _, _, status in emulator.hits] == [422]  # not retried: it cannot succeed


async def test_a_forbidden_child_is_retried_under_a_condition_naming_the_permission(api, operator, emulator):
    emulator.fail("POST", r"/jobs$", 403, times=3)  # e.g. RBAC without create on batch jobs
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: any(c.get("reason") == "Forbidden" for c in api.status("tiny").get("conditions", [])), what="Forbidden")
        cond = next(c for c in api.status("tiny")["conditions"] if c["type"] == "Created")
        assert cond["status"] == "False" and "`create` on `jobs.batch`" in cond["message"] and NS in cond["message"]
        await eventually(lambda: api.status("tiny").get("phase") == "Pending" and len(api.children(JOBS)) == 1, what="created once granted")
    assert [status for _, _, status in emulator.hits] == [403, 403, 403]
    assert sum(1 for e in api.children("v1/events") if e.get("reason") == "Forbidden") == 1


async def test_owner_references_permission_enforcement_names_the_finalizers_permission(api, operator, emulator):
    """OpenShift's default admission plugin; the emulator enforces it as kube-apiserver's
    plugin/pkg/admission/gc does (kube_emulator.Emulator.enforce_owner_references)."""
    emulator.enforce_owner_references(allowed=False)
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: any(c.get("reason") == "Forbidden" for c in api.status("tiny").get("conditions", [])), what="Forbidden")
        message = next(c["message"] for c in api.status("tiny")["conditions"] if c["type"] == "Created")
        assert "`update` on `finetunejobs/finalizers`" in message and "kubetune.dev" in message
        emulator.enforce_owner_references(allowed=True)  # the platform team grants it
        await eventually(lambda: len(api.children(JOBS)) == 1 and api.status("tiny").get("phase") == "Pending", what="created")
