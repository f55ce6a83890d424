"""The operator's scrape of a trainer pod's /metrics treats the pod as hostile (issue 29, finding 8):
no redirects (SSRF), a size cap, only the pod's own IP and port. Loopback servers only."""
from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubetune.operator.scrape import MAX_METRICS_BYTES, ScrapeError, pod_metrics_url, scrape_local, scrape_metrics
from ophelpers import NS, eventually, manifest
from test_operator_emulated import rank0_pod

pytestmark = [pytest.mark.timeout(60)]

GAUGES = "kubetune_train_step {step}\nkubetune_train_total_steps 100\n"


class Endpoint:
    """A loopback HTTP server answering every GET with (status, headers, body) from `answer`; counts hits."""

    def __init__(self, answer):
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                outer.hits += 1
                status, headers, body = answer()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints():
    made = []

    def make(answer):
        made.append(Endpoint(answer))
        return made[-1]

    yield make
    for endpoint in made:
        endpoint.close()


@pytest.mark.asyncio
async def test_scrape_does_not_follow_redirects_nor_read_past_the_cap(endpoints):
    internal = endpoints(lambda: (200, {}, GAUGES.format(step=77).encode()))
    redirect = endpoints(lambda: (302, {"Location": internal.url}, b""))
    with pytest.raises(ScrapeError, match="302"):
        await scrape_metrics(redirect.url, timeout=5)
    assert internal.hits == 0

    padding = b"# " + b"x" * MAX_METRICS_BYTES + b"\n"
    huge = endpoints(lambda: (200, {}, padding + GAUGES.format(step=5).encode()))
    with pytest.raises(ScrapeError, match="bytes"):
        await scrape_metrics(huge.url, timeout=5)
    assert scrape_local(huge.port) is None and scrape_local(redirect.port) is None and internal.hits == 0

    fine = endpoints(lambda: (200, {}, GAUGES.format(step=3).encode()))
    assert "kubetune_train_step 3" in await scrape_metrics(fine.url, timeout=5)
    assert "kubetune_train_step 3" in scrape_local(fine.port)


def test_only_the_pods_own_ip_and_a_valid_port_are_scraped():
    def pod(ip, port=9090):
        return {"status": {"podIP": ip}, "spec": {"containers": [{"ports": [{"name": "metrics", "containerPort": port}]}]}}

    assert pod_metrics_url(pod("10.1.2.3")) == "http://10.1.2.3:9090/metrics"
    assert pod_metrics_url(pod("fd00::5", 9091)) == "http://[fd00::5]:9091/metrics"
    for bad in (pod("evil.example.com"), pod("10.1.2.3/admin?"), pod("10.1.2.3", 0), pod("10.1.2.3", "9090"), pod(None)):
        assert pod_metrics_url(bad) is None


@pytest.mark.asyncio
async def test_a_redirecting_trainer_cannot_copy_another_endpoints_numbers_into_its_status(api, operator, endpoints):
    """Rank 0 answers 302 to an 'internal' endpoint: the operator must not fetch it, and the job's
    status must not show its step (before: it followed the redirect and copied step 77)."""
    internal = endpoints(lambda: (200, {}, GAUGES.format(step=77).encode()))
    redirect = endpoints(lambda: (302, {"Location": internal.url}, b""))
    async with operator():
        await api.create_ftj(manifest())
        await eventually(lambda: api.status("tiny").get("phase") == "Pending")
        pods = f"/api/v1/namespaces/{NS}/pods"
        (job,) = api.children("batch/v1/jobs")
        await api.post(pods, rank0_pod(redirect.port, job))
        await api.patch(f"{pods}/tiny-0-abcde/status", {"status": {"phase": "Running", "podIP": "127.0.0.1"}})
        await api.patch(f"/apis/batch/v1/namespaces/{NS}/jobs/tiny/status", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}})
        await eventually(lambda: api.status("tiny").get("phase") == "Running", what="Running")
        await eventually(lambda: redirect.hits >= 3, what="three scrapes of the redirecting pod")
        await asyncio.sleep(0.3)  # one more sync round after the last scrape
    assert internal.hits == 0
    assert (api.status("tiny").get("progress") or {}).get("step") != 77
