"""The operator over real HTTP against the emulator: children, status, progress, errors."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import kubernetes_validate
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from kube_emulator import PYTORCHJOBS
from ophelpers import NS, eventually, manifest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

JOBS = "batch/v1/jobs"
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"


def one_each(api) -> tuple[dict, dict, dict]:
    (cm,), (svc,), (job,) = api.children(CONFIGMAPS), api.children(SERVICES), api.children(JOBS)
    return cm, svc, job


async def test_finetunejob_becomes_exactly_one_configmap_service_and_job(api, operator):
    async with operator():
        created = await api.create_ftj(manifest())
        uid = api.ftj("tiny")["metadata"]["uid"]
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="phase Pending")
        cm, svc, job = one_each(api)
    for child in (cm, svc, job):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["uid"] == uid and owner["kind"] == "FineTuneJob" and owner["name"] == "tiny"
        assert child["metadata"]["labels"]["kubetune.dev/job"] == "tiny"
        kubernetes_validate.validate(child, "1.30.0", strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][0] == "torchrun" and "--nnodes=1" in container["command"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    status = api.status("tiny")
    assert {k: status["workload"][k] for k in ("apiVersion", "kind", "name", "backend")} == {
        "apiVersion": "batch/v1", "kind": "Job", "name": "tiny", "backend": "job"}
    assert status["workload"]["uid"] == job["metadata"]["uid"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Created"]["status"] == "True" and conditions["Running"]["status"] == "False"
    assert status["observedGeneration"] == 1
    assert not api.ftj("tiny")["metadata"].get("finalizers")  # nothing outside Kubernetes to clean
    events = api.children("v1/events")
    assert any(e.get("reason") == "Created" and "Job tiny" in e.get("message", "") for e in events)
    assert created["metadata"]["name"] == "tiny"


async def test_restarting_the_operator_creates_no_duplicates(api, operator, emulator):
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("workload"), what="children")
    posts = lambda plural: sum(1 for r in emulator if r.method.value == "POST" and r.url.path.endswith(plural))  # noqa: E731
    configmaps_before, jobs_before = posts("/configmaps"), posts("/jobs")
    async with operator():
        await eventually(lambda: posts("/configmaps") > configmaps_before, what="the restarted operator to re-plan the job")
        one_each(api)  # exactly one of each: the second create met 409 and adopted
    one_each(api)
    assert posts("/jobs") == jobs_before  # the recorded workload is there: not even tried again


class FakeRank0:
    """rank 0 of the trainer, as far as the operator can tell: Prometheus text over HTTP."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.gauges = {
            name: Gauge(f"kubetune_train_{name}", name, registry=self.registry)
            for name in ("step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_second")
        }
        self.server, _ = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.port = self.server.server_port

    def set(self, **values):
        for name, value in values.items():
            self.gauges[name].set(value)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def rank0_pod(port: int, job: dict, name: str = "tiny-0-abcde") -> dict:
    """Pod 0 as the Job controller makes it: the template's labels plus the completion index,
    owned by the Job."""
    template_labels = job["spec"]["template"]["metadata"]["labels"]
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"], "uid": job["metadata"]["uid"], "controller": True}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "ownerReferences": [owner],
            "labels": {**template_labels, "batch.kubernetes.io/job-completion-index": "0"},
            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
        },
        "spec": {"containers": [{"name": "trainer", "image": "x", "ports": [{"name": "metrics", "containerPort": port}]}]},
    }


