"""`kubetune operator --namespace NS`: the operator reconciles FineTuneJobs in NS only, over real
HTTP against the emulator; a FineTuneJob of the same name in another namespace is left alone.

Run three ways:
- NS by name, the operator's rights a Role in NS only (docs/operator.md, RBAC): the emulator
  refuses (403) anything outside NS, so nothing the operator asks may reach outside it;
- NS by name, rights from a ClusterRole;
- NS as a kopf glob (`team-a*`), with a ClusterRole that lets kopf list and watch namespaces.
"""
from __future__ import annotations

import pytest

from ophelpers import NS, OPERATOR_TOKEN, eventually, manifest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

OTHER_NS = "team-b"
FTJS = "kubetune.dev/v1alpha1/finetunejobs"
CHILDREN = ("v1/configmaps", "v1/services", "batch/v1/jobs", "v1/events")


def in_namespace(namespace: str) -> dict:
    doc = manifest()
    doc["metadata"]["namespace"] = namespace
    return doc


def ftj(emulator, namespace: str) -> dict:
    return emulator.objects[FTJS, namespace, "tiny"].raw


def children(emulator, namespace: str) -> dict[str, list[str]]:
    """Names of the objects the operator may create, by resource, in one namespace."""
    return {res: sorted(o["metadata"]["name"] for o in emulator.live(res, namespace)) for res in CHILDREN}


def sync_rounds(emulator, namespace: str) -> int:
    """Rounds of the sync loop in a namespace so far (each lists the pods there once)."""
    path = f"/api/v1/namespaces/{namespace}/pods"
    return sum(1 for r in emulator if str(r.method.value).upper() == "GET" and r.url.path == path)


def operator_requests_in(emulator, namespace: str) -> list[str]:
    """Requests the operator (its token) made to a namespace, served or refused."""
    prefix = f"/namespaces/{namespace}/"
    served = [f"{r.method.value} {r.url.path}" for r in emulator if prefix in r.url.path and OPERATOR_TOKEN in r.headers.get("Authorization", "")]
    return served + [line for line in emulator.refused if prefix in line]


async def grant(api, emulator, rbac: str) -> None:
    if rbac == "role-in-namespace":
        emulator.bind_role(OPERATOR_TOKEN, {NS})
    else:
        for name in (NS, OTHER_NS):
            await api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


@pytest.mark.parametrize(
    ("rbac", "namespaces"),
    [("role-in-namespace", [NS]), ("clusterrole", [NS]), ("clusterrole", ["team-a*"])],
    ids=["name+role", "name+clusterrole", "glob+clusterrole"],
)
async def test_namespaced_operator_reconciles_its_namespace_and_leaves_others_alone(api, operator, emulator, rbac, namespaces):
    await grant(api, emulator, rbac)
    async with operator(namespaces=namespaces) as state:
        await api.create_ftj(in_namespace(OTHER_NS))  # first: a cluster-wide operator would meet it first
        await api.create_ftj(in_namespace(NS))
        await eventually(lambda: ftj(emulator, NS).get("status", {}).get("phase") == "Pending", what="phase Pending in the watched namespace")
        await eventually(lambda: sync_rounds(emulator, NS) >= 3, what="three rounds of the sync loop")
        assert (NS, "tiny") in state.jobs and (OTHER_NS, "tiny") not in state.jobs

    watched = children(emulator, NS)
    assert (watched["v1/configmaps"], watched["v1/services"], watched["batch/v1/jobs"]) == (["tiny-config"], ["tiny"], ["tiny"])
    workload = ftj(emulator, NS)["status"]["workload"]
    assert (workload["apiVersion"], workload["kind"], workload["name"], workload["backend"]) == ("batch/v1", "Job", "tiny", "job")

    other = ftj(emulator, OTHER_NS)
    assert "status" not in other
    assert [key for key in other["metadata"].get("annotations") or {} if key.startswith("kubetune.dev/")] == []  # kopf's marks
    assert children(emulator, OTHER_NS) == {res: [] for res in CHILDREN}
    assert operator_requests_in(emulator, OTHER_NS) == []
    assert emulator.refused == []  # with a Role in NS only, nothing was asked outside NS


async def test_role_in_namespace_refuses_what_it_does_not_cover(emulator):
    """The emulator's RBAC itself: discovery and the namespace's resources pass, the rest is 403."""
    emulator.bind_role(OPERATOR_TOKEN, {NS})
    allowed = ["/api", "/apis", "/api/v1", "/apis/batch/v1", f"/api/v1/namespaces/{NS}/pods", f"/apis/{FTJS.rsplit('/', 1)[0]}/namespaces/{NS}/finetunejobs"]
    refused = ["/api/v1/namespaces", f"/api/v1/namespaces/{NS}", f"/api/v1/namespaces/{OTHER_NS}/pods", "/api/v1/pods", f"/apis/{FTJS}"]
    assert [path for path in allowed if not emulator.role.allows(path)] == []
    assert [path for path in refused if emulator.role.allows(path)] == []
