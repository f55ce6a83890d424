"""operator/kube.py: the operator's kubernetes_asyncio client for its children, over real HTTP
against the emulator. Plurals come from API discovery, not a table: a kind the operator never
named (NetworkPolicy, plural `networkpolicies`) works, a CRD installed after the first look is
found, a kind the API does not serve is a clear 404; kopf's credentials travel with every
request; a 401 (a rotated token) logs in again once and retries; certificate data from a
kubeconfig becomes private files that go with the client."""
from __future__ import annotations

import asyncio
import base64
import os
import stat

import certifi
import kopf
import pytest

from kube_emulator import JOBSETS
from kubetune.operator.kube import ApiError, KubeClient, configuration
from ophelpers import NS, OPERATOR_TOKEN

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

PEM = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"


def client_for(emulator) -> KubeClient:
    return KubeClient(kopf.ConnectionInfo(server=emulator.base_url, token=OPERATOR_TOKEN))


def network_policy(name: str) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
        "spec": {"podSelector": {"matchLabels": {"app": name}}, "policyTypes": ["Ingress"]},
    }


async def test_a_kind_found_by_discovery_is_created_read_listed_and_patched(emulator):
    kube = client_for(emulator)
    try:
        created = await kube.create(network_policy("api"))
        assert created["metadata"]["uid"]
        assert [o["metadata"]["name"] for o in emulator.live("networking.k8s.io/v1/networkpolicies", NS)] == ["api"]
        assert (await kube.get("networking.k8s.io/v1", "NetworkPolicy", NS, "api"))["spec"]["podSelector"] == {"matchLabels": {"app": "api"}}
        assert await kube.get("networking.k8s.io/v1", "NetworkPolicy", NS, "missing") is None
        await kube.create(network_policy("other"))
        assert [o["metadata"]["name"] for o in await kube.list("networking.k8s.io/v1", "NetworkPolicy", NS, label_selector={"app": "other"})] == ["other"]
        patched = await kube.patch("networking.k8s.io/v1", "NetworkPolicy", NS, "api", {"metadata": {"labels": {"tier": "serve"}}})
        assert patched["metadata"]["labels"] == {"app": "api", "tier": "serve"}  # a merge patch
        paths = {r.url.path for r in emulator}
        assert "/apis/networking.k8s.io/v1" in paths  # the plural came from the resource list
    finally:
        await kube.close()


async def test_a_crd_installed_later_is_found_and_an_unserved_kind_is_a_404(emulator):
    kube = client_for(emulator)
    try:
        assert not await kube.serves("jobset.x-k8s.io/v1alpha2", "jobsets")
        with pytest.raises(ApiError) as err:
            await kube.create({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "a", "namespace": NS}})
        assert err.value.status == 404 and "JobSet" in err.value.message and not err.value.retriable
        emulator.declare(JOBSETS)  # the JobSet CRD is installed while the operator runs
        assert await kube.serves("jobset.x-k8s.io/v1alpha2", "jobsets")
        await kube.create({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "a", "namespace": NS}, "spec": {}})
        assert [o["metadata"]["name"] for o in emulator.live("jobset.x-k8s.io/v1alpha2/jobsets", NS)] == ["a"]
    finally:
        await kube.close()


async def test_kopf_credentials_reach_the_api_and_refusals_keep_their_status(emulator):
    emulator.bind_role(OPERATOR_TOKEN, {NS})  # the token's Role covers team-a only
    kube = client_for(emulator)
    try:
        assert await kube.list("v1", "ConfigMap", NS) == []  # allowed: the bearer token was sent
        with pytest.raises(ApiError) as err:
            await kube.list("v1", "ConfigMap", "team-b")
        assert err.value.status == 403 and err.value.reason == "Forbidden" and "forbidden" in err.value.message
        assert all(r.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}" for r in emulator)
    finally:
        await kube.close()


async def test_a_401_logs_in_again_once_and_retries_with_the_new_token(emulator, tmp_path):
    """A projected service-account token: the kubelet rewrites the file, the API server answers
    401 to the old token once it expired. The client reads the file again (through its relogin)
    and retries once; until the file changes the 401 stands, without a loop of retries."""
    token_file = tmp_path / "token"
    token_file.write_text("token-1")
    logins: list[str] = []

    async def relogin():
        logins.append(token_file.read_text())
        return kopf.ConnectionInfo(server=emulator.base_url, token=token_file.read_text())

    kube = KubeClient(kopf.ConnectionInfo(server=emulator.base_url, token="token-1"), relogin=relogin)
    try:
        await kube.create(network_policy("api"))
        emulator.revoke("token-1")
        with pytest.raises(ApiError) as err:  # the file still holds the expired token
            await kube.get("networking.k8s.io/v1", "NetworkPolicy", NS, "api")
        assert err.value.status == 401 and logins == ["token-1"]

        token_file.write_text("token-2")  # rotated
        found = await asyncio.gather(*(kube.get("networking.k8s.io/v1", "NetworkPolicy", NS, "api") for _ in range(5)))
        assert all(f["metadata"]["name"] == "api" for f in found)
        assert logins == ["token-1", "token-2"]  # five 401s at once, one re-login
        patched = await kube.patch("networking.k8s.io/v1", "NetworkPolicy", NS, "api", {"metadata": {"labels": {"tier": "serve"}}})
        assert patched["metadata"]["labels"]["tier"] == "serve" and logins == ["token-1", "token-2"]
        assert all(r.headers.get("Authorization") == "Bearer token-2" for r in list(emulator)[-6:])
        assert len(emulator.unauthorized) == 6  # the first get, and each of the five once
    finally:
        await kube.close()


async def test_no_answer_is_a_retriable_error():
    kube = KubeClient(kopf.ConnectionInfo(server="http://127.0.0.1:9", token="t"), timeout=5)  # port 9: nothing listens
    try:
        with pytest.raises(ApiError) as err:
            await kube.get("v1", "ConfigMap", NS, "x")
        assert err.value.status == 0 and err.value.retriable
    finally:
        await kube.close()


async def test_certificate_data_becomes_private_files(tmp_path):
    b64 = base64.b64encode(PEM.encode()).decode()
    connection = kopf.ConnectionInfo(server="https://api.example:6443", ca_data=b64, certificate_data=PEM, private_key_data=b64, token="t")
    config = configuration(connection, str(tmp_path))
    for path in (config.ssl_ca_cert, config.cert_file, config.key_file):
        assert open(path).read() == PEM  # base64 or PEM, as kopf accepts both
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert config.verify_ssl and config.host == "https://api.example:6443"


async def test_the_clients_certificate_files_go_with_it():
    bundle = certifi.contents()
    start = bundle.index("-----BEGIN CERTIFICATE-----")
    ca = bundle[start: bundle.index("-----END CERTIFICATE-----", start)] + "-----END CERTIFICATE-----\n"  # a real CA certificate
    kube = KubeClient(kopf.ConnectionInfo(server="https://api.example:6443", ca_data=ca, token="t"))
    path = kube.api.configuration.ssl_ca_cert
    assert open(path).read() == ca
    await kube.close()
    assert not os.path.exists(path)


async def test_paths_and_insecure_pass_through_without_files():
    connection = kopf.ConnectionInfo(server="https://api.example/", ca_path="/var/run/ca.crt", insecure=True)
    config = configuration(connection)
    assert (config.host, config.ssl_ca_cert, config.cert_file, config.verify_ssl) == ("https://api.example", "/var/run/ca.crt", None, False)