async def test_job_and_pod_status_drive_phase_progress_and_result(api, operator):
    rank0 = FakeRank0()
    try:
        async with operator() as state:
            await api.create_ftj(manifest())
            await eventually(lambda: api.status("tiny").get("phase") == "Pending")
            jobs = f"/apis/batch/v1/namespaces/{NS}/jobs/tiny"
            pods = f"/api/v1/namespaces/{NS}/pods"
            (job,) = api.children(JOBS)
            await api.post(pods, rank0_pod(rank0.port, job))
            impostor = rank0_pod(1, job, name="impostor")  # our labels, newer, but not made by the Job
            del impostor["metadata"]["ownerReferences"]
            await api.post(pods, impostor)
            await api.patch(f"{pods}/impostor/status", {"status": {"phase": "Running", "podIP": "127.0.0.1"}})
            await api.patch(f"{pods}/tiny-0-abcde/status", {"status": {"phase": "Running", "podIP": "127.0.0.1"}})
            await api.patch(f"{jobs}/status", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}})
            await eventually(lambda: api.status("tiny").get("phase") == "Running", what="Running")
            assert api.status("tiny")["startTime"]

            rank0.set(step=10, total_steps=40, epoch=0, loss=2.5, learning_rate=1e-3, tokens_per_second=1234.5)
            await eventually(lambda: (api.status("tiny").get("progress") or {}).get("step") == 10, what="progress step 10")
            progress = api.status("tiny")["progress"]
            assert progress["totalSteps"] == 40 and progress["loss"] == 2.5 and progress["tokensPerSecond"] == 1234.5
            assert progress["percent"] == 25.0 and progress["eta"]
            rank0.set(step=30, loss=1.25)
            await eventually(lambda: api.status("tiny")["progress"]["step"] == 30, what="progress step 30")
            assert api.status("tiny")["progress"]["percent"] == 75.0 and api.status("tiny")["progress"]["loss"] == 1.25

            async with aiohttp.ClientSession() as session:  # the operator's own metrics
                async with session.get(f"http://127.0.0.1:{state.metrics_port}/metrics") as resp:
                    text = await resp.text()
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
            assert samples[("kubetune_job_loss", (("name", "tiny"), ("namespace", NS)))] == 1.25
            assert samples[("kubetune_job_step", (("name", "tiny"), ("namespace", NS)))] == 30
            assert samples[("kubetune_operator_jobs", (("kind", "FineTuneJob"), ("phase", "Running")))] == 1

            summary = {"finalLoss": 1.1, "evalLoss": None, "steps": 40, "checkpoint": "/mnt/output/checkpoints/step_40",
                       "adapter": None, "tokensPerSecond": 1200.0}
            await api.patch(f"{pods}/tiny-0-abcde/status", {"status": {"phase": "Succeeded", "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": json.dumps(summary)}}}]}})
            await api.patch(f"{jobs}/status", {"status": {"active": 0, "succeeded": 1, "conditions": [
                {"type": "Complete", "status": "True"}]}})
            await eventually(lambda: api.status("tiny").get("phase") == "Succeeded", what="Succeeded")
            status = api.status("tiny")
            assert status["result"] == {"finalLoss": 1.1, "steps": 40, "checkpoint": "/mnt/output/checkpoints/step_40", "tokensPerSecond": 1200.0}
            assert status["completionTime"]
            conditions = {c["type"]: c["status"] for c in status["conditions"]}
            assert conditions == {"Created": "True", "Running": "False", "Succeeded": "True", "Failed": "False", "Suspended": "False",
                                  "Stalled": "False", "OutputPersistent": "False"}  # the tiny example's output is an emptyDir
            await eventually(lambda: {"Created", "Running", "Succeeded"} <= {e.get("reason") for e in api.children("v1/events")}, what="events")
    finally:
        rank0.close()


async def test_failed_job_fails_the_finetunejob_with_an_actionable_message(api, operator):
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending")
        await api.patch(f"/apis/batch/v1/namespaces/{NS}/jobs/tiny/status", {"status": {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Failed", what="Failed")
    failed = next(c for c in api.status("tiny")["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    assert "kubectl logs -l kubetune.dev/job=tiny" in failed["message"]
    await eventually(lambda: any(e.get("type") == "Warning" and e.get("reason") == "BackoffLimitExceeded" for e in api.children("v1/events")), what="warning event")


async def test_suspend_and_resume_reach_the_job(api, operator):
    path = f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/tiny"
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("workload"))
        await api.patch(path, {"spec": {"suspend": True}})
        await eventually(lambda: api.children(JOBS)[0]["spec"]["suspend"] is True, what="Job suspended")
        await eventually(lambda: api.status("tiny").get("phase") == "Suspended", what="phase Suspended")
        assert api.ftj("tiny")["metadata"]["generation"] == 2
        await api.patch(path, {"spec": {"suspend": False}})
        await eventually(lambda: api.children(JOBS)[0]["spec"]["suspend"] is False, what="Job resumed")
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="phase Pending again")


async def test_kueue_queue_creates_the_job_suspended_and_waits_for_admission(api, operator):
    async with operator():
        await api.create_ftj(manifest(**{"spec.queueName": "gpu-queue"}))
        await eventually(lambda: api.status("tiny").get("phase") == "Queued", what="Queued")
        (job,) = api.children(JOBS)
        assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        jobs = f"/apis/batch/v1/namespaces/{NS}/jobs/tiny"
        await api.patch(jobs, {"spec": {"suspend": False}})  # what Kueue does on admission
        await api.patch(f"{jobs}/status", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}})
        await eventually(lambda: api.status("tiny").get("phase") == "Running", what="Running after admission")


async def test_server_errors_are_retried_and_end_consistent(api, operator, emulator):
    emulator.fail("POST", r"/jobs$", 500, times=2)
    emulator.fail("POST", r"/configmaps$", 409, times=1)  # a conflict with nothing there: retried
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="reconciled after errors")
        one_each(api)
    assert [status for _, _, status in emulator.hits] == [409, 500, 500]


async def test_foreign_children_are_reported_and_never_adopted(api, operator):
    async with operator():
        foreign = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tiny-config", "namespace": NS}, "data": {}}
        await api.post(f"/api/v1/namespaces/{NS}/configmaps", foreign)
        await api.create_ftj(manifest())
        await eventually(
            lambda: any(c["reason"] == "NameConflict" for c in api.status("tiny").get("conditions", [])), what="NameConflict"
        )
        message = next(c["message"] for c in api.status("tiny")["conditions"] if c["reason"] == "NameConflict")
        assert "ConfigMap tiny-config already exists" in message and "delete it" in message
        assert not api.children(JOBS)
        await api.delete(f"/api/v1/namespaces/{NS}/configmaps/tiny-config")
        await eventually(lambda: len(api.children(JOBS)) == 1, timeout=20, what="children after the conflict is gone")
        cm, _, _ = one_each(api)
        assert cm["metadata"]["ownerReferences"][0]["uid"] == api.ftj("tiny")["metadata"]["uid"]


