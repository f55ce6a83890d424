"""Server faults (issue #25), on loopback, each bounded and stopping by itself: many clients that
disconnect mid-stream (or while they wait), a flood past the queue bound, a slow reader. After
each, the engine's running and waiting counts return to zero (no stuck place), the refused get
429 in OpenAI's error shape, and the server still answers. (One disconnect and one full queue:
test_serve_load.py; hostile single requests: test_serve_hostile.py.)"""
import asyncio
import json
import random
import time

import httpx
import pytest
from serve_helpers import running_server

from kubetune.trainer.serve.app import ServeLimits

pytestmark = pytest.mark.timeout(240)

CONCURRENCY, QUEUE = 2, 4
LONG = {"model": "tiny", "prompt": "The model is", "max_tokens": 400, "stream": True, "ignore_eos": True}


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def idle(url: str) -> bool:
    return metric(url, "kubetune_serve_running_sequences") == 0 and metric(url, "kubetune_serve_waiting_sequences") == 0


def rss_mib() -> float:
    """This process's resident memory (the server runs in it, in a thread)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def openai_error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.fixture(scope="module")
def server(tiny_dir):
    from kubetune.trainer.serve.cli import build_app

    app = build_app(str(tiny_dir), served_model_name="tiny", max_concurrency=CONCURRENCY, max_queue=QUEUE, device="cpu",
                    limits=ServeLimits(allow_ignore_eos=True))
    with running_server(app) as url:
        yield url


def still_serves(url: str) -> None:
    answer = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True}, timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("clients,seed", [pytest.param(12, 0), pytest.param(60, 1, marks=pytest.mark.slow)])
def test_clients_that_disconnect_mid_stream_leave_no_stuck_place(server, clients, seed):
    """Streaming clients close their connection after a random number of chunks (0: at once,
    maybe while still waiting in the queue); the refused ones get 429. Every generation stops."""
    rng = random.Random(seed)
    reads = [rng.randrange(0, 6) for _ in range(clients)]
    cancelled_before = metric(server, "kubetune_serve_cancelled_sequences_total")

    async def one(http: httpx.AsyncClient, chunks: int) -> int:
        async with http.stream("POST", f"{server}/v1/completions", json=LONG) as response:
            if response.status_code != 200:
                await response.aread()
                assert response.status_code == 429 and openai_error(response)["code"] == "rate_limit_exceeded"
                return 429
            lines = response.aiter_lines()
            for _ in range(chunks):
                await lines.__anext__()
            return 200  # leaving the block closes the connection mid-stream

    async def drive() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, n) for n in reads)), timeout=120)

    statuses = asyncio.run(drive())
    assert statuses.count(200) >= CONCURRENCY and set(statuses) <= {200, 429}
    wait_until(lambda: idle(server), what="running and waiting back to zero")
    # every admitted stream was cut short of its 400 tokens: each one cancelled, none finished
    wait_until(lambda: metric(server, "kubetune_serve_cancelled_sequences_total") - cancelled_before == statuses.count(200), what="every cancel")
    still_serves(server)


@pytest.mark.parametrize("clients", [pytest.param(40), pytest.param(300, marks=pytest.mark.slow)])
def test_a_flood_past_the_queue_bound_gets_429s_and_bounded_memory(server, clients):
    """Far more concurrent requests than running + waiting places: each is served or refused at
    once with 429 in OpenAI's shape; the server's memory does not grow with the flood."""
    body = {"model": "tiny", "prompt": "Tell me", "max_tokens": 8, "ignore_eos": True}

    async def drive() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            return await asyncio.wait_for(asyncio.gather(*(http.post(f"{server}/v1/completions", json=body) for _ in range(clients))), timeout=180)

    still_serves(server)  # warm: the first request's allocations are not the flood's
    before = rss_mib()
    answers = asyncio.run(drive())
    grown = rss_mib() - before
    codes = [a.status_code for a in answers]
    # 429: past the running + waiting places; 503: past the open connections (--max-connections)
    assert set(codes) <= {200, 429, 503}, sorted(set(codes))
    assert codes.count(200) >= CONCURRENCY + QUEUE and codes.count(429) >= 1
    for refused in (a for a in answers if a.status_code == 429):
        error = openai_error(refused)
        assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded" and error["message"]
    for refused in (a for a in answers if a.status_code == 503):
        assert openai_error(refused)["code"] == "server_overloaded"
    for served in (a for a in answers if a.status_code == 200):
        assert served.json()["usage"]["completion_tokens"] == 8
    assert grown < 200, f"resident memory grew {grown:.0f} MiB during a flood of {clients}"
    wait_until(lambda: idle(server), what="running and waiting back to zero")
    still_serves(server)


def test_a_slow_reader_holds_no_place_and_gets_its_whole_stream(server):
    """A client that stops reading: its generation still ends (the engine does not wait for the
    reader; what it buffers is at most max_tokens events), the place is freed for others, and the
    reader, resuming, gets every token and [DONE]."""
    request = {**LONG, "max_tokens": 64, "temperature": 0}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server}/v1/completions", json=request) as slow:
            lines = slow.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            wait_until(lambda: idle(server), what="the slow reader's generation to end without it reading")
            for _ in range(CONCURRENCY + 1):  # the places are free for everyone else meanwhile
                still_serves(server)
            time.sleep(0.5)
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in [first, *rest[:-1]]]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    whole = httpx.post(f"{server}/v1/completions", json={**request, "stream": False}, timeout=60).json()
    assert whole["usage"]["completion_tokens"] == 64 and streamed == whole["choices"][0]["text"]  # nothing lost
    wait_until(lambda: idle(server), what="idle")


def test_past_the_connection_limit_the_answer_is_a_503_in_openai_shape(tiny_dir):
    """--max-connections: uvicorn refuses what is past it; the client still gets OpenAI's shape."""
    import socket

    from kubetune.trainer.serve.cli import build_app

    app = build_app(str(tiny_dir), served_model_name="tiny", max_concurrency=1, max_queue=1, device="cpu")
    with running_server(app, max_connections=2) as url:
        host, port = url.removeprefix("http://").split(":")
        idle_connections = [socket.create_connection((host, int(port))) for _ in range(2)]  # hold both places
        try:
            time.sleep(0.2)
            refused = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
        finally:
            for sock in idle_connections:
                sock.close()
        assert refused.status_code == 503 and openai_error(refused)["code"] == "server_overloaded"
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, what="the places freed")
