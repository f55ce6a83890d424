"""EvalJobs and ModelDeployments over real HTTP against the emulator: waiting and failure paths,
the eval Job and its result, the server Deployment and its status, the promotion gate in both
directions, rollout of a new FineTuneJob output, deletion.

The emulator runs no controllers: the test plays the Job and Deployment controllers (pods with
termination messages, status patches), as test_operator_emulated.py does for FineTuneJobs."""
from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml

from kubetune.operator.local import format_table
from ophelpers import NS, eventually, manifest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

KT = f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS = f"/api/v1/namespaces/{NS}/pods"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
TASKS = [{"name": "facts", "type": "multiple_choice", "source": "builtin://tiny_instruct_mc", "options": {"context_field": "question"}}]


def obj(api, plural: str, name: str) -> dict:
    return api.emu.objects[f"kubetune.dev/v1alpha1/{plural}", NS, name].raw


def status(api, plural: str, name: str) -> dict:
    return obj(api, plural, name).get("status") or {}


def condition(api, plural: str, name: str, type_: str) -> dict:
    return next((c for c in status(api, plural, name).get("conditions", []) if c["type"] == type_), {})


def evaljob(name: str = "tiny-eval", **spec) -> dict:
    body = {"fineTuneJob": {"name": "tiny"}, "baseline": True, "tasks": TASKS, "resources": {"gpusPerNode": 0}}
    body.update(spec)
    if "model" in spec:
        body.pop("fineTuneJob")
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": name, "namespace": NS}, "spec": body}


def modeldeployment(name: str = "bot", **spec) -> dict:
    body = {"fineTuneJob": {"name": "tiny"}, "replicas": 2, "resources": {"gpusPerNode": 0}}
    body.update(spec)
    if "model" in spec:
        body.pop("fineTuneJob")
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name, "namespace": NS}, "spec": body}


def finetunejob(**changes) -> dict:
    return manifest(**{"spec.output": {"source": "pvc://outputs/tiny"}, **changes})


async def finish_finetunejob(api, adapter: str = "/mnt/output/adapter", **result: str) -> None:
    """What the FineTuneJob's own sync writes once its trainer succeeded (in one write: a job
    waiting for it may look in between)."""
    await eventually(lambda: status(api, "finetunejobs", "tiny").get("phase") == "Pending", what="FineTuneJob reconciled")
    await api.patch(f"{KT}/finetunejobs/tiny/status", {"status": {"phase": "Succeeded", "result": {"adapter": adapter, "finalLoss": 0.4, **result}}})


async def run_eval_pod(api, name: str, metrics: dict, baseline: dict | None = None) -> None:
    """The Job controller and kubelet: a pod whose containers left their summaries, then Complete."""
    job = await eventually(lambda: next((j for j in api.children("batch/v1/jobs") if j["metadata"]["name"] == name), None), what=f"Job {name}")
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"], "controller": True}

    def terminated(container: str, values: dict) -> dict:
        main = next(iter(values))
        message = json.dumps({"mainMetric": f"{main}={values[main]}", "metrics": values})
        return {"name": container, "state": {"terminated": {"exitCode": 0, "message": message}}}

    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{name}-x1", "namespace": NS, "ownerReferences": [owner], "labels": job["spec"]["template"]["metadata"]["labels"]},
           "spec": {"containers": [{"name": "eval", "image": "x"}]}}
    await api.post(PODS, pod)
    statuses = {"phase": "Succeeded", "containerStatuses": [terminated("eval", metrics)]}
    if baseline is not None:
        statuses["initContainerStatuses"] = [terminated("baseline", baseline)]
    await api.patch(f"{PODS}/{name}-x1/status", {"status": statuses})
    await api.patch(f"{JOBS}/{name}/status", {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})


