"""Restarts, resumedFromStep and GPU time from workload and pod state (pure functions)."""
from __future__ import annotations

import datetime as dt

from kubetune.operator.accounting import accounting, gpu_seconds_between, restarts

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def stamp(seconds: float) -> str:
    return (T0 + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(gpus: int, start: float, end: float = None) -> dict:
    state = {"terminated": {"startedAt": stamp(start), "finishedAt": stamp(end)}} if end is not None else {"running": {"startedAt": stamp(start)}}
    return {"spec": {"containers": [{"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
            "status": {"containerStatuses": [{"name": "trainer", "state": state}]}}


def test_restarts_per_backend():
    assert restarts("Job", {"status": {"failed": 2}}, [], failed=False) == 2  # two failed pods, replaced
    assert restarts("Job", {"status": {"failed": 3}}, [], failed=True) == 2  # the last failure ended it
    ptj = {"status": {"replicaStatuses": {"Master": {"failed": 1}, "Worker": {"failed": 1}}}}
    assert restarts("PyTorchJob", ptj, [], failed=False) == 2
    assert restarts("JobSet", {"status": {"restarts": 4}}, [], failed=False) == 4
    labelled = [{"metadata": {"labels": {"jobset.sigs.k8s.io/restart-attempt": n}}} for n in ("1", "3", "x")]
    assert restarts("TrainJob", {}, labelled, failed=False) == 3


def test_resumed_from_step_is_the_last_checkpoint_or_zero_on_an_emptydir():
    old = {"restarts": 0, "progress": {"lastCheckpointStep": 40}}
    assert accounting(old, "JobSet", {"status": {"restarts": 1}}, [], phase="Running", output_ephemeral=False, now=T0) == {
        "restarts": 1, "resumedFromStep": 40}
    assert accounting(old, "JobSet", {"status": {"restarts": 1}}, [], phase="Running", output_ephemeral=True, now=T0)["resumedFromStep"] == 0
    assert accounting({**old, "restarts": 1}, "JobSet", {"status": {"restarts": 1}}, [], phase="Running", output_ephemeral=False, now=T0) == {}


def test_gpu_seconds_tile_across_syncs_and_count_finished_pods_once():
    pods = [pod(2, 0), pod(4, 0, 30)]  # one running since t=0 with 2 GPUs; one ran 30 s with 4 GPUs
    assert gpu_seconds_between(pods, None, T0 + dt.timedelta(seconds=60)) == 2 * 60 + 4 * 30
    first = accounting({}, "JobSet", {}, pods, phase="Running", output_ephemeral=False, now=T0 + dt.timedelta(seconds=60, microseconds=700000))
    assert first["gpuSeconds"] == 240 and first["gpuAccountedAt"] == stamp(60)
    second = accounting(first, "JobSet", {}, pods, phase="Running", output_ephemeral=False, now=T0 + dt.timedelta(seconds=90))
    assert second["gpuSeconds"] == 240 + 2 * 30 and second["gpuHours"] == round(300 / 3600, 2)
    assert accounting({**first, **second}, "JobSet", {}, [], phase="Running", output_ephemeral=False, now=T0 + dt.timedelta(seconds=95)) == {}
