"""What a real cluster tells only through pods and events, and a truthful observedGeneration
(issue #26, behaviours 4, 6 and 7), over real HTTP against the emulator."""
from __future__ import annotations

import pytest

from ophelpers import NS, eventually, manifest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

JOBS = "batch/v1/jobs"
FTJ_PATH = f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/tiny"
PODS = f"/api/v1/namespaces/{NS}/pods"


def condition(api, type_: str) -> dict:
    return next((c for c in api.status("tiny").get("conditions", []) if c["type"] == type_), {})


def job_pod(job: dict, name: str = "tiny-0-abcde", **status) -> dict:
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"], "uid": job["metadata"]["uid"], "controller": True}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "ownerReferences": [owner],
                     "labels": {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-completion-index": "0"}},
        "spec": {"containers": [{"name": "trainer", "image": "x"}]},
    }


def warning(obj: dict, reason: str, message: str) -> dict:
    meta = obj["metadata"]
    return {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{meta['name']}.{reason.lower()}", "namespace": NS},
        "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"], "namespace": NS, "uid": meta["uid"]},
        "type": "Warning", "reason": reason, "message": message, "lastTimestamp": "2026-01-01T00:00:00Z",
    }


async def test_an_unschedulable_pod_surfaces_its_reason_and_the_fix(api, operator):
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending")
        (job,) = api.children(JOBS)
        pod = await api.post(PODS, job_pod(job))
        await api.patch(f"{PODS}/{pod['metadata']['name']}/status", {"status": {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available"}]}})
        await eventually(lambda: condition(api, "Stalled")["status"] == "True", what="Stalled")
        stalled = condition(api, "Stalled")
        assert stalled["reason"] == "Unschedulable" and "4 Insufficient nvidia.com/gpu" in stalled["message"]
        assert "spec.resources.gpusPerNode" in stalled["message"]  # the fix
        await eventually(lambda: any(e.get("reason") == "Unschedulable" and e.get("type") == "Warning" for e in api.children("v1/events")), what="event")
        assert api.status("tiny")["phase"] == "Pending"


async def test_quota_and_volume_rejections_come_from_events(api, operator):
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending")
        (job,) = api.children(JOBS)
        quota = ('pods "tiny-0-x" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1, '
                 "used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8")
        await api.post(f"/api/v1/namespaces/{NS}/events", warning(job, "FailedCreate", f"Error creating: {quota}"))
        await eventually(lambda: condition(api, "Stalled")["reason"] == "QuotaExceeded", what="QuotaExceeded")
        assert "exceeded quota: gpu-quota" in condition(api, "Stalled")["message"]

    # a pod that was created but cannot attach its ReadWriteOnce claim on a second node
    async with operator():
        pod = await api.post(PODS, job_pod(job, name="tiny-0-xyz"))
        attach = 'Multi-Attach error for volume "pvc-1234" Volume is already used by pod(s) other-0'
        await api.post(f"/api/v1/namespaces/{NS}/events", {**warning(pod, "FailedAttachVolume", attach), "lastTimestamp": "2026-01-01T00:05:00Z"})
        await eventually(lambda: condition(api, "Stalled")["reason"] == "VolumeMultiAttach", what="VolumeMultiAttach")
        assert "ReadWriteMany" in condition(api, "Stalled")["message"]


async def test_a_spec_change_that_does_not_reach_the_children_leaves_observed_generation_behind(api, operator):
    """The CRD's CEL rule refuses such a change on a real API server (the emulator does not run
    CEL: tests/operator/test_crd_cel.py does); should one get through, status must not claim it."""
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("observedGeneration") == 1)
        await api.patch(FTJ_PATH, {"spec": {"image": "ghcr.io/kubetune/trainer:9.9.9"}})
        await eventually(lambda: condition(api, "SpecApplied")["status"] == "False", what="SpecApplied=False")
        assert api.ftj("tiny")["metadata"]["generation"] == 2 and api.status("tiny")["observedGeneration"] == 1
        assert api.children(JOBS)[0]["spec"]["template"]["spec"]["containers"][0]["image"] != "ghcr.io/kubetune/trainer:9.9.9"
        assert "create a new FineTuneJob" in condition(api, "SpecApplied")["message"]
        # suspend does reach the workload: then the generation is observed
        assert "image" not in manifest()["spec"]
        await api.patch(FTJ_PATH, {"spec": {"image": None, "suspend": True}})  # merge patch: revert (remove) the image, suspend
        await eventually(lambda: api.children(JOBS)[0]["spec"]["suspend"] is True, what="suspended")
        await eventually(lambda: api.status("tiny")["observedGeneration"] == api.ftj("tiny")["metadata"]["generation"], what="generation observed")
        await eventually(lambda: condition(api, "SpecApplied")["status"] == "True", what="SpecApplied again after the revert")
    assert sum(1 for e in api.children("v1/events") if e.get("reason") == "SpecChangeIgnored") == 1


async def test_the_created_job_is_burstable_with_bounded_scratch(api, operator):
    async with operator(cpu_per_gpu="3", memory_per_gpu="24Gi"):
        await api.create_ftj(manifest(**{"spec.resources": {"gpusPerNode": 2}}))
        await eventually(lambda: len(api.children(JOBS)) == 1)
    pod = api.children(JOBS)[0]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "6", "memory": "48Gi", "nvidia.com/gpu": "2"}
    assert {v["name"]: v for v in pod["volumes"]}["tmp"]["emptyDir"]["sizeLimit"] == "50Gi"
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
