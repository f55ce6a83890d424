"""Operator faults (issue #25) over real HTTP against the emulator: the operator stopped between
creating the children and writing status, answers lost after the write went through, 409/429/500,
a slow and a timing-out API, dropped watch streams, a restart with 100 jobs in flight, and two
replicas with kopf peering. Each test checks the same invariants: exactly one workload per job
(and one ConfigMap and Service), status.workload naming it by uid, every status converging.

The faults are HTTP behaviour of the API server (tests/operator/kube_emulator.py: Emulator.fail),
never the operator's client internals. Single faults are in tests/operator/test_operator_*.py;
these combine them. The heavy ones are `slow` (`pytest tests/reliability -m slow`)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import random

import pytest

from kube_emulator import DROP, PASS
from ophelpers import NS, eventually, manifest, running_operator
from kubetune.operator.main import make_settings

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

JOBS, CONFIGMAPS, SERVICES = "batch/v1/jobs", "v1/configmaps", "v1/services"
FTJ = f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs"
JOBS_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs"


def writes(emulator, path_end: str, method: str = "POST", token: str | None = None) -> int:
    """How many requests of a method reached paths ending so (by one replica's token, if given)."""
    return sum(
        1 for r in emulator
        if r.method.value == method and r.url.path.endswith(path_end)
        and (token is None or r.headers.get("Authorization") == f"Bearer {token}")
    )


def assert_one_workload_each(api, names: list[str]) -> None:
    """Exactly one Job, ConfigMap and Service per FineTuneJob, owned by it, and its status names
    that Job by uid (so a restart can never make a second one)."""
    for plural in (JOBS, CONFIGMAPS, SERVICES):
        owners = [c["metadata"]["ownerReferences"][0]["name"] for c in api.children(plural)]
        assert sorted(owners) == sorted(names), (plural, sorted(owners))
    jobs = {j["metadata"]["name"]: j for j in api.children(JOBS)}
    for name in names:
        workload = api.status(name)["workload"]
        assert jobs[workload["name"]]["metadata"]["uid"] == workload["uid"], name
        assert jobs[workload["name"]]["metadata"]["ownerReferences"][0]["uid"] == api.ftj(name)["metadata"]["uid"]


async def test_stopped_between_creating_children_and_writing_status_converges_without_duplicates(api, operator, emulator):
    """The operator creates the children, then cannot write status (500s) and is stopped: the
    next one finds the children, adopts them, and records the workload; no second Job."""
    emulator.fail("PATCH", r"/finetunejobs/tiny/status$", 500, times=10_000)
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: len(api.children(JOBS)) == 1 and emulator.hits, what="children created, status refused")
    assert not api.status("tiny").get("workload")  # the crash window: children, no record of them
    emulator.faults.clear()
    (job,) = api.children(JOBS)
    async with operator():
        await eventually(lambda: api.status("tiny").get("workload"), what="status written by the restarted operator")
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="phase")
    assert_one_workload_each(api, ["tiny"])
    assert api.children(JOBS)[0]["metadata"]["uid"] == job["metadata"]["uid"]  # adopted, not replaced


async def test_lost_answers_conflicts_throttling_and_errors_end_in_one_workload(api, operator, emulator):
    """Writes that went through but whose answer was lost (500 after the write, the connection
    dropped after the write), 409, 429 and 500 before it, a slow API: one of each child, status
    converges, and the job still follows its workload."""
    emulator.fail("POST", r"/jobs$", 500, times=1, after=True)  # created, but the operator hears 500
    emulator.fail("POST", r"/configmaps$", DROP, times=1, after=True)  # created, then the connection ends
    emulator.fail("POST", r"/services$", 409, times=1)  # a conflict with nothing there
    emulator.fail("PATCH", r"/finetunejobs/tiny/status$", 429, times=2, message="Too many requests, please try again later.")
    emulator.fail("PATCH", r"/finetunejobs/tiny/status$", DROP, times=1)
    emulator.fail("GET", r"/jobs$", PASS, times=3, delay=1.5)  # a slow list: the sync waits, nothing doubles
    emulator.fail("GET", r"/pods$", 503, times=2)
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", timeout=30, what="Pending after the faults")
        assert_one_workload_each(api, ["tiny"])
        await api.patch(f"{JOBS_PATH}/tiny/status", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}})
        await eventually(lambda: api.status("tiny").get("phase") == "Running", timeout=30, what="Running")
    # the lost answer: the retry met 409 and adopted the Job the first create made
    assert writes(emulator, "/jobs") == 2 and api.children(JOBS)[0]["metadata"]["resourceVersion"]
    served = sorted({status for _, _, status in emulator.hits})
    assert served == sorted({500, DROP, 409, 429, PASS, 503}), served


