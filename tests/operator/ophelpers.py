"""Helpers for the operator tests: the emulator over real HTTP, the operator running in the test's event loop, and a
loopback Prometheus endpoint standing in for rank 0 of the trainer."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import kmock
import kopf
import pytest
import pytest_asyncio
import yaml

from kubetune.operator.handlers import OperatorConfig, OperatorState
from kubetune.operator.main import make_settings, run_operator
from kube_emulator import RESOURCES, Emulator

REPO = Path(__file__).resolve().parents[2]
NS = "team-a"
OPERATOR_TOKEN = "kubetune-operator"  # the operator's ServiceAccount token (see Emulator.bind_role)


@contextlib.asynccontextmanager
async def serving_emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as emu, kmock.Server(emu) as server:
        emu.declare(RESOURCES)
        emu.base_url = str(server.url).rstrip("/")
        yield emu


@contextlib.asynccontextmanager
async def running_operator(
    emu: Emulator, webhook: Any = None, namespaces: Sequence[str] = (), *,
    settings: Any = None, token: str = OPERATOR_TOKEN, peering: Any = None, **config: Any
) -> AsyncIterator[OperatorState]:
    """The operator in its own thread and event loop, as in production a separate process:
    it only talks HTTP to the emulator (and kopf's shutdown sees only its own tasks).
    namespaces: watch only these (`kubetune operator --namespace NS`); none: cluster-wide.
    settings/peering: a replica of a peering (make_settings(peering=...)); token: its identity
    in the emulator's request log (each replica its own); config: OperatorConfig fields (login:
    another login function than the fixed token)."""
    options = dict(sync_interval=0.2, metrics_port=0, metrics_addr="127.0.0.1", retry_delay=0.2, scrape_timeout=1.0,
                   login=lambda **_: kopf.ConnectionInfo(server=emu.base_url, token=token))
    options.update(config)
    state = OperatorState(OperatorConfig(**options))
    settings = settings or make_settings(peering=None, webhook=webhook)
    assert settings.admission.managed is None  # the operator never writes webhook configurations
    settings.watching.server_timeout = 5  # the emulator never ends watches itself
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(
                run_operator(state.config, namespaces=namespaces, peering=peering, stop_flag=stop, ready_flag=ready, state=state, settings=settings)
            )
        except BaseException as err:  # surfaced in the test below
            errors.append(err)

    thread = threading.Thread(target=main, name="operator", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 15), f"operator did not start: {errors}"
    try:
        yield state
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 15)
        assert not thread.is_alive(), "operator did not stop"
        assert not errors, errors


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll until check() returns something truthy (or raises nothing); the last error on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
        except (AssertionError, KeyError, IndexError, TypeError) as err:
            last = err
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def manifest(name: str = "finetune-tiny.yaml", **changes: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / name).read_text())
    doc["metadata"]["namespace"] = NS
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return doc


class Api:
    """The test's own kubectl: plain HTTP to the emulator (so watch events fire)."""

    def __init__(self, emu: Emulator):
        self.emu = emu

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        client = self.emu.clients[0]
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with client.request(method, path, json=body, headers=headers) as resp:
            payload = await resp.json(content_type=None)
            assert resp.status < 400, (method, path, resp.status, payload)
            return payload

    async def create_ftj(self, doc: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", f"/apis/kubetune.dev/v1alpha1/namespaces/{doc['metadata']['namespace']}/finetunejobs", copy.deepcopy(doc))

    async def patch(self, path: str, body: dict[str, Any]) -> Any:
        return await self._call("PATCH", path, body)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._call("POST", path, body)

    async def delete(self, path: str) -> Any:
        return await self._call("DELETE", path)

    def ftj(self, name: str) -> dict[str, Any]:
        return self.emu.objects["kubetune.dev/v1alpha1/finetunejobs", NS, name].raw

    def status(self, name: str) -> dict[str, Any]:
        return self.ftj(name).get("status") or {}

    def children(self, plural: str) -> list[dict[str, Any]]:
        return self.emu.live(plural, NS)



# --- fixtures of tests/operator and tests/reliability (their conftest modules import these) -------

@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with serving_emulator() as emu:
        yield emu


@pytest.fixture
def operator(emulator):
    return lambda webhook=None, namespaces=(), **config: running_operator(emulator, webhook=webhook, namespaces=namespaces, **config)


@pytest.fixture
def api(emulator) -> Api:
    return Api(emulator)
