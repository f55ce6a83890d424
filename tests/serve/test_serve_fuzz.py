"""Fuzzed and malformed requests to the server (issue #25), with hypothesis over real HTTP on
loopback: valid OpenAI requests with 1-3 fields replaced by hostile values (wrong types, huge and
negative numbers, NaN, unicode, deep nesting), random JSON documents, and bytes that are not JSON.
Every answer is a 2xx with a well-formed body or a 4xx in OpenAI's error shape; never a 500.

Why not schemathesis against /openapi.json: the handlers read their bodies themselves (to bound
size and time before parsing, docs/security.md), so the OpenAPI document has no request schemas
and schemathesis would only send empty bodies. CI runs a few dozen examples per endpoint;
`-m slow` runs many more (KUBETUNE_FUZZ_EXAMPLES)."""
from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import running_server

from kubetune.trainer.serve.app import ServeLimits

pytestmark = pytest.mark.timeout(900)

MAX_MODEL_LEN = 48
SEEDS = {
    "/v1/completions": {"model": "tiny", "prompt": "The model is", "max_tokens": 4, "temperature": 0.7, "seed": 1,
                        "stop": ["\n"], "n": 1, "logprobs": 2, "echo": False, "stream": False},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
                             "max_tokens": 4, "temperature": 0, "top_p": 0.9, "logprobs": True, "top_logprobs": 2, "stream": False},
}
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["", "tiny", "alpha", "../../etc/passwd", "\ud800", "\x00", "NaN", "-1", "1e999", "x" * 5000]),
    st.lists(st.one_of(st.integers(-5, 10**6), st.text(max_size=5), st.none()), max_size=5),
    st.dictionaries(st.sampled_from(["role", "content", "type", "text", "name", "x"]), st.one_of(st.text(max_size=5), st.integers(), st.none()), max_size=3),
)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "top_logprobs",
          "echo", "stream", "stream_options", "top_k", "ignore_eos", "logit_bias", "presence_penalty", "response_format",
          "max_completion_tokens", "tools", "user", "suffix", "best_of"]


@st.composite
def requests_for(draw, endpoint: str) -> dict:
    body = json.loads(json.dumps(SEEDS[endpoint]))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()) and field in body:
            del body[field]
        else:
            body[field] = draw(HOSTILE)
    if "messages" in body and isinstance(body["messages"], list) and body["messages"] and draw(st.booleans()):
        body["messages"][-1] = draw(st.one_of(HOSTILE, st.dictionaries(st.sampled_from(["role", "content"]), HOSTILE, max_size=2)))
    return body


def encode(body) -> bytes:
    """JSON as a client library would send it; NaN and infinities as Python's json writes them
    (NaN, Infinity: not JSON, which some clients still send)."""
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def url(tiny_dir):
    from kubetune.trainer.serve.cli import build_app

    app = build_app(str(tiny_dir), served_model_name="tiny", max_concurrency=4, max_queue=16, max_model_len=MAX_MODEL_LEN,
                    device="cpu", limits=ServeLimits(max_request_bytes=64 * 1024, body_timeout=2.0))
    with running_server(app, request_timeout=2.0) as base:
        yield base


def check_answer(response: httpx.Response, stream: bool) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str) and error["message"], body
        return
    assert response.status_code == 200
    if stream:
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", response.text[-300:]
        for event in events[:-1]:
            chunk = json.loads(event[len("data: "):])
            assert "choices" in chunk or "error" in chunk
    else:
        body = response.json()
        assert body["choices"] and body["usage"]["completion_tokens"] >= 0
        for choice in body["choices"]:
            assert choice["finish_reason"] in ("stop", "length")


def post(url: str, endpoint: str, content: bytes) -> httpx.Response:
    return httpx.post(f"{url}{endpoint}", content=content, headers={"Content-Type": "application/json"}, timeout=60)


EXAMPLES = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "400"))
FAST = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
THOROUGH = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


def _fuzz(url: str, endpoint: str, profile: settings) -> None:
    @profile
    @given(body=st.one_of(requests_for(endpoint), JSON))
    def run(body):
        stream = isinstance(body, dict) and body.get("stream") is True
        check_answer(post(url, endpoint, encode(body)), stream)

    run()


@pytest.mark.parametrize("endpoint", sorted(SEEDS))
def test_fuzzed_requests_get_an_answer_or_an_openai_error_never_a_500(url, endpoint):
    _fuzz(url, endpoint, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", sorted(SEEDS))
def test_fuzzed_requests_thoroughly(url, endpoint):
    _fuzz(url, endpoint, THOROUGH)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=st.one_of(st.binary(max_size=200), st.sampled_from([b"", b"{", b"[]", b"null", b'{"model": "tiny", "prompt": "x"', b"\xff\xfe{}",
                                                                b'{"model": "tiny", "prompt": "x", "max_tokens": 1e400}', b"[" * 5000])))
def test_bytes_that_are_not_a_request_get_a_400_in_openai_shape(url, raw):
    for endpoint in SEEDS:
        response = post(url, endpoint, raw)
        assert 400 <= response.status_code < 500, (raw[:80], response.status_code, response.text[:300])
        check_answer(response, stream=False)


def test_the_seeds_are_served(url):
    """The fuzzer starts from requests the server answers (else it tests only refusals)."""
    for endpoint, body in SEEDS.items():
        for stream in (False, True):
            response = post(url, endpoint, encode({**body, "stream": stream}))
            assert response.status_code == 200, response.text[:300]
            check_answer(response, stream)
