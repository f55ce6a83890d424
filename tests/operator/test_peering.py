"""operator/peering.py: the operator's own loops pause by kopf's rule (kopf/_core/engines/peering.py,
process_peering_event: a live peer of higher or equal priority pauses us; a peer whose lastseen +
lifetime has passed is dead)."""
from __future__ import annotations

import asyncio
import datetime as dt

from kubetune.operator.peering import Peering, blocking_peers

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def peer(priority: int, seconds_ago: float, lifetime: int = 60) -> dict:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - dt.timedelta(seconds=seconds_ago)).isoformat()}


def test_live_higher_or_equal_peers_block_dead_and_lower_ones_do_not():
    peers = {
        "me": peer(100, 0), "higher": peer(200, 10), "equal": peer(100, 59), "lower": peer(50, 0),
        "dead": peer(900, 61), "zero-lifetime": peer(900, 0, lifetime=0),  # kopf's goodbye: lifetime 0
        "garbage": "not a peer", "bad-time": {"priority": 900, "lastseen": "yesterday"},
    }
    assert sorted(blocking_peers(peers, identity="me", priority=100, now=NOW)) == ["equal", "higher"]
    assert blocking_peers({"me": peer(1, 0)}, identity="me", priority=1, now=NOW) == []
    assert blocking_peers({}, identity="me", priority=1, now=NOW) == []


class FakeKube:
    def __init__(self, objects=None, error=None):
        self.objects, self.error, self.asked = objects or {}, error, []

    async def get(self, api_version, kind, namespace, name):
        self.asked.append((api_version, kind, namespace, name))
        if self.error:
            raise self.error
        return self.objects.get((kind, namespace, name))


def test_serving_reads_the_cluster_or_namespaced_peering_and_waits_when_it_cannot():
    cluster = Peering("kubetune", "me", 100)
    kube = FakeKube({("ClusterKopfPeering", None, "kubetune"): {"status": {"other": peer(200, 0)}}})
    assert asyncio.run(cluster.serving(kube, now=NOW)) is False
    assert kube.asked == [("kopf.dev/v1", "ClusterKopfPeering", None, "kubetune")]
    assert asyncio.run(cluster.serving(FakeKube(), now=NOW)) is True  # no peering object: kopf runs alone
    assert asyncio.run(cluster.serving(FakeKube(error=TimeoutError()), now=NOW)) is False
    namespaced = Peering("kubetune", "me", 100, ("a", "b"))
    kube = FakeKube({("KopfPeering", "b", "kubetune"): {"status": {"other": peer(100, 0)}}})
    assert asyncio.run(namespaced.serving(kube, now=NOW)) is False
    assert [a[2] for a in kube.asked] == ["a", "b"]
