"""`kubetune serve MODEL_DIR [--adapter NAME=DIR ...]`: load, then serve with uvicorn until SIGTERM."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

import uvicorn
from uvicorn.protocols.http import h11_impl
from uvicorn.protocols.http.h11_impl import H11Protocol

from kubetune.errors import KubetuneError
from kubetune.trainer.serve.app import ServedModel, ServeLimits, begin_draining, create_app
from kubetune.trainer.serve.engine import Engine
from kubetune.trainer.serve.metrics import ServeMetrics

API_KEY_ENV = "KUBETUNE_SERVE_API_KEY"
API_KEY_FILE_ENV = "KUBETUNE_SERVE_API_KEY_FILE"

log = logging.getLogger("kubetune.serve")


def parse_adapter_args(values: list[str]) -> list[tuple[str, str]]:
    """["name=dir", ...] -> [(name, dir)], names unique."""
    pairs = []
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise KubetuneError(f"--adapter {value!r}: expected NAME=DIR, e.g. --adapter support=runs/lora/adapter")
        if name in (n for n, _ in pairs):
            raise KubetuneError(f"--adapter {value!r}: the name {name!r} is used twice; give each adapter its own name")
        pairs.append((name, folder))
    return pairs


def read_api_keys(keys: Sequence[str] = (), key_file: Optional[str] = None, environ=os.environ) -> tuple[str, ...]:
    """API keys from --api-key, $KUBETUNE_SERVE_API_KEY, and a file with one key per line (--api-key-file or
    $KUBETUNE_SERVE_API_KEY_FILE: a mounted Secret). No keys: the server needs no authentication."""
    found = [k.strip() for k in keys]
    if environ.get(API_KEY_ENV):
        found.append(environ[API_KEY_ENV].strip())
    key_file = key_file or environ.get(API_KEY_FILE_ENV)
    if key_file:
        try:
            found += [line.strip() for line in Path(key_file).read_text().splitlines()]
        except OSError as err:
            raise KubetuneError(f"--api-key-file {key_file}: cannot read it ({err.strerror})") from None
    found = [k for k in found if k]
    if any(len(k) < 8 for k in found):
        raise KubetuneError("--api-key: each key needs at least 8 characters (use a random token, e.g. `openssl rand -hex 16`)")
    return tuple(dict.fromkeys(found))


def resolve_max_model_len(requested: Optional[int], max_position_embeddings: int) -> int:
    if requested is None:
        return max_position_embeddings
    if not 2 <= requested <= max_position_embeddings:
        raise KubetuneError(
            f"--max-model-len {requested}: must be between 2 and the model's max_position_embeddings "
            f"({max_position_embeddings})"
        )
    return requested


def build_app(
    model_dir: str,
    adapters: list[tuple[str, str]] = (),
    *,
    max_concurrency: int = 16,
    max_queue: int = 64,
    max_model_len: Optional[int] = None,
    served_model_name: Optional[str] = None,
    device: str = "auto",
    dtype: str = "fp32",
    max_per_client: Optional[int] = None,
    limits: ServeLimits = ServeLimits(),
    prefix_cache_mb: float = 256,
    max_prefill_tokens: int = 4096,
):
    """Load the model, tokenizer and adapters and return the FastAPI app (its lifespan runs the engine)."""
    from kubetune.trainer.checkpoint.hf import load_pretrained, resolve_model_dir
    from kubetune.trainer.device import resolve_device, resolve_dtype
    from kubetune.trainer.serve.adapters import load_lora_adapter
    from kubetune.trainer.serve.runner import BatchedRunner
    from kubetune.trainer.tokenizers import check_vocab_matches, load_tokenizer

    if max_concurrency < 1 or max_queue < 0:
        raise KubetuneError("--max-concurrency must be >= 1 and --max-queue >= 0")
    if max_per_client is not None and max_per_client < 1:
        raise KubetuneError("--max-sequences-per-client must be >= 1")
    if prefix_cache_mb < 0 or max_prefill_tokens < 1:
        raise KubetuneError("--prefix-cache-mb must be >= 0 (0: off) and --max-prefill-tokens >= 1")
    if limits.max_request_bytes < 1024:
        raise KubetuneError("--max-request-bytes must be at least 1024")
    folder = resolve_model_dir(model_dir)
    model = load_pretrained(folder, device=resolve_device(device), dtype=resolve_dtype(dtype))
    tokenizer = load_tokenizer(str(folder))
    check_vocab_matches(tokenizer, model.args.vocab_size, model_dir)
    base_name = served_model_name or (model_dir.removeprefix("builtin://") if model_dir.startswith("builtin://") else Path(model_dir).name)
    loaded = [load_lora_adapter(name, path, model) for name, path in adapters]
    if base_name in {a.name for a in loaded}:
        raise KubetuneError(f"--adapter {base_name}=...: that name is the base model's; pick another adapter name")
    runner = BatchedRunner(
        model,
        model.args,
        max_slots=max_concurrency,
        max_model_len=resolve_max_model_len(max_model_len, model.args.max_position_embeddings),
        adapters=loaded,
        prefix_cache_bytes=int(prefix_cache_mb * 2**20),
    )
    metrics = ServeMetrics()
    engine = Engine(
        runner, tokenizer, max_concurrency=max_concurrency, max_queue=max_queue, max_per_client=max_per_client,
        max_prefill_tokens=max_prefill_tokens, metrics=metrics,
    )
    models = [ServedModel(base_name, 0, str(folder))]
    models += [ServedModel(a.name, i, a.path, parent=base_name) for i, a in enumerate(loaded, start=1)]
    return create_app(engine, tokenizer, models, metrics, limits)


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, which also closes a connection that has not sent a whole request
    head within `header_timeout` seconds of opening (or of its previous response). uvicorn has no
    such timeout: half-sent requests would hold connections (and limit_concurrency places) forever."""

    header_timeout = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _header_timeout_expired(self) -> None:
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