async def test_dropped_watch_streams_of_every_kind_lose_no_job(api, operator, emulator):
    """Every watch the operator holds ends at once, three times each: the jobs created meanwhile
    are all planned, once."""
    for plural in ("finetunejobs", "evaljobs", "modeldeployments"):
        emulator.fail("WATCH", rf"/{plural}$", 0, times=3)
    async with operator():
        for i in range(5):
            await api.create_ftj(manifest(**{"metadata.name": f"job-{i}"}))
        names = [f"job-{i}" for i in range(5)]
        await eventually(lambda: all(api.status(n).get("phase") == "Pending" for n in names), timeout=30, what="all planned")
    assert_one_workload_each(api, names)
    assert sum(1 for method, _, _ in emulator.hits if method == "WATCH") == 9


@pytest.mark.slow
async def test_a_create_that_times_out_after_the_write_is_adopted_not_repeated(api, operator, emulator):
    """The API takes longer than the operator's client waits (30 s; kopf's own requests 60 s), and
    the Job was created meanwhile: the retry meets 409 and adopts it."""
    emulator.fail("POST", r"/jobs$", PASS, times=1, delay=35)
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", timeout=90, what="Pending after the timeout")
    assert_one_workload_each(api, ["tiny"])


# --- 100 jobs in flight, restarts ---------------------------------------------------------


def phases(emulator) -> dict[str, str]:
    """Every FineTuneJob's phase in one pass (the emulator serves from this test's event loop:
    a poll that looks each job up would starve it)."""
    return {o["metadata"]["name"]: (o.get("status") or {}).get("phase") for o in emulator.live("kubetune.dev/v1alpha1/finetunejobs", NS)}


