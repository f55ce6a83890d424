"""Reading a trainer pod's Prometheus /metrics, treating the pod as untrusted.

A job's trainer runs the user's code and image, so its metrics endpoint can answer anything. The
operator is shared by every tenant, so a scrape must not be a weapon (docs/security.md):
- only the pod's own IP (an IP literal from status.podIP) and a valid port are contacted, and
  redirects are never followed: a 3xx would turn the operator into a proxy to internal endpoints
  whose numbers then land in the attacker's job status (SSRF);
- the answer is read up to MAX_METRICS_BYTES, and a larger one is dropped (a trainer's gauges
  are ~2 KiB; 10 MB of text took 2.5 s of the shared event loop to parse);
- no proxy from the environment and no API credentials are used.
Parsing happens off the event loop (handlers run next_status in a thread).
"""
from __future__ import annotations

import http.client
import ipaddress
from typing import Any, Optional

import aiohttp

MAX_METRICS_BYTES = 64 * 1024


class ScrapeError(Exception):
    """The endpoint answered something the operator does not read (not 200, too large, not text)."""


def pod_metrics_url(pod: dict[str, Any], default_port: int = 9090) -> Optional[str]:
    """http://<podIP>:<port>/metrics for the pod's own IP and its `metrics` container port, or None
    when the pod has no IP yet or the values are not an IP address and a port."""
    raw_ip = (pod.get("status") or {}).get("podIP")
    try:
        ip = ipaddress.ip_address(raw_ip) if isinstance(raw_ip, str) else None
    except ValueError:
        ip = None
    if ip is None:
        return None
    port = default_port
    for container in (pod.get("spec") or {}).get("containers") or []:
        for entry in container.get("ports") or []:
            if entry.get("name") == "metrics":
                port = entry.get("containerPort")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return None
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{host}:{port}/metrics"


async def scrape_metrics(url: str, *, timeout: float, max_bytes: int = MAX_METRICS_BYTES) -> str:
    """GET `url` without following redirects; the body as text, at most max_bytes, else ScrapeError."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False) as session:
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ScrapeError(f"{url} answered {resp.status}; only 200 is read (redirects are not followed)")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise ScrapeError(f"{url} sent {resp.content_length} bytes; the limit is {max_bytes}")
            body = await resp.content.read(max_bytes + 1)
            if len(body) > max_bytes:
                raise ScrapeError(f"{url} sent more than {max_bytes} bytes")
    return _decode(body, url)


def scrape_local(port: int, *, timeout: float = 1.0, max_bytes: int = MAX_METRICS_BYTES) -> Optional[str]:
    """The local backend's scrape of a trainer on 127.0.0.1:port: same rules, blocking; None when the
    trainer does not answer (not serving yet, or already gone) or answers something else."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()  # http.client never follows redirects
        if resp.status != 200:
            return None
        body = resp.read(max_bytes + 1)
        return None if len(body) > max_bytes else _decode(body, f"127.0.0.1:{port}")
    except (OSError, http.client.HTTPException, ScrapeError):
        return None
    finally:
        conn.close()


def _decode(body: bytes, url: str) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ScrapeError(f"{url} sent metrics that are not UTF-8 text") from None
