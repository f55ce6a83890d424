"""The HTTP layer: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (with SSE streaming),
/healthz, /readyz and /metrics, on FastAPI. Errors always have OpenAI's shape
{"error": {"message", "type", "param", "code"}}.

Hostile input (docs/security.md): the body is read with a size cap and a timeout; JSON parsing,
tokenizing and chat templates run in a small worker pool, never on the event loop, and text longer
than the context could hold is refused before it is tokenized; with API keys, /v1/* needs
`Authorization: Bearer <key>` and each key is its own client for the engine's fairness and limits;
500s say only "error" and a request id (the detail is in the server log), and no response names a
file on the server."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetune.errors import KubetuneError
from kubetune.trainer.serve.engine import Engine, Event, RequestHandle, engine_dead
from kubetune.trainer.serve.errors import ServeError, ShuttingDownError, internal_error, invalid_request, model_not_found
from kubetune.trainer.serve.metrics import ServeMetrics
from kubetune.trainer.serve.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from kubetune.trainer.serve.sampling import SamplingParams

log = logging.getLogger(__name__)

_API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")

# A token covers at most this many characters of text for the length check before tokenizing
# (real vocabularies: a few; long runs of spaces or '=' can merge into one token of ~16-64).
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost the server (docs/security.md has each default and why)."""

    max_request_bytes: int = 1 << 20  # request body (Content-Length and bytes actually read)
    body_timeout: float = 30.0  # seconds to receive the whole body once the headers arrived
    tokenizer_workers: int = 2  # threads for JSON parsing, chat templates and tokenizing
    allow_ignore_eos: bool = False  # `ignore_eos` lets a client force max-length generations
    api_keys: tuple[str, ...] = ()  # empty: no authentication (loopback / trusted network only)


@dataclass(frozen=True)
class ServedModel:
    """A name clients put in `model`: the base model (adapter 0) or one LoRA adapter on it."""

    name: str
    adapter: int
    root: str  # folder it was loaded from
    parent: Optional[str] = None  # the base model's name, for adapters