async def wait_for(check, timeout: float, what: str) -> None:
    """Poll every half second: long waits over many jobs must leave the loop to the emulator."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


async def restart_with_jobs_in_flight(api, operator, emulator, n: int, *, seed: int) -> None:
    """n FineTuneJobs; the operator stopped while it plans them (some have children, some status,
    some neither), with random 500s and 429s; restarted; every job converges to one workload,
    then follows it to the end: none forgotten."""
    rng = random.Random(seed)
    emulator.max_history = 10  # kmock matches each request against its whole history (quadratic): keep little
    names = [f"job-{i:03d}" for i in range(n)]
    emulator.fail("POST", r"/jobs$", rng.choice([500, 429]), times=n // 5)
    emulator.fail("PATCH", r"/finetunejobs/[^/]+/status$", 500, times=n // 5)
    async with operator(sync_interval=0.5):
        for name in names:
            await api.create_ftj(manifest(**{"metadata.name": name}))
        await wait_for(lambda: len(api.children(JOBS)) >= n // 3, timeout=60, what="a third planned")
    emulator.faults.clear()
    for stop_after in (n // 2, None):  # twice: once more mid-way, then until done
        async with operator(sync_interval=0.5):
            target = stop_after or n
            await wait_for(lambda: list(phases(emulator).values()).count("Pending") >= target, timeout=120, what=f"{target} jobs Pending")
    assert_one_workload_each(api, names)
    async with operator(sync_interval=0.5):
        for name in names:  # every workload finishes; every job must notice
            await api.patch(f"{JOBS_PATH}/{name}/status", {"status": {"succeeded": 1, "conditions": [
                {"type": "Complete", "status": "True"}]}})
        await wait_for(lambda: set(phases(emulator).values()) == {"Succeeded"}, timeout=120, what="all Succeeded")
    assert_one_workload_each(api, names)


async def test_a_restart_with_jobs_in_flight_forgets_none(api, operator, emulator):
    await restart_with_jobs_in_flight(api, operator, emulator, 6, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_restart_with_100_jobs_in_flight_forgets_none(api, operator, emulator, seed):
    await restart_with_jobs_in_flight(api, operator, emulator, int(os.environ.get("KUBETUNE_RESTART_JOBS", "100")), seed=seed)


# --- two replicas with kopf peering ---------------------------------------------------------

PEERINGS = {"kopf.dev/v1/clusterkopfpeerings": {"kind": "ClusterKopfPeering", "namespaced": False}}


def replica(emulator, token: str, priority: int, lifetime: int = 3):
    """One replica of the chart's Deployment: `kubetune operator --peering kubetune`, its own
    priority (main.peering_priority draws one per replica) and token."""
    settings = make_settings(peering="kubetune", priority=priority)
    settings.peering.lifetime = lifetime  # the keep-alive: a dead replica is presumed dead after this
    return running_operator(emulator, settings=settings, peering="kubetune", token=token)


def peers(emulator) -> dict:
    return emulator.objects["kopf.dev/v1/clusterkopfpeerings", None, "kubetune"].raw.get("status") or {}


async def test_two_replicas_with_peering_one_serves_the_other_takes_over(api, emulator):
    """The higher priority serves; the other writes nothing but its keep-alive. When the active
    one stops (it leaves the peering), the standby serves: new jobs and the old ones' status."""
    emulator.declare(PEERINGS)
    await api.post("/apis/kopf.dev/v1/clusterkopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "kubetune"}})
    async with contextlib.AsyncExitStack() as standby_stack:
        active_stack = contextlib.AsyncExitStack()
        await active_stack.enter_async_context(replica(emulator, "replica-a", priority=200))
        await eventually(lambda: len(peers(emulator)) == 1, what="the active replica in the peering")
        await standby_stack.enter_async_context(replica(emulator, "replica-b", priority=100))
        await eventually(lambda: len(peers(emulator)) == 2, what="both replicas in the peering")
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="the active replica plans")
        await api.patch(f"{JOBS_PATH}/tiny/status", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}})
        await eventually(lambda: api.status("tiny").get("phase") == "Running", what="the active replica syncs")
        b_writes = [f"{r.method.value} {r.url.path}" for r in emulator
                    if r.method.value in ("POST", "PATCH", "PUT", "DELETE") and r.headers.get("Authorization") == "Bearer replica-b"
                    and "kopfpeerings" not in r.url.path]
        assert not b_writes, b_writes  # the standby wrote nothing
        assert writes(emulator, "/jobs", token="replica-a") == 1

        await active_stack.aclose()  # the active replica stops (a rollout, a drained node)
        await eventually(lambda: len(peers(emulator)) == 1, what="the active replica left the peering")
        await api.create_ftj(manifest(**{"metadata.name": "after"}))
        await eventually(lambda: api.status("after").get("phase") == "Pending", timeout=30, what="the standby serves new jobs")
        await api.patch(f"{JOBS_PATH}/tiny/status", {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Succeeded", timeout=30, what="the standby syncs the old job")
    assert writes(emulator, "/jobs", token="replica-b") == 1  # only "after": tiny's Job was not made again
    assert_one_workload_each(api, ["tiny", "after"])


async def test_a_replica_that_yields_to_a_higher_priority_stops_writing(api, emulator):
    """The low-priority replica served alone, then a higher one joins: kopf pauses the first one's
    watches, and its sync loops must stop too (else two replicas write every status)."""
    emulator.declare(PEERINGS)
    await api.post("/apis/kopf.dev/v1/clusterkopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "kubetune"}})
    async with replica(emulator, "replica-b", priority=100):
        await eventually(lambda: len(peers(emulator)) == 1, what="the first replica in the peering")
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="the lone replica plans")
        async with replica(emulator, "replica-a", priority=200):
            await eventually(lambda: len(peers(emulator)) == 2, what="both replicas in the peering")
            await asyncio.sleep(1.0)  # let the paused one notice (the emulator serves in this loop: no time.sleep)
            since = len(list(emulator))
            await api.patch(f"{JOBS_PATH}/tiny/status", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}})
            await eventually(lambda: api.status("tiny").get("phase") == "Running", what="the active replica syncs")
            await asyncio.sleep(1.5)  # several sync rounds of both
            b_requests = [f"{r.method.value} {r.url.path}" for r in list(emulator)[since:]
                          if r.headers.get("Authorization") == "Bearer replica-b" and "kopfpeerings" not in r.url.path]
            assert not b_requests, sorted(set(b_requests))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_killed_active_replica_is_replaced_after_its_keep_alive_lapses(api, emulator, tmp_path):
    """The active replica is a real `kubetune operator --peering` process, SIGKILLed (an evicted
    pod, a lost node): it cannot leave the peering, so the standby waits for its keep-alive (kopf's
    default lifetime, 60 s) to lapse, then serves new jobs and the old ones, without a second Job."""
    import signal
    import socket
    import subprocess
    import sys

    import yaml

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    emulator.declare(PEERINGS)
    await api.post("/apis/kopf.dev/v1/clusterkopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "kubetune"}})
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": emulator.base_url}}],
        "users": [{"name": "emu", "user": {"token": "replica-a"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
    }))
    active = subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", "operator", "--peering", "kubetune", "--priority", "200",
         "--metrics-port", str(free_port()), "--liveness", f"http://127.0.0.1:{free_port()}/healthz"],
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_SYNC_INTERVAL": "0.5"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await eventually(lambda: len(peers(emulator)) == 1, timeout=60, what="the active process in the peering")
        async with replica(emulator, "replica-b", priority=100):
            await eventually(lambda: len(peers(emulator)) == 2, what="both replicas in the peering")
            await api.create_ftj(manifest())
            await eventually(lambda: api.status("tiny").get("phase") == "Pending", timeout=30, what="the active process plans")
            assert writes(emulator, "/jobs", token="replica-a") == 1

            active.send_signal(signal.SIGKILL)  # no goodbye: its peering entry stays until it lapses
            active.wait(timeout=10)
            assert len(peers(emulator)) == 2
            await api.create_ftj(manifest(**{"metadata.name": "after"}))
            await eventually(lambda: api.status("after").get("phase") == "Pending", timeout=150,
                             what="the standby serves once the killed replica's keep-alive lapsed")
            await api.patch(f"{JOBS_PATH}/tiny/status", {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
            await eventually(lambda: api.status("tiny").get("phase") == "Succeeded", timeout=30, what="the standby syncs the old job")
    finally:
        if active.poll() is None:
            active.kill()
            active.wait(timeout=10)
    assert writes(emulator, "/jobs", token="replica-b") == 1  # only "after": tiny's Job was not made again
    assert_one_workload_each(api, ["tiny", "after"])
