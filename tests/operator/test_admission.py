"""Admission (issue #26, behaviours 3, 4 and 10): kopf's real webhook server, AdmissionReviews as
the API server sends them; SubjectAccessReviews answered by the emulator's authorizer."""
from __future__ import annotations

import asyncio
import copy
import socket
from pathlib import Path
from typing import Any, Optional

import aiohttp
import kopf
import kubernetes_validate
import pytest
import yaml

from kubetune.operator.handlers import ADMISSION_ID
from kubetune.operator.main import make_settings
from kubetune.operator.tenancy import Policy
from ophelpers import NS, manifest

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
WEBHOOK_MANIFEST = REPO / "deploy" / "admission" / "webhook.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def review(operation: str, new: Optional[dict], old: Optional[dict] = None, user: str = "alice") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "r-1", "operation": operation, "object": new, "oldObject": old, "dryRun": False,
        "kind": {"group": "kubetune.dev", "version": "v1alpha1", "kind": "FineTuneJob"},
        "resource": {"group": "kubetune.dev", "version": "v1alpha1", "resource": "finetunejobs"},
        "namespace": NS, "name": (new or old)["metadata"]["name"],
        "userInfo": {"username": user, "groups": ["system:authenticated"]}, "options": {}}}


class Webhook:
    def __init__(self, url: str, http: aiohttp.ClientSession):
        self.url, self.http = url, http

    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        for _ in range(100):  # the server starts with the operator
            try:
                async with self.http.post(self.url, json=body) as resp:
                    return (await resp.json())["response"]
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        raise AssertionError("the webhook never answered")


@pytest.fixture
def webhook(operator):
    """(operator context, Webhook) with kopf's webhook server on a free port, plain HTTP."""
    async def start(**config: Any):
        port = free_port()
        server = kopf.WebhookServer(addr="127.0.0.1", port=port, insecure=True)
        return operator(webhook=server, admission=True, **config), f"http://127.0.0.1:{port}/{ADMISSION_ID}"
    return start


def unplannable() -> dict[str, Any]:
    return manifest(**{"spec.config.optimizer": {"lrr": 1e-3}})  # the planner refuses it


@pytest.mark.asyncio
async def test_delete_is_never_refused_and_suspend_works_on_an_object_that_no_longer_plans(webhook):
    running, url = await webhook()
    async with running, aiohttp.ClientSession() as http:
        call = Webhook(url, http)
        bad = unplannable()
        assert (await call(review("CREATE", bad)))["allowed"] is False  # the same object is refused on create
        deleted = await call(review("DELETE", None, bad))
        suspended = await call(review("UPDATE", {**bad, "spec": {**bad["spec"], "suspend": True}}, bad))
        relabelled = await call(review("UPDATE", {**bad, "metadata": {**bad["metadata"], "labels": {"team": "x"}}}, bad))
    assert deleted["allowed"] is True
    assert suspended["allowed"] is True and relabelled["allowed"] is True


@pytest.mark.asyncio
async def test_a_spec_change_other_than_suspend_is_refused_naming_the_field(webhook):
    running, url = await webhook()
    old = manifest()
    swapped = copy.deepcopy(old)
    value = swapped["spec"]["config"].pop("max_steps", 5)
    swapped["spec"]["config"]["save_every_n_steps"] = value  # one key swapped for another: same count
    async with running, aiohttp.ClientSession() as http:
        call = Webhook(url, http)
        refused = await call(review("UPDATE", swapped, old))
        image = await call(review("UPDATE", manifest(**{"spec.image": "other:1"}), old))
    assert refused["allowed"] is False and "spec.config" in refused["status"]["message"] and "create a new FineTuneJob" in refused["status"]["message"]
    assert image["allowed"] is False and "spec.image" in image["status"]["message"]


