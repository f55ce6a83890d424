"""spec.tolerations and spec.affinity through the running operator (kopf against the emulator):
good values reach the created Job's pods exactly as written; a value the API server would refuse
in a pod is refused by the admission webhook naming the field (not a Failed/ChildRejected job
later). The checks themselves: tests/unit/test_scheduling.py, tests/operator/test_crd_cel.py."""
from __future__ import annotations

import aiohttp
import pytest

from kubetune.operator.tenancy import Policy
from ophelpers import eventually, manifest
from scheduling_cases import GOOD_AFFINITY, GOOD_TOLERATIONS, with_scheduling
from test_admission import Webhook, review, webhook  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
ANY_TOLERATION = Policy(allowed_tolerations=None)


async def test_the_created_job_carries_the_tolerations_and_affinity_as_written(api, operator):
    async with operator():
        await api.create_ftj(with_scheduling(manifest()))
        (job,) = await eventually(lambda: api.children("batch/v1/jobs"), what="the Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["tolerations"] == GOOD_TOLERATIONS and pod["affinity"] == GOOD_AFFINITY


async def test_the_webhook_refuses_what_the_api_server_would_refuse_in_a_pod(webhook):  # noqa: F811
    running, url = await webhook(tenancy=ANY_TOLERATION)
    good = with_scheduling(manifest())
    empty_key = with_scheduling(manifest())
    empty_key["spec"]["tolerations"][0] = {"operator": "Equal", "value": "gpu"}
    no_topology = with_scheduling(manifest())
    del no_topology["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"]
    async with running, aiohttp.ClientSession() as http:
        call = Webhook(url, http)
        allowed = await call(review("CREATE", good))
        refused = await call(review("CREATE", empty_key))
        missing = await call(review("CREATE", no_topology))
    assert allowed["allowed"] is True
    assert refused["allowed"] is False and "spec.tolerations.0.operator: must be Exists when key is empty" in refused["status"]["message"]
    assert missing["allowed"] is False
    assert "spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution.0.topologyKey: Field required" in missing["status"]["message"]
