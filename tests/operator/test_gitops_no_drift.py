"""GitOps (Argo CD, Flux) see no drift: through a job's whole life the operator never writes a
FineTuneJob's spec, labels or the user's annotations, only its status (and kopf's own
`kubetune.dev/*` bookkeeping annotations, which a GitOps diff of the manifest's fields ignores)."""
from __future__ import annotations

import copy

import pytest

from ophelpers import NS, OPERATOR_TOKEN, eventually, manifest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

JOBS = "batch/v1/jobs"


def operator_writes_to_finetunejobs(emulator) -> list:
    return [
        r for r in emulator
        if r.method.value in {"POST", "PUT", "PATCH"} and "/finetunejobs" in r.url.path
        and OPERATOR_TOKEN in r.headers.get("Authorization", "")
    ]


async def test_operator_writes_only_status_through_a_jobs_life(api, operator, emulator):
    applied = manifest()
    applied["metadata"]["labels"] = {"team": "nlp"}
    applied["metadata"]["annotations"] = {"argocd.argoproj.io/tracking-id": "app:kubetune.dev/FineTuneJob:team-a/tiny"}
    async with operator():
        await api.create_ftj(applied)
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="Pending")
        # The user (git) suspends and resumes: the operator follows, writing only status.
        await api.patch(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/tiny", {"spec": {"suspend": True}})
        await eventually(lambda: api.status("tiny").get("phase") == "Suspended", what="Suspended")
        await api.patch(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/tiny", {"spec": {"suspend": False}})
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="Pending again")
        await api.patch(f"/apis/batch/v1/namespaces/{NS}/jobs/tiny/status", {"status": {
            "active": 0, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Succeeded", what="Succeeded")

    writes = operator_writes_to_finetunejobs(emulator)
    assert writes, "the operator wrote nothing: the test would prove nothing"
    for request in writes:
        if request.subresource == "status":
            continue
        body = request.data or {}
        assert "spec" not in body, f"{request.method.value} {request.url.path} wrote spec: {body}"
        metadata = body.get("metadata") or {}
        assert "labels" not in metadata, body
        for key in metadata.get("annotations") or {}:
            assert key.startswith("kubetune.dev/"), f"the operator wrote annotation {key}"

    live = api.ftj("tiny")
    expected = copy.deepcopy(applied)
    expected["spec"]["suspend"] = False
    for key, value in expected["spec"].items():
        assert live["spec"][key] == value
    assert live["metadata"]["labels"] == applied["metadata"]["labels"]
    user_annotations = {k: v for k, v in live["metadata"]["annotations"].items() if not k.startswith("kubetune.dev/")}
    assert user_annotations == applied["metadata"]["annotations"]
