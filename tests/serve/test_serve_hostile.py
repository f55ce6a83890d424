"""Hostile input (issue 29): one request must never stall, crash or poison the server for others.

Each test reproduces one finding of the review against the real server on 127.0.0.1 with small,
bounded payloads (only where size is the point do they reach a limit, which the test server sets
low), and every test stops by itself (client timeouts; the module has a timeout marker).
"""
import asyncio
import json
import shutil
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import running_server

from kubetune.trainer.serve.app import ServeLimits

pytestmark = pytest.mark.timeout(240)

LIMITS = ServeLimits(max_request_bytes=64 * 1024, body_timeout=1.0)
MAX_MODEL_LEN = 64
TIMEOUT = 30  # seconds any single client call may take here


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def wait_until(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(tiny_dir, references):
    """The server with its defaults except small body/time limits and a short context; one adapter."""
    from kubetune.trainer.serve.cli import build_app

    app = build_app(
        str(tiny_dir), [("alpha", str(references["adapter_dirs"]["alpha"]))], served_model_name="tiny",
        max_concurrency=4, max_queue=16, max_model_len=MAX_MODEL_LEN, device="cpu", limits=LIMITS,
    )
    with running_server(app, request_timeout=1.0) as url:
        yield {"url": url, "app": app}


def complete(url, timeout=TIMEOUT, **body):
    return httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "The model is", **body}, timeout=timeout)


# 1. seed overflow left orphaned sequences ------------------------------------------------------


def test_an_oversized_seed_is_refused_and_queues_nothing(server):
    url = server["url"]
    for _ in range(3):
        refused = complete(url, seed=2**64 - 16, n=4, max_tokens=40, temperature=1.0)
        assert refused.status_code == 400 and error_of(refused)["param"] == "seed"
    assert metric(url, "kubetune_serve_waiting_sequences") == 0
    assert metric(url, "kubetune_serve_running_sequences") == 0
    # the top of the accepted range with n > 1 works (seed + choice must not overflow part-way)
    top = complete(url, seed=2**63 - 2, n=4, max_tokens=3, temperature=1.0)
    assert top.status_code == 200 and len(top.json()["choices"]) == 4


def test_a_request_is_admitted_all_or_nothing(server, monkeypatch):
    """If building any of a request's sequences fails, none of them is left queued."""
    from kubetune.trainer.serve import engine as engine_module
    from kubetune.trainer.serve.sampling import SamplingParams

    engine = server["app"].state.server.engine
    real = engine_module.make_generator

    def fails_on_the_third_choice(params, choice):
        if choice == 2:
            raise OverflowError("injected")
        return real(params, choice)

    monkeypatch.setattr(engine_module, "make_generator", fails_on_the_third_choice)

    async def submit():
        engine.submit([[1, 2, 3]], SamplingParams(max_tokens=500, temperature=1.0, seed=1), n=4)

    with pytest.raises(OverflowError):
        asyncio.run(submit())
    assert engine._waiting_count == 0 and not engine._waiting and not engine._load
    monkeypatch.undo()
    assert complete(server["url"], max_tokens=2).status_code == 200


# 2. a tiny temperature failed every request batched with it -----------------------------------


def test_a_tiny_temperature_is_greedy_and_fails_no_batch_mate(server):
    url = server["url"]
    prompts = ["The model is", "In 2020, the team", "What is the capital", "Hello there"]
    greedy = [complete(url, prompt=p, max_tokens=12, temperature=0).json()["choices"][0]["text"] for p in prompts]

    async def together():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            bodies = [{"model": "tiny", "prompt": p, "max_tokens": 12, "temperature": 0, "stream": True} for p in prompts]
            bodies[0]["temperature"] = 1.7e-39  # scaled logits overflow to inf/NaN unless handled

            async def one(body):
                text = ""
                async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            assert "error" not in chunk, chunk
                            text += chunk["choices"][0]["text"]
                return text

            return await asyncio.gather(*(one(b) for b in bodies))

    assert asyncio.run(together()) == greedy