class _Server:
    """Everything a request handler needs; lives on app.state.server."""

    def __init__(self, engine: Engine, tokenizer, models: list[ServedModel], metrics: ServeMetrics, limits: ServeLimits) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.models = {model.name: model for model in models}
        self.metrics = metrics
        self.limits = limits
        self.draining = False
        self.created = int(time.time())
        self.pool = ThreadPoolExecutor(max_workers=limits.tokenizer_workers, thread_name_prefix="kubetune-serve-tokenize")
        # folders on this machine, never to appear in a response
        self.private_paths = sorted({str(m.root) for m in models} | {str(getattr(tokenizer, "path", ""))} - {""}, key=len, reverse=True)

    def resolve(self, name: str) -> ServedModel:
        if name not in self.models:
            raise model_not_found(name)
        return self.models[name]

    def authenticate(self, request: Request) -> str:
        """The client's name for the engine (fairness, per-client limits): "key<i>" of the API key
        used, or "" when the server has no keys. 401 in OpenAI's shape for a missing or wrong key."""
        if not self.limits.api_keys:
            return ""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given:
            for index, key in enumerate(self.limits.api_keys):
                if hmac.compare_digest(given.strip().encode(), key.encode()):
                    return f"key{index}"
        raise ServeError(
            "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
            status_code=401,
            param=None,
            code="invalid_api_key",
        )

    async def offload(self, fn: Callable, *args):
        """Run CPU work of a request (parsing, templates, tokenizing) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def token_text(self, token: int) -> str:
        """One token as text (logprobs' `token`): special tokens included; "" if it cannot be decoded."""
        try:
            return self.tokenizer.decode([token], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - an id the tokenizer does not know
            return ""

    def scrub(self, text: str) -> str:
        """`text` without the server's folders (error messages of tokenizers and templates name them)."""
        for path in self.private_paths:
            text = text.replace(path, "<model>")
        return text

    def check_accepting(self) -> None:
        if self.engine.dead:
            raise engine_dead()
        if self.draining or not self.engine.accepting:
            raise ShuttingDownError()

    def record(self, endpoint: str, status: int, started: Optional[float] = None) -> None:
        label = endpoint if endpoint in _API_PATHS else "other"
        self.metrics.requests.labels(endpoint=label, status=str(status)).inc()
        if started is not None and label != "other":
            self.metrics.latency.labels(endpoint=label).observe(time.monotonic() - started)


def begin_draining(app: FastAPI) -> None:
    """Called on SIGTERM: /readyz turns 503 and new generation requests get 503; running ones finish."""
    app.state.server.draining = True


def create_app(
    engine: Engine,
    tokenizer,
    models: list[ServedModel],
    metrics: Optional[ServeMetrics] = None,
    limits: ServeLimits = ServeLimits(),
) -> FastAPI:
    metrics = metrics or engine.metrics or ServeMetrics()
    server = _Server(engine, tokenizer, models, metrics, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        # uvicorn calls this after in-flight requests finished; the engine drains what is left.
        server.draining = True
        await asyncio.to_thread(engine.shutdown)
        server.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kubetune serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError) -> JSONResponse:
        server.record(request.url.path, err.status_code)
        return JSONResponse(err.body(), status_code=err.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        server.record(request.url.path, err.status_code)
        error = ServeError(str(err.detail), status_code=err.status_code, code=None)
        return JSONResponse(error.body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        server.record(request.url.path, 400)
        return JSONResponse(invalid_request(str(err.errors()[0].get("msg"))).body(), status_code=400)

    @app.exception_handler(KubetuneError)
    async def _request_content_error(request: Request, err: KubetuneError) -> JSONResponse:
        # e.g. a chat template that rejects the messages: a problem with this request's content
        return await _serve_error(request, invalid_request(server.scrub(str(err))))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        request_id = f"req-{uuid.uuid4().hex}"
        log.error("request %s to %s failed", request_id, request.url.path, exc_info=err)
        server.record(request.url.path, 500)
        return JSONResponse(internal_error(request_id).body(), status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict:
        if not (engine.alive or server.draining):  # the engine thread died: restart the pod
            raise ServeError("the generation engine stopped", status_code=503, type="server_error", code="engine_dead")
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict:
        server.check_accepting()
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        server.authenticate(request)
        server.record("/v1/models", 200)
        return {
            "object": "list",
            "data": [
                {  # no `root`: the folder a model was loaded from is the server's business
                    "id": model.name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "kubetune",
                    "parent": model.parent,
                    "max_model_len": engine.max_model_len,
                }
                for model in server.models.values()
            ],
        }

    def first_token(endpoint: str, started: float):
        return lambda: metrics.time_to_first_token.labels(endpoint=endpoint).observe(time.monotonic() - started)

    async def read_request(request: Request, model_cls) -> tuple[Any, ServedModel, str]:
        """(validated body, model, client) or an OpenAI-shaped error; the costly parts off the loop."""
        client = server.authenticate(request)
        raw = await _read_body(request, limits.max_request_bytes, limits.body_timeout)
        body = await server.offload(_parse_body, model_cls, raw)
        model = server.resolve(body.model)
        server.check_accepting()
        if body.ignore_eos and not limits.allow_ignore_eos:
            raise invalid_request("`ignore_eos` is disabled on this server (start it with --allow-ignore-eos).", param="ignore_eos")
        return body, model, client

    max_chars = engine.max_model_len * MAX_CHARS_PER_TOKEN

    @app.post("/v1/completions")
    async def completions(request: Request):
        started, endpoint = time.monotonic(), "/v1/completions"
        body, model, client = await read_request(request, CompletionRequest)
        prompts = await server.offload(_completion_prompts, body.prompt, tokenizer, max_chars)
        params = _sampling_params(body, body.max_tokens, prompts, engine.max_model_len)
        echo = None
        if body.echo:  # each choice starts with its prompt's text (as the client sent it, or decoded ids)
            texts = [body.prompt] if isinstance(body.prompt, str) else [
                item if isinstance(item, str) else tokenizer.decode(ids) for item, ids in zip(_as_list(body.prompt), prompts)
            ]
            echo = [texts[choice // body.n] for choice in range(len(prompts) * body.n)]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        handle = engine.submit(prompts, params, adapter=model.adapter, n=body.n, client=client, request_id=request_id)
        reply = _Reply(
            request_id, "text_completion", model.name, handle, chat=False, on_first_token=first_token(endpoint, started),
            logprobs=body.logprobs is not None, echo=echo, token_text=server.token_text,
        )
        if body.stream:
            return _sse(reply, body.include_usage_in_stream, server, endpoint, started)
        return await _complete(reply, request, server, endpoint, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started, endpoint = time.monotonic(), "/v1/chat/completions"
        body, model, client = await read_request(request, ChatCompletionRequest)
        messages = [message.as_template_message() for message in body.messages]
        _check_text_length(sum(len(m["content"]) for m in messages), max_chars, engine.max_model_len, "messages")
        prompt = await server.offload(lambda: tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        params = _sampling_params(body, body.max_new_tokens, [prompt], engine.max_model_len)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        handle = engine.submit([prompt], params, adapter=model.adapter, n=body.n, client=client, request_id=request_id)
        reply = _Reply(
            request_id, "chat.completion", model.name, handle, chat=True, on_first_token=first_token(endpoint, started),
            logprobs=bool(body.logprobs), token_text=server.token_text,
        )
        if body.stream:
            return _sse(reply, body.include_usage_in_stream, server, endpoint, started)
        return await _complete(reply, request, server, endpoint, started)

    return app


def _too_large(limit: int) -> ServeError:
    return ServeError(
        f"The request body is larger than this server's limit of {limit} bytes.",
        status_code=413,
        code="request_too_large",
    )


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused (413) past `limit` bytes, by its Content-Length before reading anything, and
    while reading for chunked bodies; a client that sends it too slowly gets 408."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid_request("The Content-Length header is not a number.")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0

    async def receive_all() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), timeout)
    except asyncio.TimeoutError:
        raise ServeError(
            f"The request body did not arrive within {timeout:g} seconds.", status_code=408, code="request_timeout"
        ) from None
    return b"".join(chunks)


def _parse_body(model_cls, raw: bytes):
    """JSON -> a validated request (runs in the worker pool: parsing a large body takes a while)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise invalid_request(f"The request body is not valid JSON: {err}.") from None
    except RecursionError:
        raise invalid_request("The request body is nested too deeply.") from None
    return parse_request(model_cls, data)


def _check_text_length(chars: int, max_chars: int, max_model_len: int, param: str) -> None:
    """Refuse text that cannot fit the context before spending time tokenizing it."""
    if chars > max_chars:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens; {chars} characters of text cannot "
            "fit in it. Please shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def _completion_prompts(prompt, tokenizer, max_chars: int) -> list[list[int]]:
    """`prompt` as token ids per prompt: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        _check_text_length(len(prompt), max_chars, max_chars // MAX_CHARS_PER_TOKEN, "prompt")
        return [tokenizer.encode(prompt, add_bos=True)]
    if not prompt:
        raise invalid_request("`prompt` is empty.", param="prompt")
    if all(isinstance(item, int) for item in prompt):
        prompts = [list(prompt)]
    elif all(isinstance(item, str) for item in prompt):
        for text in prompt:
            _check_text_length(len(text), max_chars, max_chars // MAX_CHARS_PER_TOKEN, "prompt")
        prompts = [tokenizer.encode(text, add_bos=True) for text in prompt]
    else:
        prompts = [list(ids) for ids in prompt]
    for ids in prompts:
        if not ids:
            raise invalid_request("A prompt has no tokens.", param="prompt")
        bad = [token for token in ids if not 0 <= token < tokenizer.vocab_size]
        if bad:
            raise invalid_request(f"Token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1}).", param="prompt")
    return prompts


def _as_list(prompt) -> list:
    """A completion prompt as a list of prompts (a string or a list of ids is one prompt)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _sampling_params(body, max_tokens: Optional[int], prompts: list[list[int]], max_model_len: int) -> SamplingParams:
    """Check the lengths against the context (400 like OpenAI's) and build the sampling settings."""
    longest = max(len(ids) for ids in prompts)
    if longest >= max_model_len:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has {longest} "
            "tokens. Please shorten the prompt.",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:  # chat default: as many as fit
        max_tokens = max_model_len - longest
    if longest + max_tokens > max_model_len:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion). "
            "Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if isinstance(body, ChatCompletionRequest):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_logprobs = False
    else:
        logprobs = body.logprobs
        prompt_logprobs = body.echo and body.logprobs is not None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_list,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


class _Reply:
    """Builds OpenAI's response objects (whole or as stream chunks) from a request's events."""

    def __init__(
        self,
        request_id: str,
        kind: str,
        model: str,
        handle: RequestHandle,
        *,
        chat: bool,
        on_first_token,
        logprobs: bool = False,
        echo: Optional[list[str]] = None,
        token_text: Callable[[int], str] = str,
    ) -> None:
        self.id = request_id
        self.kind = kind
        self.model = model
        self.handle = handle
        self.chat = chat
        self.created = int(time.time())
        self.on_first_token = on_first_token
        self.seen_first_token = False
        self.logprobs = logprobs
        self.echo = echo  # per choice: the prompt text that opens it (completions' echo)
        self.token_text = token_text

    def _events(self) -> AsyncIterator[Event]:
        return self.handle.events()

    def usage(self) -> dict[str, int]:
        prompt, completion = self.handle.prompt_tokens, self.handle.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _envelope(self, choices: list[dict], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion.chunk" if (chunk and self.chat) else self.kind
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    async def collect(self) -> Optional[dict[str, Any]]:
        """The whole response, or None when the request was cancelled (the client went away)."""
        n = self.handle.n
        texts = list(self.echo) if self.echo else [""] * n
        reasons: list[Optional[str]] = [None] * n
        tokens: list[list] = [[] for _ in range(n)]
        async for event in self._events():
            if not event.prompt:
                self._mark_first()
            if event.error:
                raise self._failed(event)
            texts[event.choice] += event.text
            tokens[event.choice].extend(event.logprobs)
            if event.finish_reason:
                reasons[event.choice] = event.finish_reason
        if self.handle.cancelled:
            return None
        choices = []
        for index, (text, reason) in enumerate(zip(texts, reasons)):
            logprobs = self._logprobs(tokens[index]) if self.logprobs else None
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
        return {**self._envelope(choices, chunk=False), "usage": self.usage()}

    async def stream(self, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        extra = {"usage": None} if include_usage else {}
        if self.chat:  # OpenAI opens each choice with the assistant role
            for index in range(self.handle.n):
                delta = {"role": "assistant", "content": ""}
                yield {**self._envelope([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}], True), **extra}
        echoed = [False] * self.handle.n
        pending: list[list] = [[] for _ in range(self.handle.n)]  # logprobs of tokens whose text is held back
        async for event in self._events():
            if not event.prompt:
                self._mark_first()
            if event.error:
                yield self._failed(event).body()
                return
            pending[event.choice].extend(event.logprobs)
            text = event.text
            if self.echo and not echoed[event.choice]:
                echoed[event.choice] = True
                text = self.echo[event.choice] + text
            if not text and event.finish_reason is None and not (event.prompt and self.logprobs):
                continue  # held-back text (a possible stop string): nothing to send yet
            logprobs = self._logprobs(pending[event.choice]) if self.logprobs else None
            pending[event.choice] = []
            if self.chat:
                delta = {"content": text} if text else {}
                choice = {"index": event.choice, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
            else:
                choice = {"index": event.choice, "text": text, "logprobs": logprobs, "finish_reason": event.finish_reason}
            yield {**self._envelope([choice], chunk=True), **extra}
        if include_usage:
            yield {**self._envelope([], chunk=True), "usage": self.usage()}

    def _logprobs(self, items) -> dict[str, Any]:
        """OpenAI's logprobs object: chat {"content": [...]}, completions {tokens, token_logprobs, top_logprobs, text_offset}."""
        if self.chat:
            def entry(token: int, logprob: float) -> dict[str, Any]:
                text = self.token_text(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

            return {"content": [
                {**entry(item.token, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top]} for item in items
            ]}
        strings = [self.token_text(item.token) for item in items]
        offsets, at = [], 0
        for string in strings:
            offsets.append(at)
            at += len(string)
        return {
            "tokens": strings,
            "token_logprobs": [item.logprob for item in items],
            "top_logprobs": [
                None if item.logprob is None else {self.token_text(t): lp for t, lp in item.top} for item in items
            ],
            "text_offset": offsets,
        }

    def _failed(self, event: Event) -> ServeError:
        # the engine logged the cause under this request id; the client gets no internals
        message = f"{event.error} (request id {self.id}); the server log has the details."
        return ServeError(message, status_code=500, type="server_error", code="generation_failed")

    def _mark_first(self) -> None:
        if not self.seen_first_token:
            self.seen_first_token = True
            self.on_first_token()


async def _complete(reply: _Reply, request: Request, server: _Server, endpoint: str, started: float) -> JSONResponse:
    """A whole (non-streamed) response; the generation is cancelled if the client disconnects first."""

    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        reply.handle.cancel()

    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        result = await reply.collect()
    finally:
        watcher.cancel()
        reply.handle.cancel()  # a no-op once finished; stops generating if this task was cancelled
    if result is None:  # the client went away; nobody reads this answer
        server.record(endpoint, 499, started)  # nginx's "client closed request"
        return Response(status_code=499)
    server.record(endpoint, 200, started)
    return JSONResponse(result)


def _sse(reply: _Reply, include_usage: bool, server: _Server, endpoint: str, started: float) -> StreamingResponse:
    """Server-sent events: `data: <json>` per chunk, then `data: [DONE]`. A client that goes away
    cancels the response task (Starlette), and the finally block cancels the generation."""

    async def body() -> AsyncIterator[str]:
        finished = False
        try:
            async for chunk in reply.stream(include_usage):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if finished:
                server.record(endpoint, 200, started)
            else:
                reply.handle.cancel()
                server.record(endpoint, 499, started)

    return StreamingResponse(body(), media_type="text/event-stream")