@pytest.mark.asyncio
async def test_a_tenant_cannot_use_a_service_account_secret_or_claim_they_may_not_use(webhook, emulator):
    running, url = await webhook()
    doc = manifest(**{
        "spec.serviceAccountName": "cluster-admin-sa",
        "spec.secrets": {"hfToken": {"name": "platform-hf", "key": "token"}},
        "spec.env": [{"name": "DB", "secretKeyRef": {"name": "db-creds", "key": "password"}}],
        "spec.output": {"source": "pvc://team-b-results/run"},
    })
    async with running, aiohttp.ClientSession() as http:
        call = Webhook(url, http)
        refused = await call(review("CREATE", doc))
        for verb, resource, name in (("impersonate", "serviceaccounts", "cluster-admin-sa"), ("get", "secrets", "platform-hf"),
                                     ("get", "secrets", "db-creds"), ("get", "persistentvolumeclaims", "team-b-results")):
            emulator.grant("alice", verb, resource, NS, name)
        granted = await call(review("CREATE", doc))
        bob = await call(review("CREATE", doc, user="bob"))
    assert refused["allowed"] is False and refused["status"]["code"] == 403
    message = refused["status"]["message"]
    for field in ("spec.serviceAccountName", "spec.secrets.hfToken", "spec.env[0].secretKeyRef", "spec.output.source"):
        assert field in message, field
    assert "`get` on secrets 'db-creds' in team-a" in message
    assert granted["allowed"] is True and bob["allowed"] is False
    reviews = [r["spec"] for r in emulator.access_reviews]
    assert {r["user"] for r in reviews} == {"alice", "bob"} and all(r["resourceAttributes"]["namespace"] == NS for r in reviews)


@pytest.mark.asyncio
async def test_a_tenant_may_start_only_from_a_finetunejob_they_may_read(webhook, emulator):
    running, url = await webhook()
    doc = manifest(**{"metadata.name": "instruct", "spec.fineTuneJob": {"name": "team-b-pretrain"}})
    del doc["spec"]["model"]
    async with running, aiohttp.ClientSession() as http:
        call = Webhook(url, http)
        refused = await call(review("CREATE", doc))
        emulator.grant("alice", "get", "finetunejobs", NS, "team-b-pretrain")
        granted = await call(review("CREATE", doc))
        itself = await call(review("CREATE", manifest(**{"metadata.name": "team-b-pretrain", "spec.fineTuneJob": {"name": "team-b-pretrain"}})))
    assert refused["allowed"] is False and refused["status"]["code"] == 403
    assert "spec.fineTuneJob: alice may not use it: that needs `get` on finetunejobs.kubetune.dev 'team-b-pretrain'" in refused["status"]["message"]
    assert granted["allowed"] is True
    review_ = next(r["spec"]["resourceAttributes"] for r in emulator.access_reviews if r["spec"]["resourceAttributes"]["resource"] == "finetunejobs")
    assert review_["group"] == "kubetune.dev" and review_["name"] == "team-b-pretrain"
    assert itself["allowed"] is False and "set exactly one of spec.model and spec.fineTuneJob" in itself["status"]["message"]


@pytest.mark.asyncio
async def test_whoever_may_create_pods_may_name_a_service_account(webhook, emulator):
    running, url = await webhook()
    emulator.grant("alice", "create", "pods", NS)
    async with running, aiohttp.ClientSession() as http:
        allowed = await Webhook(url, http)(review("CREATE", manifest(**{"spec.serviceAccountName": "trainer"})))
    assert allowed["allowed"] is True


@pytest.mark.asyncio
async def test_platform_allow_lists_for_registries_tolerations_and_priority_classes(webhook):
    policy = Policy(allowed_registries=("registry.example.com/",), allowed_tolerations=("nvidia.com/gpu",), allowed_priority_classes=("batch-low",))
    running, url = await webhook(tenancy=policy)
    bad = manifest(**{
        "spec.image": "docker.io/evil/miner:latest",
        "spec.tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
        "spec.priorityClassName": "system-cluster-critical",
    })
    good = manifest(**{
        "spec.image": "registry.example.com/kubetune/trainer:0.1.0",
        "spec.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "spec.priorityClassName": "batch-low",
    })
    async with running, aiohttp.ClientSession() as http:
        call = Webhook(url, http)
        refused, allowed = await call(review("CREATE", bad)), await call(review("CREATE", good))
    message = refused["status"]["message"]
    assert refused["allowed"] is False and "spec.image" in message and "spec.tolerations[0].key" in message and "spec.priorityClassName" in message
    assert allowed["allowed"] is True


def test_policy_from_the_operators_environment():
    policy = Policy.from_env({"KUBETUNE_ALLOWED_REGISTRIES": "ghcr.io/kubetune/, registry.example.com/", "KUBETUNE_ALLOWED_TOLERATIONS": "*"})
    assert policy.allowed_registries == ("ghcr.io/kubetune/", "registry.example.com/")
    assert policy.allowed_tolerations is None and policy.allowed_priority_classes is None
    assert Policy.from_env({}).allowed_tolerations == ("nvidia.com/gpu",)


