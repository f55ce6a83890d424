"""The operator after its service-account token rotated, against the emulator over real HTTP.

A projected token is a file the kubelet rewrites; once the old token expires the API server
answers it 401. kopf logs in again on its own 401s, but its watches authenticated once and go
on, so the operator's own client (the status sync, the children) must log in again itself:
here the emulator refuses the old token, and the sync loop, which kopf makes no request for,
must go on with the new one."""
from __future__ import annotations

import kopf
import pytest

from ophelpers import NS, eventually, manifest, running_operator

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"


async def test_the_operator_reconciles_on_after_its_token_rotates(api, emulator, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("token-1")

    def login(**_):  # as kopf.login_with_service_account: the token file, read at each login
        return kopf.ConnectionInfo(server=emulator.base_url, token=token_file.read_text())

    async with running_operator(emulator, login=login):
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="reconciled with token-1")
        # kopf posts the handler's events in the background: all of them with token-1, so that no
        # request of kopf's own meets the 401 and logs in again for the operator's client.
        await eventually(lambda: {"Created", "EmptyDirOutput"} <= {e.get("reason") for e in api.children("v1/events")}, what="events posted")

        token_file.write_text("token-2")  # the kubelet rotated the token ...
        emulator.revoke("token-1")  # ... and the old one expired
        # The status sync is the operator's own client only: no kopf request re-logs in for it.
        await api.patch(f"{JOBS}/tiny/status", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}})
        await eventually(lambda: api.status("tiny").get("phase") == "Running", timeout=5, what="status synced after the rotation")
        assert emulator.unauthorized, "the old token was never refused: the test did not rotate anything"

        await api.create_ftj(manifest(**{"metadata.name": "second"}))  # and a new job is planned and created
        await eventually(lambda: api.status("second").get("workload"), timeout=10, what="second job's workload")
    tokens = {r.headers.get("Authorization") for r in emulator if r.url.path.startswith(f"/apis/batch/v1/namespaces/{NS}/jobs")}
    assert "Bearer token-2" in tokens
