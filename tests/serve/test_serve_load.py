"""Scheduling under load: a bounded load test loses no request; a full queue answers 429; a client
that goes away cancels its generation and frees its place for the next request."""
import asyncio
import statistics
import threading
import time

import httpx
import openai
import pytest
from serve_helpers import running_server

from kubetune.trainer.serve.app import ServeLimits


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def small_server(tiny_dir):
    """One running sequence and one waiting place: easy to fill."""
    from kubetune.trainer.serve.cli import build_app

    with running_server(build_app(str(tiny_dir), served_model_name="tiny", max_concurrency=1, max_queue=1, device="cpu", limits=ServeLimits(allow_ignore_eos=True))) as url:
        yield url


def test_full_queue_answers_429_and_a_disconnect_cancels_and_frees_the_place(small_server):
    url = small_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    long_request = {"model": "tiny", "prompt": "The model is", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    cancelled_before = metric(url, "kubetune_serve_cancelled_sequences_total")
    tokens_before = metric(url, "kubetune_serve_generated_tokens_total")

    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json=long_request) as running:
            lines = running.iter_lines()  # keep the iterator: dropping it closes the response
            next(lines)  # generating: it holds the only running place
            queued_result = {}
            queued = threading.Thread(
                target=lambda: queued_result.update(r=client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0))
            )
            queued.start()
            wait_until(lambda: metric(url, "kubetune_serve_waiting_sequences") == 1, what="the second request to wait")

            with pytest.raises(openai.RateLimitError) as full:
                client.completions.create(model="tiny", prompt="hi", max_tokens=4)
            assert full.value.code == "rate_limit_exceeded" and full.value.status_code == 429
        # leaving the `with` closed the streaming connection: the long generation must stop
    queued.join(30)
    assert queued_result["r"].usage.completion_tokens >= 1  # it got the freed place
    wait_until(lambda: metric(url, "kubetune_serve_cancelled_sequences_total") == cancelled_before + 1, what="the cancel")
    assert metric(url, "kubetune_serve_generated_tokens_total") - tokens_before < 2000

    with pytest.raises(openai.BadRequestError) as never_fits:  # 1 running + 1 waiting place: n=3 can never run
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, n=3)
    assert never_fits.value.param == "n"

    # a non-streamed request whose client gives up is cancelled too
    cancelled_before = metric(url, "kubetune_serve_cancelled_sequences_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={**long_request, "stream": False}, timeout=0.3)
    wait_until(lambda: metric(url, "kubetune_serve_cancelled_sequences_total") == cancelled_before + 1, what="the cancel")
    wait_until(lambda: metric(url, "kubetune_serve_running_sequences") == 0, what="the running set to empty")
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_bounded_load_loses_no_request_and_reports_latency(tiny_dir, capsys):
    from kubetune.trainer.serve.cli import build_app

    requests, concurrency, max_tokens = 200, 16, 16

    async def drive(url: str) -> list[float]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> float:
            async with gate:
                started = time.monotonic()
                if i % 2:
                    result = await client.completions.create(
                        model="tiny", prompt=f"Request {i}: the team", max_tokens=max_tokens, temperature=0.7, seed=i, extra_body={"ignore_eos": True}
                    )
                    assert result.choices[0].finish_reason == "length"
                else:
                    result = await client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"Question {i}?"}], max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
                    )
                assert result.usage.completion_tokens == max_tokens
                return time.monotonic() - started

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(requests))), timeout=180)
        finally:
            await client.close()

    app = build_app(str(tiny_dir), served_model_name="tiny", max_concurrency=concurrency, max_queue=64, device="cpu", limits=ServeLimits(allow_ignore_eos=True))
    with running_server(app) as url:
        started = time.monotonic()
        latencies = sorted(asyncio.run(drive(url)))
        elapsed = time.monotonic() - started
        served = metric(url, 'kubetune_serve_requests_total{endpoint="/v1/completions",status="200"}') + metric(
            url, 'kubetune_serve_requests_total{endpoint="/v1/chat/completions",status="200"}'
        )
    assert len(latencies) == requests and served == requests
    p50 = statistics.median(latencies)
    p99 = latencies[int(0.99 * (requests - 1))]
    with capsys.disabled():
        print(
            f"\nload test: {requests} requests at concurrency {concurrency}, {max_tokens} tokens each, in {elapsed:.1f}s: "
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, {requests * max_tokens / elapsed:.0f} output tokens/s"
        )


def test_draining_turns_readiness_off_and_refuses_new_work(tiny_dir):
    """What SIGTERM does first (cli.DrainingServer): /readyz 503 and new generation requests 503."""
    from kubetune.trainer.serve.app import begin_draining
    from kubetune.trainer.serve.cli import build_app

    app = build_app(str(tiny_dir), served_model_name="tiny", max_concurrency=1, max_queue=1, device="cpu")
    with running_server(app) as url:
        assert httpx.get(f"{url}/readyz").status_code == 200
        begin_draining(app)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
        refused = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive: do not restart a draining pod