def test_sampling_masks_non_finite_logits_and_refuses_an_all_nan_row():
    import torch

    from kubetune.trainer.serve.sampling import SamplingError, SamplingParams, clean_logits, sample_token

    logits = torch.tensor([1.0, float("nan"), float("inf"), 0.5, 9.0, 9.0])
    cleaned = clean_logits(logits, vocab_limit=4)  # ids 4 and 5 are beyond the tokenizer
    assert cleaned.tolist()[:4] == [1.0, float("-inf"), float("-inf"), 0.5] and cleaned[4:].eq(float("-inf")).all()
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=0)
    generator = torch.Generator().manual_seed(0)
    assert {sample_token(cleaned, params, generator) for _ in range(200)} <= {0, 3}
    with pytest.raises(SamplingError):
        sample_token(torch.full((4,), float("nan")), params, generator)


# 3. unbounded bodies, tokenizing on the event loop, no read timeouts --------------------------


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    url = server["url"]
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # claims 20 MB and sends none of it: the answer must not wait for the body
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 20000000\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")

    def chunks():  # no Content-Length: the cap applies to the bytes actually read
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    chunked = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=TIMEOUT)
    assert chunked.status_code == 413 and error_of(chunked)["code"] == "request_too_large"


def test_text_longer_than_the_context_can_hold_is_refused_before_tokenizing(server):
    from kubetune.trainer.serve.app import MAX_CHARS_PER_TOKEN

    tokenizer = server["app"].state.server.tokenizer
    calls = []
    original = tokenizer.encode
    tokenizer.encode = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        text = "word " * (MAX_MODEL_LEN * MAX_CHARS_PER_TOKEN // 5 + 1)
        refused = complete(server["url"], prompt=text, max_tokens=1)
        chat = httpx.post(f"{server['url']}/v1/chat/completions", timeout=TIMEOUT,
                          json={"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 1})
    finally:
        tokenizer.encode = original
    assert refused.status_code == 400 and error_of(refused)["code"] == "context_length_exceeded"
    assert chat.status_code == 400 and error_of(chat)["code"] == "context_length_exceeded"
    assert calls == []  # never tokenized


def test_half_sent_requests_are_closed_or_answered_after_the_timeout(server):
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as head_only, \
            socket.create_connection((host, int(port)), timeout=10) as half_body:
        head_only.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"model\": ")  # 10 of 100 bytes
        started = time.monotonic()
        assert half_body.recv(4096).startswith(b"HTTP/1.1 408")
        assert head_only.recv(4096) == b""  # closed by the server
        assert time.monotonic() - started < 8  # the test server's timeouts are 1 s


# 4. an exception in the engine loop killed it and requests hung forever -----------------------


@pytest.fixture(scope="module")
def small_tokenizer_model(tiny_dir, tmp_path_factory):
    """builtin://tiny's weights (vocab 1024) with a 500-piece sentencepiece tokenizer: the model can
    produce ids the tokenizer cannot decode (the vocab check allows a smaller tokenizer)."""
    import sentencepiece as spm

    from kubetune.trainer.builtin import english_corpus

    folder = tmp_path_factory.mktemp("small-vocab")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_dir / name).exists():
            shutil.copy(tiny_dir / name, folder / name)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(english_corpus(300)), model_prefix=str(folder / "tokenizer"), vocab_size=500,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    ))
    return folder