async def test_a_dropped_watch_is_reestablished(api, operator, emulator):
    emulator.fail("WATCH", r"/finetunejobs", 0, times=2)
    async with operator():
        await eventually(lambda: len(emulator.hits) == 2, what="both watches dropped")
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="reconciled after dropped watches")
        one_each(api)


async def test_bad_spec_is_refused_naming_the_field_and_the_operator_keeps_running(api, operator):
    async with operator():
        await api.create_ftj(manifest(**{"metadata.name": "bad", "spec.config.max_stepz": 5}))
        await eventually(lambda: api.status("bad").get("phase") == "Failed", what="bad spec failed")
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="the next job still reconciled")
    cond = next(c for c in api.status("bad")["conditions"] if c["type"] == "Created")
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "spec.config" in cond["message"] and "max_stepz" in cond["message"] and "max_steps" in cond["message"]
    assert all(c["metadata"]["labels"]["kubetune.dev/job"] == "tiny" for c in api.children(JOBS))


async def test_deleting_the_finetunejob_takes_its_children(api, operator):
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: len(api.children(JOBS)) == 1)
        await api.delete(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/tiny")
        await eventually(lambda: not api.children(JOBS) and not api.children(CONFIGMAPS) and not api.children(SERVICES), what="children gone")


async def test_backend_auto_uses_pytorchjob_when_the_crd_is_served(api, operator, emulator):
    emulator.declare(PYTORCHJOBS)
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("workload", {}).get("kind") == "PyTorchJob", what="PyTorchJob")
        (ptj,) = api.children("kubeflow.org/v1/pytorchjobs")
        assert ptj["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
        assert not api.children(JOBS) and not api.children(SERVICES)
        await api.patch(f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs/tiny/status", {"status": {"conditions": [
            {"type": "Running", "status": "True"}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Running", what="Running from PyTorchJob")


async def test_admission_webhook_refuses_a_bad_spec_naming_the_field(operator):
    """kopf's real webhook server (plain HTTP here; TLS on a cluster) with an AdmissionReview as
    the API server sends it."""
    import socket

    import kopf

    from kubetune.operator.handlers import ADMISSION_ID

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    webhook = kopf.WebhookServer(addr="127.0.0.1", port=port, insecure=True)

    def review(obj: dict) -> dict:
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "r-1", "operation": "CREATE", "object": obj, "oldObject": None, "dryRun": False,
            "kind": {"group": "kubetune.dev", "version": "v1alpha1", "kind": "FineTuneJob"},
            "resource": {"group": "kubetune.dev", "version": "v1alpha1", "resource": "finetunejobs"},
            "userInfo": {"username": "alice"}, "options": {}}}

    async with operator(webhook=webhook, admission=True):
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/{ADMISSION_ID}"
            bad = manifest(**{"spec.config.optimizer": {"lrr": 1e-3}})
            for attempt in range(50):  # the server starts with the operator
                try:
                    async with http.post(url, json=review(bad)) as resp:
                        refused = (await resp.json())["response"]
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            async with http.post(url, json=review(manifest())) as resp:
                allowed = (await resp.json())["response"]
    assert refused["allowed"] is False and refused["status"]["code"] == 422
    assert "spec.config" in refused["status"]["message"] and "optimizer.lrr" in refused["status"]["message"]
    assert allowed["allowed"] is True


async def test_kubetune_operator_cli_logs_in_with_a_kubeconfig_and_serves_health_and_metrics(api, emulator, tmp_path):
    """The real entry point, `kubetune operator`, as a separate process."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import yaml

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": emulator.base_url}}],
        "users": [{"name": "emu", "user": {}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
    }))
    metrics_port, health_port = free_port(), free_port()
    proc = subprocess.Popen(
        # Cluster-wide: with --namespace kopf lists /api/v1/namespaces, a path kmock 0.8 cannot parse.
        [sys.executable, "-m", "kubetune.cli", "operator", "--metrics-port", str(metrics_port),
         "--liveness", f"http://127.0.0.1:{health_port}/healthz"],
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_SYNC_INTERVAL": "0.5"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output = ""
    try:
        await api.create_ftj(manifest())
        await eventually(lambda: len(api.children(JOBS)) == 1 and api.status("tiny").get("phase") == "Pending", timeout=30, what="the CLI operator")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{health_port}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                text = await resp.text()
        assert 'kubetune_operator_jobs{kind="FineTuneJob",phase="Pending"} 1.0' in text
    except AssertionError:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode(errors="replace")
        raise AssertionError(output[-3000:])
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert proc.returncode == 0, output[-3000:]