async def deployment_ready(api, name: str = "bot", replicas: int = 2) -> None:
    """The Deployment controller: every replica updated and ready."""
    dep = await eventually(lambda: next((d for d in api.children("apps/v1/deployments") if d["metadata"]["name"] == name), None), what="Deployment")
    await api.patch(f"{DEPLOYMENTS}/{name}/status", {"status": {
        "observedGeneration": dep["metadata"].get("generation", 1), "replicas": replicas, "readyReplicas": replicas,
        "updatedReplicas": replicas, "availableReplicas": replicas,
        "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "message": "ok"},
                       {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable", "message": "done"}]}})


def served_model_id(api, name: str = "bot") -> str:
    (dep,) = [d for d in api.children("apps/v1/deployments") if d["metadata"]["name"] == name]
    return dep["spec"]["template"]["metadata"]["annotations"]["kubetune.dev/model-id"]


async def test_evaljob_waits_for_its_finetunejob_then_evaluates_it_against_the_baseline(api, operator):
    async with operator():
        await api.post(f"{KT}/evaljobs", evaljob())
        await eventually(lambda: condition(api, "evaljobs", "tiny-eval", "ModelReady")["reason"] == "FineTuneJobNotFound", what="not found yet")
        assert status(api, "evaljobs", "tiny-eval")["phase"] == "Pending"
        await api.create_ftj(finetunejob())
        await eventually(lambda: condition(api, "evaljobs", "tiny-eval", "ModelReady")["reason"] == "WaitingForFineTuneJob", what="waiting")
        assert condition(api, "evaljobs", "tiny-eval", "ModelReady")["status"] == "False" and "tiny" in condition(api, "evaljobs", "tiny-eval", "ModelReady")["message"]
        assert not [j for j in api.children("batch/v1/jobs") if j["metadata"]["name"] == "tiny-eval"]

        await finish_finetunejob(api)
        await eventually(lambda: status(api, "evaljobs", "tiny-eval").get("workload"), what="eval Job created")
        st = status(api, "evaljobs", "tiny-eval")
        assert st["model"] == "finetunejob/tiny" and st["modelId"] == f"finetunejob/tiny@{api.ftj('tiny')['metadata']['uid']}"
        (job,) = [j for j in api.children("batch/v1/jobs") if j["metadata"]["name"] == "tiny-eval"]
        (cm,) = [c for c in api.children("v1/configmaps") if c["metadata"]["name"] == "tiny-eval-config"]
        for child in (job, cm):
            kubernetes_validate.validate(child, "1.30.0", strict=True)
            assert child["metadata"]["ownerReferences"][0]["uid"] == obj(api, "evaljobs", "tiny-eval")["metadata"]["uid"]
        assert "adapter: /mnt/output/adapter" in cm["data"]["config.yaml"] and "adapter: null" in cm["data"]["baseline.yaml"]

        await run_eval_pod(api, "tiny-eval", {"facts/acc": 0.9}, baseline={"facts/acc": 0.25})
        await eventually(lambda: status(api, "evaljobs", "tiny-eval").get("phase") == "Succeeded", what="Succeeded")
        result = status(api, "evaljobs", "tiny-eval")["result"]
        assert result["metrics"] == {"facts/acc": 0.9} and result["baseline"] == {"facts/acc": 0.25}
        assert result["delta"] == {"facts/acc": pytest.approx(0.65)} and result["mainMetric"] == "facts/acc=0.9 (+0.65 vs baseline)"
        table = format_table([obj(api, "evaljobs", "tiny-eval")], "EvalJob").splitlines()
        assert table[0].split() == ["NAME", "MODEL", "PHASE", "MAIN", "METRIC", "AGE"]
        assert table[1].split()[:4] == ["tiny-eval", "finetunejob/tiny", "Succeeded", "facts/acc=0.9"]
        await eventually(lambda: {"Created", "Succeeded"} <= {e.get("reason") for e in api.children("v1/events")
                                                              if e.get("involvedObject", {}).get("kind") == "EvalJob"}, what="events")


async def test_evaljob_fails_when_its_finetunejob_fails_or_is_deleted(api, operator):
    async with operator():
        await api.create_ftj(finetunejob())
        await api.post(f"{KT}/evaljobs", evaljob())
        await eventually(lambda: condition(api, "evaljobs", "tiny-eval", "ModelReady")["reason"] == "WaitingForFineTuneJob", what="waiting")
        await eventually(lambda: status(api, "finetunejobs", "tiny").get("phase") == "Pending")
        await api.patch(f"{KT}/finetunejobs/tiny/status", {"status": {"phase": "Failed", "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "the trainer ran out of memory"}]}})
        await eventually(lambda: status(api, "evaljobs", "tiny-eval").get("phase") == "Failed", what="Failed")
        ready = condition(api, "evaljobs", "tiny-eval", "ModelReady")
        assert ready["reason"] == "FineTuneJobFailed" and "FineTuneJob tiny failed: the trainer ran out of memory" in ready["message"]

        await api.post(f"{KT}/evaljobs", evaljob("orphan", fineTuneJob={"name": "gone"}))
        await eventually(lambda: status(api, "evaljobs", "orphan").get("phase") == "Pending")
        await api.create_ftj(finetunejob(**{"metadata.name": "gone"}))
        await eventually(lambda: status(api, "evaljobs", "orphan").get("fineTuneJobUid"), what="FineTuneJob seen")
        await api.delete(f"{KT}/finetunejobs/gone")
        await eventually(lambda: status(api, "evaljobs", "orphan").get("phase") == "Failed", what="deleted -> Failed")
        ready = condition(api, "evaljobs", "orphan", "ModelReady")
        assert ready["reason"] == "FineTuneJobNotFound" and "FineTuneJob gone was deleted" in ready["message"]
        assert not [j for j in api.children("batch/v1/jobs") if j["metadata"]["name"] in ("tiny-eval", "orphan")]


async def test_modeldeployment_serves_the_finetunejobs_output_and_rolls_out_a_rerun(api, operator):
    async with operator():
        await api.post(f"{KT}/modeldeployments", modeldeployment())
        await api.create_ftj(finetunejob())
        await eventually(lambda: condition(api, "modeldeployments", "bot", "ModelReady")["reason"] == "WaitingForFineTuneJob", what="waiting")
        assert status(api, "modeldeployments", "bot")["phase"] == "Pending" and not api.children("apps/v1/deployments")
        await finish_finetunejob(api)
        await eventually(lambda: api.children("apps/v1/deployments"), what="Deployment")
        (dep,), services = api.children("apps/v1/deployments"), [s for s in api.children("v1/services") if s["metadata"]["name"] == "bot"]
        kubernetes_validate.validate(dep, "1.30.0", strict=True)
        assert len(services) == 1 and services[0]["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
        argv = dep["spec"]["template"]["spec"]["containers"][0]["command"]
        assert "tiny=/mnt/output/adapter" in argv and dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        await eventually(lambda: status(api, "modeldeployments", "bot").get("phase") == "Progressing", what="Progressing")
        assert status(api, "modeldeployments", "bot")["ready"] == "0/2"

        await deployment_ready(api)
        await eventually(lambda: status(api, "modeldeployments", "bot").get("phase") == "Ready", what="Ready")
        st = status(api, "modeldeployments", "bot")
        assert st["ready"] == "2/2" and st["readyReplicas"] == 2 and st["url"] == f"http://bot.{NS}.svc:8000/v1"
        assert st["servedModels"] == ["bot", "tiny"] and st["model"] == "finetunejob/tiny"
        assert condition(api, "modeldeployments", "bot", "Available")["status"] == "True"
        assert condition(api, "modeldeployments", "bot", "Progressing")["reason"] == "NewReplicaSetAvailable"
        table = format_table([obj(api, "modeldeployments", "bot")], "ModelDeployment").splitlines()
        assert table[0].split() == ["NAME", "MODEL", "READY", "URL", "AGE"]
        assert table[1].split()[:4] == ["bot", "finetunejob/tiny", "2/2", f"http://bot.{NS}.svc:8000/v1"]

        # A re-run of the FineTuneJob (deleted, created again): the old model serves meanwhile,
        # then the new output rolls out through the Deployment's rolling update.
        first_id = served_model_id(api)
        await api.delete(f"{KT}/finetunejobs/tiny")
        await eventually(lambda: condition(api, "modeldeployments", "bot", "ModelReady")["reason"] == "FineTuneJobNotFound", what="gone")
        assert status(api, "modeldeployments", "bot")["phase"] == "Ready" and served_model_id(api) == first_id
        await api.create_ftj(finetunejob())
        await finish_finetunejob(api, adapter="/mnt/output/adapter-v2")
        await eventually(lambda: served_model_id(api) != first_id, what="rollout of the re-run")
        (dep,) = api.children("apps/v1/deployments")
        assert "tiny=/mnt/output/adapter-v2" in dep["spec"]["template"]["spec"]["containers"][0]["command"]
        assert dep["metadata"]["generation"] == 2  # patched in place: a rolling update, not a new Deployment
        await eventually(lambda: status(api, "modeldeployments", "bot").get("phase") == "Progressing", what="rolling")

        await api.delete(f"{KT}/modeldeployments/bot")
        await eventually(lambda: not api.children("apps/v1/deployments") and not [s for s in api.children("v1/services") if s["metadata"]["name"] == "bot"],
                         what="children gone with the ModelDeployment")


async def test_promotion_gate_holds_a_new_model_until_its_evaljob_passes(api, operator):
    async with operator():
        await api.post(f"{KT}/modeldeployments", modeldeployment(model={"source": "pvc://models/v1"}))
        await eventually(lambda: api.children("apps/v1/deployments"), what="Deployment of v1")
        await deployment_ready(api)
        await eventually(lambda: status(api, "modeldeployments", "bot").get("phase") == "Ready", what="v1 Ready")
        assert served_model_id(api) == "pvc://models/v1"

        # v2 with a gate: its EvalJob measures 0.5, the threshold is 0.6 -> held, v1 keeps serving.
        await api.post(f"{KT}/evaljobs", evaljob("eval-v2", model={"source": "pvc://models/v2"}, baseline=False))
        gate = {"evalJob": "eval-v2", "metric": "facts/acc", "min": 0.6}
        await api.patch(f"{KT}/modeldeployments/bot", {"spec": {"model": {"source": "pvc://models/v2"}, "promotion": gate}})
        await eventually(lambda: condition(api, "modeldeployments", "bot", "Promoted")["reason"] == "WaitingForEvalJob", what="waiting for eval")
        await run_eval_pod(api, "eval-v2", {"facts/acc": 0.5})
        await eventually(lambda: condition(api, "modeldeployments", "bot", "Promoted")["reason"] == "MetricBelowThreshold", what="held")
        promoted = condition(api, "modeldeployments", "bot", "Promoted")
        assert promoted["status"] == "False" and "facts/acc = 0.5" in promoted["message"] and ">= min 0.6" in promoted["message"]
        assert served_model_id(api) == "pvc://models/v1"
        st = status(api, "modeldeployments", "bot")
        assert st["phase"] == "Ready" and st["model"] == "pvc://models/v1"

        # A metric the EvalJob cannot report is refused with the same words as locally.
        await api.patch(f"{KT}/modeldeployments/bot", {"spec": {"promotion": {"metric": "facts/perplexity"}}})
        await eventually(lambda: condition(api, "modeldeployments", "bot", "Promoted")["reason"] == "MetricNotFound", what="unknown metric")
        assert "reports acc, acc_norm, not 'perplexity'" in condition(api, "modeldeployments", "bot", "Promoted")["message"]

        # Another EvalJob of v2 that passes: promoted, and v2 rolls out.
        await api.post(f"{KT}/evaljobs", evaljob("eval-v2b", model={"source": "pvc://models/v2"}, baseline=False))
        await run_eval_pod(api, "eval-v2b", {"facts/acc": 0.8})
        await api.patch(f"{KT}/modeldeployments/bot", {"spec": {"promotion": {"evalJob": "eval-v2b", "metric": "facts/acc"}}})
        await eventually(lambda: condition(api, "modeldeployments", "bot", "Promoted")["status"] == "True", what="promoted")
        assert "facts/acc = 0.8 >= min 0.6" in condition(api, "modeldeployments", "bot", "Promoted")["message"]
        await eventually(lambda: served_model_id(api) == "pvc://models/v2", what="v2 rolled out")
        await eventually(lambda: status(api, "modeldeployments", "bot").get("model") == "pvc://models/v2", what="status follows")
        await eventually(lambda: {"Created", "PromotionHeld", "RollingOut"} <= {
            e.get("reason") for e in api.children("v1/events") if e.get("involvedObject", {}).get("kind") == "ModelDeployment"}, what="events")


def policy(api, name: str = "bot") -> dict | None:
    return next((p for p in api.children("networking.k8s.io/v1/networkpolicies") if p["metadata"]["name"] == name), None)


async def test_modeldeployment_network_policy_is_created_owned_followed_and_opened_when_turned_off(api, operator):
    key = {"name": "bot-keys", "key": "keys"}
    async with operator():
        await api.post(f"{KT}/modeldeployments", modeldeployment(model={"source": "pvc://models/v1"}, apiKeySecret=key))
        await eventually(lambda: api.children("apps/v1/deployments"), what="Deployment")
        first = policy(api)
        assert first is not None, "the NetworkPolicy is created with the Deployment"
        kubernetes_validate.validate(first, "1.30.0", strict=True)
        assert first["metadata"]["ownerReferences"][0]["uid"] == obj(api, "modeldeployments", "bot")["metadata"]["uid"]
        (dep,) = api.children("apps/v1/deployments")
        assert first["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
        assert first["spec"]["ingress"] == [{"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 8000}]}]
        # The key stays in its Secret: a file mount, not a value anywhere in the Deployment or status.
        pod = dep["spec"]["template"]["spec"]
        assert {"name": "api-keys", "secret": {"secretName": "bot-keys", "items": [{"key": "keys", "path": "keys"}],
                                               "defaultMode": 0o440}} in pod["volumes"]
        assert "--api-key-file" in pod["containers"][0]["command"]
        assert "bot-keys" not in json.dumps(status(api, "modeldeployments", "bot"))

        # A spec change of the allowed peers is applied to the existing policy.
        peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]
        await api.patch(f"{KT}/modeldeployments/bot", {"spec": {"networkPolicy": {"from": peers}}})
        await eventually(lambda: policy(api)["spec"]["ingress"][0]["from"] == peers, what="policy follows the spec")
        assert policy(api)["metadata"]["uid"] == first["metadata"]["uid"]  # patched, not replaced

        # Turned off: the operator (which may not delete) opens its policy to all ingress.
        await api.patch(f"{KT}/modeldeployments/bot", {"spec": {"networkPolicy": {"enabled": False}}})
        await eventually(lambda: policy(api)["spec"]["ingress"] == [{}], what="policy opened")
        kubernetes_validate.validate(policy(api), "1.30.0", strict=True)
        await eventually(lambda: condition(api, "modeldeployments", "bot", "Reconciled").get("status") == "True", what="reconciled")

        # Someone else's NetworkPolicy under the name is never taken over.
        foreign = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "other", "namespace": NS},
                   "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
        await api.post(f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies", foreign)
        await api.post(f"{KT}/modeldeployments", modeldeployment("other", model={"source": "pvc://models/v1"}))
        await eventually(lambda: condition(api, "modeldeployments", "other", "Reconciled").get("reason") == "NameConflict", what="conflict")
        assert "NetworkPolicy other already exists" in condition(api, "modeldeployments", "other", "Reconciled")["message"]
        assert "ownerReferences" not in policy(api, "other")["metadata"]


async def test_admission_webhook_refuses_bad_evaljobs_and_modeldeployments_naming_the_field(operator, emulator):
    """kopf's real webhook server with AdmissionReviews as the API server sends them."""
    import asyncio
    import socket

    import aiohttp
    import kopf

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    webhook = kopf.WebhookServer(addr="127.0.0.1", port=port, insecure=True)

    def review(obj: dict, plural: str) -> dict:
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "r-1", "operation": "CREATE", "object": obj, "oldObject": None, "dryRun": False,
            "kind": {"group": "kubetune.dev", "version": "v1alpha1", "kind": obj["kind"]},
            "resource": {"group": "kubetune.dev", "version": "v1alpha1", "resource": plural},
            "userInfo": {"username": "alice"}, "options": {}}}

    async def answer(http, path: str, obj: dict, plural: str) -> dict:
        for _ in range(50):  # the server starts with the operator
            try:
                async with http.post(f"http://127.0.0.1:{port}/{path}", json=review(obj, plural)) as resp:
                    return (await resp.json())["response"]
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        raise AssertionError("webhook did not answer")

    emulator.grant("alice", "get", "finetunejobs", NS, "tiny")  # tenancy: the FineTuneJob they reference
    async with operator(webhook=webhook, admission=True):
        async with aiohttp.ClientSession() as http:
            bad_eval = await answer(http, "validate-evaljob", evaljob(config={"batch_sise": 4}), "evaljobs")
            no_baseline = await answer(http, "validate-evaljob", evaljob(model={"source": "pvc://m/x"}), "evaljobs")
            good_eval = await answer(http, "validate-evaljob", evaljob(), "evaljobs")
            bad_vllm = await answer(http, "validate-modeldeployment", modeldeployment(runtime="vllm"), "modeldeployments")
            good_mdep = await answer(http, "validate-modeldeployment", modeldeployment(), "modeldeployments")
    assert bad_eval["allowed"] is False and bad_eval["status"]["code"] == 422 and "batch_sise" in bad_eval["status"]["message"]
    assert no_baseline["allowed"] is False and "spec.baseline" in no_baseline["status"]["message"]
    assert bad_vllm["allowed"] is False and "spec.resources.gpusPerNode: runtime vllm" in bad_vllm["status"]["message"]
    assert good_eval["allowed"] is True and good_mdep["allowed"] is True


async def test_api_refusals_become_conditions_403_retried_422_failed(api, operator, emulator):
    emulator.fail("POST", r"/deployments$", 403, times=3)  # RBAC missing, then granted
    emulator.fail("POST", r"/jobs$", 422, times=1)  # e.g. a policy refusing the eval Job
    async with operator():
        await api.post(f"{KT}/modeldeployments", modeldeployment(model={"source": "pvc://models/v1"}))
        await eventually(lambda: condition(api, "modeldeployments", "bot", "Reconciled").get("reason") == "Forbidden", what="Forbidden")
        message = condition(api, "modeldeployments", "bot", "Reconciled")["message"]
        assert "create Deployment bot" in message and "RBAC" in message
        await eventually(lambda: condition(api, "modeldeployments", "bot", "Reconciled").get("status") == "True", what="retried once granted")
        assert len(api.children("apps/v1/deployments")) == 1

        await api.post(f"{KT}/evaljobs", evaljob("refused", model={"source": "pvc://models/v1"}, baseline=False))
        await eventually(lambda: status(api, "evaljobs", "refused").get("phase") == "Failed", what="422 -> Failed")
        failed = condition(api, "evaljobs", "refused", "Failed")
        assert failed["reason"] == "ApiRefused" and "create Job refused" in failed["message"]


async def test_modeldeployment_of_an_s3_model_gets_its_initializer_plan_and_follows_a_new_model(api, operator):
    """hf:// and s3:// models go through the initializer: a ConfigMap with its plan comes before
    the Deployment, whose pods fetch first; a new model patches the plan and rolls out."""
    async with operator():
        await api.post(f"{KT}/modeldeployments", modeldeployment(model={"source": "s3://weights/v1"}, secrets={"s3": {"name": "s3-keys"}}))
        await eventually(lambda: api.children("apps/v1/deployments"), what="Deployment created")
        (plan_map,) = [c for c in api.children("v1/configmaps") if c["metadata"]["name"].endswith("-sources")]
        plan = yaml.safe_load(plan_map["data"]["sources.yaml"])
        assert [s["uri"] for s in plan["sources"]] == ["s3://weights/v1"]
        pod = api.children("apps/v1/deployments")[0]["spec"]["template"]["spec"]
        assert [c["name"] for c in pod["initContainers"]] == ["initializer"]
        assert pod["containers"][0]["command"][2] == plan["sources"][0]["dest"]
        await api.patch(f"{KT}/modeldeployments/bot", {"spec": {"model": {"source": "s3://weights/v2"}}})

        def plan_uris():
            (cm,) = [c for c in api.children("v1/configmaps") if c["metadata"]["name"].endswith("-sources")]
            return [s["uri"] for s in yaml.safe_load(cm["data"]["sources.yaml"])["sources"]]

        await eventually(lambda: plan_uris() == ["s3://weights/v2"], what="the plan patched")
        await eventually(lambda: "weights--v2" in api.children("apps/v1/deployments")[0]["spec"]["template"]["spec"]["containers"][0]["command"][2],
                         what="the new model rolled out")


async def test_evaljob_whose_initializer_fails_names_the_source(api, operator):
    async with operator():
        await api.post(f"{KT}/evaljobs", evaljob("hub-eval", model={"source": "hf://acme/missing"}, baseline=False))
        job = await eventually(lambda: next((j for j in api.children("batch/v1/jobs") if j["metadata"]["name"] == "hub-eval"), None), what="Job")
        assert [c["name"] for c in job["spec"]["template"]["spec"]["initContainers"]] == ["initializer"]
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "hub-eval", "uid": job["metadata"]["uid"], "controller": True}
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "hub-eval-x1", "namespace": NS, "ownerReferences": [owner], "labels": job["spec"]["template"]["metadata"]["labels"]},
               "spec": {"containers": [{"name": "eval", "image": "x"}]}}
        await api.post(PODS, pod)
        message = "error: spec.model.source: hf://acme/missing: no such repository on the Hugging Face Hub"
        await api.patch(f"{PODS}/hub-eval-x1/status", {"status": {"phase": "Failed", "initContainerStatuses": [
            {"name": "initializer", "state": {"terminated": {"exitCode": 2, "message": message}}}]}})
        await api.patch(f"{JOBS}/hub-eval/status", {"status": {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}})
        await eventually(lambda: status(api, "evaljobs", "hub-eval").get("phase") == "Failed", what="Failed")
        failed = condition(api, "evaljobs", "hub-eval", "Failed")
        assert failed["reason"] == "InitializerFailed" and "hf://acme/missing: no such repository" in failed["message"]


async def test_modeldeployment_whose_initializer_fails_names_the_source(api, operator):
    async with operator():
        await api.post(f"{KT}/modeldeployments", modeldeployment(model={"source": "s3://weights/missing"}))
        dep = await eventually(lambda: next(iter(api.children("apps/v1/deployments")), None), what="Deployment")
        labels = dep["spec"]["template"]["metadata"]["labels"]
        message = "error: spec.model.source: s3://weights/missing: no objects under that prefix in bucket weights at S3"
        crashing = {"name": "initializer", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 2, "message": message}}}
        for name, owner_kind in (("bot-7d9f-a", "ReplicaSet"), ("lookalike", "Job")):  # only the Deployment's pods count
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": NS, "labels": labels,
                                "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner_kind, "name": f"bot-7d9f" if owner_kind == "ReplicaSet" else "x", "uid": "u", "controller": True}]},
                   "spec": {"containers": [{"name": "server", "image": "x"}]}}
            await api.post(PODS, pod)
            if owner_kind == "Job":
                await api.patch(f"{PODS}/{name}/status", {"status": {"phase": "Pending", "initContainerStatuses": [
                    {**crashing, "lastState": {"terminated": {"exitCode": 2, "message": "error: forged"}}}]}})
        await api.patch(f"{DEPLOYMENTS}/bot/status", {"status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 0, "updatedReplicas": 1,
                                                                  "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated", "message": "x"}]}})
        await eventually(lambda: condition(api, "modeldeployments", "bot", "Progressing").get("reason") == "ReplicaSetUpdated",
                         what="the Deployment's status read (with the look-alike's pod there)")
        assert condition(api, "modeldeployments", "bot", "ModelReady")["reason"] == "ModelResolved"  # the look-alike's message is not taken
        await api.patch(f"{PODS}/bot-7d9f-a/status", {"status": {"phase": "Pending", "initContainerStatuses": [crashing]}})
        await api.patch(f"{DEPLOYMENTS}/bot/status", {"status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 0, "updatedReplicas": 2}})
        await eventually(lambda: condition(api, "modeldeployments", "bot", "ModelReady").get("reason") == "InitializerFailed", what="InitializerFailed")
        ready = condition(api, "modeldeployments", "bot", "ModelReady")
        assert ready["status"] == "False" and "s3://weights/missing: no objects" in ready["message"] and "forged" not in ready["message"]


# --- a FineTuneJob from another FineTuneJob's output (spec.fineTuneJob) -----------------------


def chained(name: str = "instruct", ref: str = "tiny") -> dict:
    doc = finetunejob(**{"metadata.name": name, "spec.recipe": "lora_finetune", "spec.fineTuneJob": {"name": ref},
                         "spec.output": {"source": f"pvc://outputs/{name}"}})
    del doc["spec"]["model"]
    return doc


def no_children(api, name: str) -> bool:
    return not [c for plural in ("batch/v1/jobs", "v1/configmaps", "v1/services") for c in api.children(plural)
                if c["metadata"]["name"].startswith(name)]


async def test_a_finetunejob_waits_for_the_one_it_starts_from_then_trains_on_its_model(api, operator):
    async with operator():
        await api.create_ftj(chained())
        await eventually(lambda: condition(api, "finetunejobs", "instruct", "ModelReady").get("reason") == "FineTuneJobNotFound", what="not found yet")
        assert status(api, "finetunejobs", "instruct")["phase"] == "Pending"
        await api.create_ftj(finetunejob())
        await eventually(lambda: condition(api, "finetunejobs", "instruct", "ModelReady").get("reason") == "WaitingForFineTuneJob", what="waiting")
        ready = condition(api, "finetunejobs", "instruct", "ModelReady")
        assert ready["status"] == "False" and "waiting for FineTuneJob tiny to succeed" in ready["message"]
        assert status(api, "finetunejobs", "instruct")["phase"] == "Pending" and no_children(api, "instruct")

        # tiny was a LoRA run with save_merged: its merged model (not its adapter) is the start
        await finish_finetunejob(api, checkpoint="/mnt/output/tiny/model")
        await eventually(lambda: status(api, "finetunejobs", "instruct").get("workload"), what="instruct's workload created")
        st = status(api, "finetunejobs", "instruct")
        assert st["baseModel"] == "pvc://outputs/tiny/model" and st["fineTuneJobUid"] == api.ftj("tiny")["metadata"]["uid"]
        assert condition(api, "finetunejobs", "instruct", "ModelReady")["status"] == "True"
        (cm,) = [c for c in api.children("v1/configmaps") if c["metadata"]["name"] == "instruct-config"]
        assert yaml.safe_load(cm["data"]["config.yaml"])["model"]["path"] == "/mnt/model/tiny/model"
        (job,) = [j for j in api.children("batch/v1/jobs") if j["metadata"]["name"] == "instruct"]
        kubernetes_validate.validate(job, "1.30.0", strict=True)
        pod = job["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "outputs", "readOnly": True}  # the same claim, read-only
        assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "outputs", "readOnly": False}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["model"] == {"name": "model", "mountPath": "/mnt/model", "readOnly": True}

        # an EvalJob of the second stage: its adapter on the model it started from (status.baseModel)
        await api.patch(f"{KT}/finetunejobs/instruct/status", {"status": {"phase": "Succeeded", "result": {
            "adapter": "/mnt/output/instruct/adapter", "checkpoint": "/mnt/output/instruct/adapter"}}})
        await api.post(f"{KT}/evaljobs", evaljob("instruct-eval", fineTuneJob={"name": "instruct"}))
        await eventually(lambda: status(api, "evaljobs", "instruct-eval").get("workload"), what="eval Job created")
        (cm,) = [c for c in api.children("v1/configmaps") if c["metadata"]["name"] == "instruct-eval-config"]
        config, baseline = yaml.safe_load(cm["data"]["config.yaml"]), yaml.safe_load(cm["data"]["baseline.yaml"])
        assert config["model"]["path"] == baseline["model"]["path"] == "/mnt/model/tiny/model"
        assert config["adapter"] == "/mnt/output/instruct/adapter" and baseline["adapter"] is None


async def test_a_finetunejob_fails_when_the_one_it_starts_from_fails_never_exists_or_left_only_an_adapter(api, operator):
    async with operator(reference_grace=1.0):
        await api.create_ftj(finetunejob())
        await api.create_ftj(chained())
        await eventually(lambda: condition(api, "finetunejobs", "instruct", "ModelReady").get("reason") == "WaitingForFineTuneJob", what="waiting")
        await eventually(lambda: status(api, "finetunejobs", "tiny").get("phase") == "Pending")
        await api.patch(f"{KT}/finetunejobs/tiny/status", {"status": {"phase": "Failed", "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "the trainer ran out of memory"}]}})
        await eventually(lambda: status(api, "finetunejobs", "instruct").get("phase") == "Failed", what="Failed")
        failed = condition(api, "finetunejobs", "instruct", "Failed")
        assert failed["reason"] == "FineTuneJobFailed" and "FineTuneJob tiny failed: the trainer ran out of memory" in failed["message"]

        await api.create_ftj(chained("orphan", ref="gone"))  # never created: fails after the grace
        await eventually(lambda: status(api, "finetunejobs", "orphan").get("phase") == "Failed", what="orphan Failed")
        failed = condition(api, "finetunejobs", "orphan", "Failed")
        assert failed["reason"] == "FineTuneJobNotFound" and "FineTuneJob gone still does not exist" in failed["message"]

        await api.create_ftj(finetunejob(**{"metadata.name": "adapter-only"}))
        await api.create_ftj(chained("after-adapter", ref="adapter-only"))
        await eventually(lambda: status(api, "finetunejobs", "adapter-only").get("phase") == "Pending")
        await api.patch(f"{KT}/finetunejobs/adapter-only/status", {"status": {"phase": "Succeeded", "result": {
            "checkpoint": "/mnt/output/tiny/adapter", "adapter": "/mnt/output/tiny/adapter"}}})
        await eventually(lambda: status(api, "finetunejobs", "after-adapter").get("phase") == "Failed", what="adapter-only -> Failed")
        assert "give FineTuneJob adapter-only spec.config.save_merged: true" in condition(api, "finetunejobs", "after-adapter", "Failed")["message"]
        for name in ("instruct", "orphan", "after-adapter"):
            assert no_children(api, name), name