def test_ids_beyond_the_tokenizer_are_never_sampled(small_tokenizer_model):
    from kubetune.trainer.serve.cli import build_app

    app = build_app(str(small_tokenizer_model), served_model_name="tiny", max_concurrency=2, max_queue=4, device="cpu")
    assert app.state.server.tokenizer.vocab_size == 500 and app.state.server.engine.runner.model.lm_head.out_features == 1024
    with running_server(app) as url:
        for seed in range(3):  # at temperature 2 over 1024 ids, about half the draws would be >= 500
            answer = complete(url, prompt="The team", max_tokens=24, temperature=2.0, seed=seed)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_if_the_engine_loop_dies_every_pending_request_fails_at_once(tiny_dir):
    from kubetune.trainer.serve.cli import build_app

    app = build_app(str(tiny_dir), served_model_name="tiny", max_concurrency=1, max_queue=4, device="cpu")
    engine = app.state.server.engine
    gate = threading.Event()
    real_step = engine._step

    def step_then_die(batch, groups):
        real_step(batch, groups)
        gate.wait(TIMEOUT)
        raise RuntimeError("injected: a bug outside the per-row guards")

    engine._step = step_then_die
    with running_server(app) as url:
        results = {}

        def call(i):
            results[i] = complete(url, prompt=f"Request {i}", max_tokens=30)

        callers = [threading.Thread(target=call, args=(i,)) for i in range(3)]  # one running, two waiting
        for t in callers:
            t.start()
        wait_until(lambda: metric(url, "kubetune_serve_waiting_sequences") == 2, what="two waiting")
        gate.set()
        for t in callers:
            t.join(TIMEOUT)
        assert sorted(r.status_code for r in results.values()) == [500, 500, 500]
        assert all(error_of(r)["code"] == "generation_failed" for r in results.values())
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert httpx.get(f"{url}/healthz").status_code == 503
        assert complete(url, max_tokens=2).status_code == 503


# 5. stop strings: quadratic matching on the shared thread -------------------------------------


def test_stop_strings_are_bounded(server):
    from kubetune.trainer.serve.protocol import MAX_STOP_CHARS

    huge = complete(server["url"], stop=["x" * 10_000] * 4, max_tokens=4)  # under the body cap
    assert huge.status_code == 400 and error_of(huge)["param"] == "stop"
    many = complete(server["url"], stop=[str(i) for i in range(17)], max_tokens=4)
    assert many.status_code == 400 and error_of(many)["param"] == "stop"
    assert complete(server["url"], stop=["y" * MAX_STOP_CHARS] * 16, max_tokens=4).status_code == 200


def test_stop_matching_at_the_limits_holds_back_only_what_could_still_stop():
    """16 stop strings at the length limit: a tail that may start one is held back, anything else is
    released at once, and the text before a stop string ends where it starts."""
    from kubetune.trainer.serve.protocol import MAX_STOP, MAX_STOP_CHARS
    from kubetune.trainer.serve.sampling import TextStream

    class Letters:
        def decode(self, ids, skip_special_tokens=True):
            return "".join("abcdefghijklmnopqrstuvwxyz"[i] for i in ids)

    stops = ["a" * (MAX_STOP_CHARS - 2) + "b" + "cdefghijklmnopqr"[i] for i in range(MAX_STOP)]
    started = time.monotonic()
    held = TextStream(Letters(), stops)
    # a tail of up to 254 a's may still start a stop string: held back; older a's are released
    assert [held.push(0)[0] for _ in range(300)] == [""] * (MAX_STOP_CHARS - 2) + ["a"] * (300 - MAX_STOP_CHARS + 2)
    released = TextStream(Letters(), stops)
    assert [released.push(1)[0] for _ in range(300)] == ["b"] * 300  # no stop starts with b
    hit = TextStream(Letters(), stops)
    for token in [25] + [0] * (MAX_STOP_CHARS - 2) + [1]:
        assert hit.push(token) == ("z" if token == 25 else "", False)
    assert hit.push(4) == ("", True) and hit.text == "z"  # "a...abe" is stop 2: the text ends before it
    assert time.monotonic() - started < 2.0  # the work per token is bounded by the stop lengths


# 6. no authentication, no per-client limits or fairness, ignore_eos for everyone --------------


@pytest.fixture(scope="module")
def keyed(tiny_dir):
    from kubetune.trainer.serve.cli import build_app

    app = build_app(
        str(tiny_dir), served_model_name="tiny", max_concurrency=1, max_queue=8, max_per_client=3, device="cpu",
        limits=ServeLimits(api_keys=("key-of-alice", "key-of-bobby"), allow_ignore_eos=True),
    )
    with running_server(app) as url:
        yield url


def headers(key):
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_are_required_on_the_api_but_not_on_probes(keyed):
    url = keyed
    assert httpx.get(f"{url}/v1/models").status_code == 401
    wrong = httpx.get(f"{url}/v1/models", headers=headers("key-of-mallory"))
    assert wrong.status_code == 401 and error_of(wrong)["code"] == "invalid_api_key"
    assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi"}).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=headers("key-of-alice")).status_code == 200
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{url}{probe}").status_code == 200