_OVERLOADED = json.dumps({"error": {
    "message": "the server has too many open connections; retry later", "type": "server_error", "param": None, "code": "server_overloaded",
}}).encode()


async def _overloaded(scope, receive, send) -> None:
    """uvicorn's answer past --max-connections, in OpenAI's error shape (uvicorn's own is a
    text/plain "Service Unavailable" that OpenAI clients cannot parse)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_OVERLOADED)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _OVERLOADED, "more_body": False})


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, *, request_timeout: float = 30.0, max_connections: int = 256, **kwargs) -> uvicorn.Config:
    """uvicorn settings with the server's connection limits (docs/security.md)."""
    # uvicorn's H11 protocol answers past limit_concurrency with the ASGI app it imported as
    # `service_unavailable`; this is its only hook, and the server always runs that protocol.
    h11_impl.service_unavailable = _overloaded
    protocol = type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": request_timeout})
    return uvicorn.Config(
        app, host=host, port=port, http=protocol, limit_concurrency=max_connections, timeout_keep_alive=5, **kwargs
    )


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(
        args.model_dir,
        parse_adapter_args(args.adapter),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        served_model_name=args.served_model_name,
        device=args.device,
        dtype=args.dtype,
        max_per_client=args.max_sequences_per_client,
        prefix_cache_mb=args.prefix_cache_mb,
        max_prefill_tokens=args.max_prefill_tokens,
        limits=ServeLimits(
            max_request_bytes=args.max_request_bytes,
            body_timeout=args.request_timeout,
            allow_ignore_eos=args.allow_ignore_eos,
            api_keys=read_api_keys(args.api_key, args.api_key_file),
        ),
    )
    if args.host not in ("127.0.0.1", "::1", "localhost") and not app.state.server.limits.api_keys:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                    "(pass --api-key or $%s, and restrict the network)", args.host, API_KEY_ENV)
    config = uvicorn_config(
        app, args.host, args.port, request_timeout=args.request_timeout, max_connections=args.max_connections,
        log_level="info", timeout_graceful_shutdown=None,
    )
    server = DrainingServer(config, on_exit=lambda: begin_draining(app))
    log.info("serving %s on http://%s:%d/v1", ", ".join(app.state.server.models), args.host, args.port)
    server.run()
    exit_without_teardown(0)
    return 0  # not reached


def exit_without_teardown(code: int) -> None:
    """Exit once uvicorn has drained and the engine stopped, skipping the interpreter's teardown.

    Tearing down the modules of torch and transformers (every object's refcount walked, every
    page touched) took 3 s of an idle server's 3.5 s stop on a busy 2-core box and far longer under
    memory pressure, eating the grace period (`kubetune apply`'s 30 s, the pod's 120 s) before
    SIGKILL. Nothing is left to do then: the requests finished, the engine thread and the worker
    pool were joined; only buffered log lines and output, flushed here, would be lost."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT first marks the app as draining (/readyz 503, new
    requests 503), then shuts down as uvicorn does: stop accepting connections, let in-flight
    requests finish, run the lifespan shutdown (the engine drains and stops)."""

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            # uvicorn re-raises the signals it caught once it is done; after a completed drain a
            # SIGTERM is the normal way to stop (Kubernetes), so exit 0 instead of dying by it.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]
