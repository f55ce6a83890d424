"""The JobSet and TrainJob backends through the operator, over real HTTP against the emulator:
`auto` picks by what the API serves; the FineTuneJob's status mirrors each backend's own status;
a restart shows in status.restarts and status.resumedFromStep; GPU time adds up in gpuSeconds.

The emulator stores JobSets and TrainJobs but runs no controller: each test patches their status
and creates their pods as the JobSet controller and the Kubeflow Trainer would (labels from
JobSet v0.12's API: jobset-name, jobset-uid, restart-attempt; completion-index annotations of
the indexed Jobs inside)."""
from __future__ import annotations

import datetime as dt

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kube_emulator import JOBSETS, PYTORCHJOBS, TRAINJOBS
from ophelpers import NS, REPO, eventually, manifest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

JOBSET_PATH = f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets"
TRAINJOB_PATH = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
PODS = f"/api/v1/namespaces/{NS}/pods"


async def install_runtime(api) -> None:
    (runtime,) = [d for d in yaml.safe_load_all((REPO / "examples" / "kubeflow" / "clustertrainingruntime.yaml").read_text()) if d]
    await api.post("/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes", runtime)


def ago(seconds: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def jobset_pod(workload: dict, name: str, *, port: int, restart: int = 0, gpus: int = 0, started: str = None) -> dict:
    """Pod 0 of the JobSet's indexed Job `<jobset>-node-0`, as its controllers make it."""
    template = workload["spec"]["replicatedJobs"][0]["template"]["spec"]["template"] if workload["kind"] == "JobSet" else {"metadata": {"labels": {"kubetune.dev/job": "tiny", "app.kubernetes.io/managed-by": "kubetune"}}}
    jobset_name = workload["metadata"]["name"]
    labels = {
        **template["metadata"]["labels"],
        "jobset.sigs.k8s.io/jobset-name": jobset_name,
        "jobset.sigs.k8s.io/jobset-uid": workload["metadata"]["uid"] if workload["kind"] == "JobSet" else "uid-of-the-trainers-jobset",
        "jobset.sigs.k8s.io/restart-attempt": str(restart),
        "batch.kubernetes.io/job-completion-index": "0",
    }
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": f"{jobset_name}-node-0", "uid": f"job-uid-{restart}", "controller": True}
    container = {"name": "trainer", "image": "x", "ports": [{"name": "metrics", "containerPort": port}]}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels, "ownerReferences": [owner],
                     "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
        "spec": {"containers": [container]},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
                   "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": started or ago(1)}}}]},
    }


class Rank0:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.gauges = {n: Gauge(f"kubetune_train_{n}", n, registry=self.registry) for n in ("step", "total_steps", "last_checkpoint_step")}
        self.server, _ = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.port = self.server.server_port

    def set(self, **values):
        for name, value in values.items():
            self.gauges[name].set(value)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def rank0():
    server = Rank0()
    yield server
    server.close()


# --- auto --------------------------------------------------------------------------------------


async def test_auto_takes_the_trainjob_when_trainer_v2_and_the_runtime_are_there(api, operator, emulator):
    emulator.declare({**PYTORCHJOBS, **JOBSETS, **TRAINJOBS})
    await install_runtime(api)
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("workload", {}).get("kind") == "TrainJob", what="TrainJob")
    (train,) = api.children("trainer.kubeflow.org/v1alpha1/trainjobs")
    assert train["spec"]["runtimeRef"]["name"] == "kubetune-torch"
    assert not api.children("jobset.x-k8s.io/v1alpha2/jobsets") and not api.children("kubeflow.org/v1/pytorchjobs") and not api.children("batch/v1/jobs")


async def test_auto_passes_over_trainjob_without_its_runtime_to_jobset(api, operator, emulator):
    emulator.declare({**PYTORCHJOBS, **JOBSETS, **TRAINJOBS})  # Trainer v2 served, kubetune-torch not installed
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("workload", {}).get("kind") == "JobSet", what="JobSet")
    (jobset,) = api.children("jobset.x-k8s.io/v1alpha2/jobsets")
    assert jobset["metadata"]["ownerReferences"][0]["uid"] == api.ftj("tiny")["metadata"]["uid"]
    assert not api.children("trainer.kubeflow.org/v1alpha1/trainjobs")


# --- status mirroring ------------------------------------------------------------------------