def test_the_static_webhook_configuration_never_sees_deletes_or_status():
    docs = [doc for doc in yaml.safe_load_all(WEBHOOK_MANIFEST.read_text()) if doc]
    (config,) = [d for d in docs if d["kind"] == "ValidatingWebhookConfiguration"]
    kubernetes_validate.validate(config, "1.30.0", strict=True)
    hooks = {hook["rules"][0]["resources"][0]: hook for hook in config["webhooks"]}
    assert sorted(hooks) == ["evaljobs", "finetunejobs", "modeldeployments"]  # not */status: the operator's own writes pass
    assert hooks["finetunejobs"]["clientConfig"]["service"]["path"] == f"/{ADMISSION_ID}"
    for plural, hook in hooks.items():
        assert hook["clientConfig"]["service"]["path"] == f"/validate-{plural[:-1]}"
        (rule,) = hook["rules"]
        assert set(rule["operations"]) == {"CREATE", "UPDATE"} and rule["resources"] == [plural]
        assert hook["sideEffects"] == "None" and hook["failurePolicy"] == "Fail"
    assert "cert-manager.io/inject-ca-from" in config["metadata"]["annotations"]


def test_the_operator_never_writes_webhook_configurations():
    settings = make_settings(peering=None, webhook=kopf.WebhookServer(addr="127.0.0.1", port=free_port(), insecure=True))
    assert settings.admission.managed is None and settings.admission.server is not None



def pipeline_documents() -> dict[str, dict[str, Any]]:
    """The EvalJob and the kubetune-runtime ModelDeployment of examples/eval-and-serve.yaml."""
    docs = list(yaml.safe_load_all((REPO / "examples" / "eval-and-serve.yaml").read_text()))
    evj = next(d for d in docs if d["kind"] == "EvalJob")
    mdep = next(d for d in docs if d["kind"] == "ModelDeployment" and d["spec"].get("model"))
    for doc in (evj, mdep):
        doc["metadata"]["namespace"] = NS
    return {"EvalJob": evj, "ModelDeployment": mdep}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind,path", [("EvalJob", "validate-evaljob"), ("ModelDeployment", "validate-modeldeployment")])
async def test_evaljobs_and_modeldeployments_lend_no_rights_either(webhook, emulator, kind, path):
    """The same tenancy as FineTuneJobs: their pods would use the ServiceAccount, the Secrets and
    the claims (a ModelDeployment's adapters too), so the requester must hold those rights."""
    running, ftj_url = await webhook()
    url = ftj_url.rsplit("/", 1)[0] + "/" + path
    doc = copy.deepcopy(pipeline_documents()[kind])
    doc["spec"]["serviceAccountName"] = "cluster-admin-sa"
    doc["spec"]["secrets"] = {"s3": {"name": "team-b-s3"}}
    claims = ["models", "outputs"] if kind == "ModelDeployment" else []
    def kind_review(operation: str, new: dict, old: Optional[dict] = None) -> dict[str, Any]:
        body = review(operation, new, old)  # kopf routes by the request's resource
        body["request"]["kind"]["kind"] = kind
        body["request"]["resource"]["resource"] = kind.lower() + "s"
        return body

    async with running, aiohttp.ClientSession() as http:
        call = Webhook(url, http)
        refused = await call(kind_review("CREATE", doc))
        relabelled_old = copy.deepcopy(doc)
        relabelled = copy.deepcopy(doc)
        relabelled["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]  # kopf's own patch
        untouched_spec = await call(kind_review("UPDATE", relabelled, relabelled_old))
        grants = [("impersonate", "serviceaccounts", "cluster-admin-sa"), ("get", "secrets", "team-b-s3")]
        grants += [("get", "persistentvolumeclaims", claim) for claim in claims]
        if "fineTuneJob" in doc["spec"]:  # its output is read through this run's pods
            grants.append(("get", "finetunejobs", doc["spec"]["fineTuneJob"]["name"]))
        if kind == "ModelDeployment":  # the example's spec.apiKeySecret, mounted into the server
            grants.append(("get", "secrets", doc["spec"]["apiKeySecret"]["name"]))
        for verb, resource, name in grants:
            emulator.grant("alice", verb, resource, NS, name)
        granted = await call(kind_review("CREATE", doc))
    assert refused["allowed"] is False and refused["status"]["code"] == 403
    message = refused["status"]["message"]
    assert "spec.serviceAccountName" in message and "spec.secrets.s3" in message
    if kind == "ModelDeployment":  # the base model and the adapter, each from its own claim
        assert "spec.model.source" in message and "spec.adapters[0].source" in message
        assert "spec.apiKeySecret" in message and "'support-bot-keys'" in message
    assert untouched_spec["allowed"] is True  # an update that leaves the spec alone is not re-checked
    assert granted["allowed"] is True