def test_clients_take_turns_and_each_has_a_limit(keyed):
    """One running place: alice's n=3 request and then bob's request; bob runs second, not fourth."""
    url = keyed
    finished = {}

    def alice():
        body = {"model": "tiny", "prompt": "The model is", "max_tokens": 500, "n": 3, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers("key-of-alice"), timeout=TIMEOUT) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    finished.setdefault(("alice", choice["index"]), None)
                    if choice["finish_reason"]:
                        finished[("alice", choice["index"])] = time.monotonic()

    thread = threading.Thread(target=alice)
    thread.start()
    wait_until(lambda: ("alice", 0) in finished, what="alice's first choice to run")
    over = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                      headers=headers("key-of-alice"), timeout=TIMEOUT)
    assert over.status_code == 429 and "each client" in error_of(over)["message"]  # 3 + 1 > 3 per client
    bob = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 60, "ignore_eos": True},
                     headers=headers("key-of-bobby"), timeout=TIMEOUT)
    bob_done = time.monotonic()
    thread.join(TIMEOUT)
    assert bob.status_code == 200
    assert finished[("alice", 0)] < bob_done < finished[("alice", 1)] < finished[("alice", 2)]


def test_ignore_eos_and_large_n_are_refused_by_default(server):
    refused = complete(server["url"], ignore_eos=True, max_tokens=4)
    assert refused.status_code == 400 and error_of(refused)["param"] == "ignore_eos"
    too_many = complete(server["url"], n=17, max_tokens=1)
    assert too_many.status_code == 400 and error_of(too_many)["param"] == "n"


def test_api_keys_come_from_flags_env_and_a_secret_file(tmp_path):
    from kubetune.errors import KubetuneError
    from kubetune.trainer.serve.cli import read_api_keys

    secret = tmp_path / "api-keys"
    secret.write_text("from-the-file-1\n\nfrom-the-file-2\n")
    env = {"KUBETUNE_SERVE_API_KEY": "from-the-env", "KUBETUNE_SERVE_API_KEY_FILE": str(secret)}
    assert read_api_keys(["from-a-flag"], None, env) == ("from-a-flag", "from-the-env", "from-the-file-1", "from-the-file-2")
    assert read_api_keys([], None, {}) == ()
    with pytest.raises(KubetuneError, match="8 characters"):
        read_api_keys(["short"], None, {})


# 7. errors exposed internals -------------------------------------------------------------------


def test_responses_name_no_server_paths_and_no_other_models(server, tiny_dir, references):
    url = server["url"]
    models = httpx.get(f"{url}/v1/models").text
    assert str(tiny_dir) not in models and "root" not in json.loads(models)["data"][0]
    unknown = complete(url, model="nope")
    assert unknown.status_code == 404 and "alpha" not in unknown.text and "tiny" not in error_of(unknown)["message"]


def test_lone_surrogates_and_deep_nesting_are_400s(server):
    url = server["url"]
    surrogate = httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}',
                           headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert surrogate.status_code == 400 and "surrogate" in error_of(surrogate)["message"]
    nested = b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    deep = httpx.post(f"{url}/v1/completions", content=nested, headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert deep.status_code == 400 and "nested" in error_of(deep)["message"]


def test_unexpected_errors_are_a_generic_500_with_a_request_id(server, monkeypatch, caplog):
    tokenizer = server["app"].state.server.tokenizer
    secret = f"boom at {tokenizer.path}/secret.py"

    def broken(*args, **kwargs):
        raise ValueError(secret)

    monkeypatch.setattr(tokenizer, "encode", broken)
    with caplog.at_level("ERROR"):
        failed = complete(server["url"], max_tokens=2)
    assert failed.status_code == 500
    error = error_of(failed)
    assert error["code"] == "internal_error" and "request id req-" in error["message"]
    assert str(tokenizer.path) not in failed.text and "boom" not in failed.text
    request_id = error["message"].split("request id ")[1].split(")")[0]
    assert any(request_id in record.getMessage() for record in caplog.records)  # the detail is in the log