async def test_jobset_status_drives_phase_suspend_and_failure(api, operator, emulator):
    emulator.declare(JOBSETS)
    path = f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/tiny"
    async with operator():
        await api.create_ftj(manifest(**{"spec.backend": "jobset"}))
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="Pending")
        await api.patch(f"{JOBSET_PATH}/tiny/status", {"status": {"restarts": 0, "replicatedJobsStatus": [
            {"name": "node", "ready": 1, "active": 1, "succeeded": 0, "failed": 0, "suspended": 0}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Running", what="Running from the JobSet")
        await api.patch(path, {"spec": {"suspend": True}})
        await eventually(lambda: api.children("jobset.x-k8s.io/v1alpha2/jobsets")[0]["spec"]["suspend"] is True, what="JobSet suspended")
        await api.patch(f"{JOBSET_PATH}/tiny/status", {"status": {"replicatedJobsStatus": [], "conditions": [
            {"type": "Suspended", "status": "True", "reason": "SuspendedJobs"}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Suspended", what="Suspended")
        await api.patch(f"{JOBSET_PATH}/tiny/status", {"status": {"conditions": [
            {"type": "Failed", "status": "True", "reason": "ReachedMaxRestarts", "message": "jobset failed due to reaching max number of restarts"}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Failed", what="Failed")
    failed = next(c for c in api.status("tiny")["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ReachedMaxRestarts" and "max number of restarts" in failed["message"] and "kubectl describe jobset tiny" in failed["message"]


async def test_trainjob_status_drives_phase_to_success(api, operator, emulator):
    emulator.declare(TRAINJOBS)
    await install_runtime(api)
    async with operator():
        await api.create_ftj(manifest(**{"spec.backend": "trainjob"}))
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="Pending")
        await api.patch(f"{TRAINJOB_PATH}/tiny/status", {"status": {"jobsStatus": [{"name": "node", "active": 1, "ready": 1}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Running", what="Running from the TrainJob")
        await api.patch(f"{TRAINJOB_PATH}/tiny/status", {"status": {"jobsStatus": [{"name": "node", "succeeded": 1}], "conditions": [
            {"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "jobs completed"}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Succeeded", what="Succeeded")


# --- restarts, resume, GPU time --------------------------------------------------------------


async def test_a_jobset_restart_shows_restarts_and_the_step_it_resumed_from(api, operator, emulator, rank0):
    emulator.declare(JOBSETS)
    async with operator():
        await api.create_ftj(manifest(**{"spec.backend": "jobset", "spec.output.source": "pvc://outputs/tiny", "spec.runPolicy": {"backoffLimit": 3}}))
        await eventually(lambda: api.status("tiny").get("workload"), what="JobSet created")
        (jobset,) = api.children("jobset.x-k8s.io/v1alpha2/jobsets")
        assert jobset["spec"]["failurePolicy"] == {"maxRestarts": 3, "restartStrategy": "Recreate"}
        assert "OutputPersistent" not in {c["type"] for c in api.status("tiny")["conditions"]}
        await api.post(PODS, jobset_pod(jobset, "tiny-node-0-0-a", port=rank0.port))
        rank0.set(step=45, total_steps=100, last_checkpoint_step=40)
        await api.patch(f"{JOBSET_PATH}/tiny/status", {"status": {"restarts": 0, "replicatedJobsStatus": [{"name": "node", "active": 1}]}})
        await eventually(lambda: api.status("tiny").get("progress", {}).get("lastCheckpointStep") == 40, what="checkpoint step scraped")
        assert not api.status("tiny").get("restarts")

        # A node died: the JobSet controller recreates the group (restart 1) and the trainer resumes.
        await api.delete(f"{PODS}/tiny-node-0-0-a")
        await api.post(PODS, jobset_pod(jobset, "tiny-node-0-0-b", port=rank0.port, restart=1))
        rank0.set(step=41)
        await api.patch(f"{JOBSET_PATH}/tiny/status", {"status": {"restarts": 1}})
        await eventually(lambda: api.status("tiny").get("restarts") == 1, what="restarts 1")
        assert api.status("tiny")["resumedFromStep"] == 40
        await eventually(lambda: any(e.get("reason") == "Restarted" and "resumes from step 40" in e.get("message", "") for e in api.children("v1/events")), what="Restarted event")


async def test_a_restart_with_an_emptydir_output_resumes_from_zero_and_the_job_says_so(api, operator, emulator, rank0):
    emulator.declare(TRAINJOBS)
    await install_runtime(api)
    async with operator():
        await api.create_ftj(manifest(**{"spec.backend": "trainjob"}))
        await eventually(lambda: api.status("tiny").get("workload"), what="TrainJob created")
        warning = next(c for c in api.status("tiny")["conditions"] if c["type"] == "OutputPersistent")
        assert warning["status"] == "False" and warning["reason"] == "EmptyDirOutput" and "pvc://" in warning["message"]
        (train,) = api.children("trainer.kubeflow.org/v1alpha1/trainjobs")
        rank0.set(step=12, total_steps=100, last_checkpoint_step=10)
        await api.post(PODS, jobset_pod(train, "tiny-node-0-0-a", port=rank0.port))
        await api.patch(f"{TRAINJOB_PATH}/tiny/status", {"status": {"jobsStatus": [{"name": "node", "active": 1}]}})
        await eventually(lambda: api.status("tiny").get("progress", {}).get("lastCheckpointStep") == 10, what="checkpoint step scraped")
        await api.delete(f"{PODS}/tiny-node-0-0-a")
        await api.post(PODS, jobset_pod(train, "tiny-node-0-0-b", port=rank0.port, restart=1))
        await eventually(lambda: api.status("tiny").get("restarts") == 1, what="restarts from the pods' restart attempt")
        assert api.status("tiny")["resumedFromStep"] == 0
        assert any(e.get("reason") == "EmptyDirOutput" for e in api.children("v1/events"))


async def test_gpu_seconds_add_up_the_pods_running_time_times_their_gpus(api, operator, emulator, rank0):
    emulator.declare(JOBSETS)
    async with operator():
        await api.create_ftj(manifest(**{"spec.backend": "jobset"}))
        await eventually(lambda: api.status("tiny").get("workload"), what="JobSet created")
        (jobset,) = api.children("jobset.x-k8s.io/v1alpha2/jobsets")
        started = ago(100)
        await api.post(PODS, jobset_pod(jobset, "tiny-node-0-0-a", port=rank0.port, gpus=2, started=started))
        impostor = jobset_pod(jobset, "impostor", port=rank0.port, gpus=8, started=ago(1000))
        impostor["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-uid"] = "someone-else"
        await api.post(PODS, impostor)
        await api.patch(f"{JOBSET_PATH}/tiny/status", {"status": {"replicatedJobsStatus": [{"name": "node", "active": 1}]}})
        first = await eventually(lambda: api.status("tiny").get("gpuSeconds"), what="gpuSeconds")
        assert 200 <= first <= 212  # 2 GPUs x ~100 s (plus the seconds the test took), not the impostor's 8 x 1000
        await eventually(lambda: api.status("tiny")["gpuSeconds"] >= first + 2, timeout=5, what="gpuSeconds growing while it runs")
        status = api.status("tiny")
        assert status["gpuHours"] == round(status["gpuSeconds"] / 3600, 2)
        ran = (dt.datetime.now(dt.timezone.utc) - dt.datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)).total_seconds()
        assert status["gpuSeconds"] <= 2 * ran + 2  # the sync intervals tile: no second counted twice


async def test_a_failed_initializer_names_the_source_in_the_conditions(api, operator):
    async with operator():
        await api.create_ftj(manifest(**{"spec.model.source": "s3://weights/models/huge", "spec.secrets.s3": {"name": "s3-keys"}}))
        await eventually(lambda: api.status("tiny").get("workload"), what="Job created")
        (job,) = api.children("batch/v1/jobs")
        assert job["spec"]["template"]["spec"]["initContainers"][0]["name"] == "initializer"
        message = "error: spec.model.source: s3://weights/models/huge: no objects under that prefix in bucket weights at S3; check the path"
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "tiny-0-x", "namespace": NS, "labels": dict(job["spec"]["template"]["metadata"]["labels"]),
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "tiny", "uid": job["metadata"]["uid"], "controller": True}]},
            "spec": {"containers": [{"name": "trainer", "image": "x"}]},
            "status": {"phase": "Failed", "initContainerStatuses": [
                {"name": "initializer", "state": {"terminated": {"exitCode": 2, "message": message}}}]},
        }
        await api.post(PODS, pod)
        await api.patch(f"/apis/batch/v1/namespaces/{NS}/jobs/tiny/status", {"status": {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Failed", what="Failed")
    failed = next(c for c in api.status("tiny")["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InitializerFailed" and "s3://weights/models/huge: no objects under that prefix" in failed["message"]
