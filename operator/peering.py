"""Whether this replica serves, under kopf peering (`kubetune operator --peering NAME`).

kopf pauses a replica's watches while a live peer of higher or equal priority is in the peering
object's status; it does not pause the operator's own loops (the FineTuneJob sync, the
EvalJob/ModelDeployment reconciler), which kopf starts once. Those loops ask here before each
round, by the same rule over the same peering object, so a standby neither reads nor writes
until the active replica is gone (it leaves the peering when it stops, or its keep-alive lapses
after `lifetime` seconds when it dies).
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

PEERING_API = "kopf.dev/v1"


def own_identity() -> str:
    """This replica's id in the peering (kopf's default is alike: POD_ID, else user@host/...)."""
    return os.environ.get("POD_ID") or f"{socket.gethostname()}/{uuid.uuid4().hex[:8]}"


def _parse(value: Any) -> Optional[dt.datetime]:
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def blocking_peers(peers: dict[str, Any], *, identity: str, priority: int, now: dt.datetime) -> list[str]:
    """The live peers (other than us) whose priority is higher than or equal to ours: kopf pauses
    us for those (for equal ones it pauses both, and says so)."""
    out = []
    for peer, info in (peers or {}).items():
        if peer == identity or not isinstance(info, dict):
            continue
        lastseen = _parse(info["lastseen"]) if info.get("lastseen") is not None else now
        if lastseen is None:
            continue
        if lastseen + dt.timedelta(seconds=int(info.get("lifetime", 60))) <= now:
            continue  # presumed dead: kopf's rule (Peer.is_dead)
        if int(info.get("priority", 0)) >= priority:
            out.append(peer)
    return out


@dataclass(frozen=True)
class Peering:
    """This replica's place in a peering: the peering object's name, our id and priority, and
    where the object lives (ClusterKopfPeering when cluster-wide, a KopfPeering per namespace)."""

    name: str
    identity: str
    priority: int
    namespaces: Sequence[str] = ()

    async def serving(self, kube: Any, now: Optional[dt.datetime] = None) -> bool:
        """False while a peer blocks us, or while the peering cannot be read (kopf cannot either:
        waiting a round is safer than two replicas writing). A missing peering object: serving
        (kopf then runs without peers)."""
        now = now or dt.datetime.now(dt.timezone.utc)
        where = [(None, "ClusterKopfPeering")] if not self.namespaces else [(ns, "KopfPeering") for ns in self.namespaces]
        for namespace, kind in where:
            try:
                obj = await kube.get(PEERING_API, kind, namespace, self.name)
            except Exception:
                return False
            if obj and blocking_peers(obj.get("status") or {}, identity=self.identity, priority=self.priority, now=now):
                return False
        return True
