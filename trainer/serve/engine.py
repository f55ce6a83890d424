"""The scheduler: continuous batching on a worker thread.

Requests become sequences (one per choice, `n`). New sequences wait in a bounded queue (full: 429);
between decode steps, waiting sequences join the running set up to max_concurrency (prefilled
together, in chunks of at most `max_prefill_tokens` padded tokens; the choices of one prompt
share its prefill: the others copy its cache row). Each iteration is one forward for the running
sequences' next token and the first chunk of new prompts (BatchedRunner.run: the weights are read
once, not once for the step and again for the prefill), sampled for the whole batch at once. Finished or cancelled sequences leave at once, freeing their row for the next waiting
one. The model runs on a plain thread so the HTTP event loop stays responsive; the events of a
prefill or a decode step go back to the requests' asyncio queues together, in one
`call_soon_threadsafe` per event loop (one wake-up of the loop per step, not one per row: each
cost ~0.4 ms of the engine thread, 32 per step at concurrency 32).

Shared by every client, so (docs/security.md): a request is admitted all-or-nothing; waiting
sequences join round-robin across clients (an API key, or one anonymous client) and a client may
hold at most `max_per_client` sequences; a row whose logits or text fail fails only its own
request; and if the loop itself ever dies, every pending request is failed at once and the
engine stops accepting (readiness turns false).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Protocol, Sequence

import torch

from kubetune.trainer.serve.errors import QueueFullError, ServeError, ShuttingDownError, invalid_request
from kubetune.trainer.serve.metrics import ServeMetrics
from kubetune.trainer.serve.runner import Prefill
from kubetune.trainer.serve.sampling import (
    SamplingParams,
    TextStream,
    TokenLogprob,
    clean_logits,
    make_generator,
    sample_batch,
    token_logprobs,
)

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What the engine needs from the model side (see runner.BatchedRunner)."""

    seq_ids: list
    max_model_len: int

    def prefill(self, new: Sequence[Prefill]) -> list: ...

    def fork(self, seq_id, new_seq_id) -> None: ...

    def step(self, next_tokens: Sequence[int]) -> torch.Tensor: ...

    def remove(self, seq_id) -> None: ...


@dataclass
class Event:
    """What one choice produced in one step: new text, and why it ended (None while it goes on)."""

    choice: int
    text: str
    finish_reason: Optional[str] = None  # "stop" | "length" | "error"
    error: Optional[str] = None
    logprobs: Sequence[TokenLogprob] = ()  # with logprobs on: the tokens this event covers
    prompt: bool = False  # the logprobs are the prompt's (echo), not generated tokens


_CANCELLED = Event(-1, "", "cancelled")


class RequestHandle:
    """One API request's view of its sequences: an async stream of Events, and cancel()."""

    def __init__(
        self,
        engine: "Engine",
        loop: asyncio.AbstractEventLoop,
        n: int,
        prompt_tokens: int,
        client: str = "",
        request_id: str = "",
    ) -> None:
        self._engine = engine
        self.client = client
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0  # written by the engine thread, read after the last event
        self.cancelled = False
        self.done = False  # every choice finished

    def cancel(self) -> None:
        """Stop generating for this request (the client went away); call it from the event loop."""
        if not (self.cancelled or self.done):
            self.cancelled = True
            self._engine._cancel_waiting(self)
            self._queue.put_nowait(_CANCELLED)  # wake up a consumer waiting in events()

    def _put(self, event: Event) -> None:
        """From the engine thread: queued with the step's other events, delivered by Engine._flush."""
        self._engine._outbox.append((self, event))

    async def events(self) -> AsyncIterator[Event]:
        """Events of all choices as they come, until every choice finished."""
        remaining = self.n
        while remaining:
            event = await self._queue.get()
            if event is _CANCELLED:
                return
            if event.finish_reason is not None:
                remaining -= 1
                self.done = remaining == 0
            yield event


@dataclass(eq=False)
class _Sequence:
    id: int
    handle: RequestHandle
    choice: int
    prompt_index: int
    prompt_ids: list[int]
    adapter: int
    params: SamplingParams
    stream: TextStream
    generator: Optional[torch.Generator]
    generated: int = 0
    last_token: int = -1


class Engine:
    def __init__(
        self,
        runner: Runner,
        tokenizer,
        *,
        max_concurrency: int,
        max_queue: int,
        max_per_client: Optional[int] = None,
        max_prefill_tokens: int = 4096,
        metrics: Optional[ServeMetrics] = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id])
        # ids the tokenizer can decode; a larger embedding's extra ids are never sampled
        self.vocab_limit: Optional[int] = getattr(tokenizer, "vocab_size", None)
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_per_client = max_per_client  # running + waiting sequences per client; None: no limit
        self.max_prefill_tokens = max_prefill_tokens  # padded prompt tokens per prefill forward
        self.metrics = metrics
        self._cond = threading.Condition()
        # waiting sequences per client, admitted round-robin (the dict's order is the turn order)
        self._waiting: dict[str, deque[_Sequence]] = {}
        self._waiting_count = 0
        self._load: dict[str, int] = {}  # running + waiting sequences per client
        self._last_turn: dict[str, int] = {}  # when each client last had a sequence admitted
        self._turns = itertools.count()
        self._running: dict[int, _Sequence] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._dead: Optional[str] = None  # why the worker thread died
        self._thread: Optional[threading.Thread] = None
        self._outbox: list[tuple[RequestHandle, Event]] = []  # this step's events (engine thread only)

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    # ---- called from the event loop -------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kubetune-serve-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        adapter: int = 0,
        n: int = 1,
        client: str = "",
        request_id: str = "",
    ) -> RequestHandle:
        """Queue n sequences per prompt (choice index = prompt index * n + i) as one request of `client`.

        All or nothing: every sequence is built before any is queued. Raises QueueFullError (429) when
        they do not fit the free rows plus the waiting queue or the client's share, and
        ShuttingDownError (503) after shutdown began.
        """
        count = len(prompts) * n
        limit = self.max_concurrency + self.max_queue
        if self.max_per_client is not None:
            limit = min(limit, self.max_per_client)
        if count > limit:
            raise invalid_request(
                f"{count} sequences (prompts x n) can never fit this server's limit of {limit} sequences per "
                "request; send fewer prompts or a smaller n.",
                param="n",
            )
        handle = RequestHandle(
            self, asyncio.get_running_loop(), count, sum(len(p) for p in prompts), client, request_id
        )
        sequences = [  # built first: an error here leaves nothing behind
            _Sequence(
                id=next(self._ids),
                handle=handle,
                choice=choice,
                prompt_index=choice // n,
                prompt_ids=list(prompts[choice // n]),
                adapter=adapter,
                params=params,
                stream=TextStream(self.tokenizer, params.stop),
                generator=make_generator(params, choice),
            )
            for choice in range(count)
        ]
        with self._cond:
            if self._dead is not None:
                raise engine_dead()
            if self._stopping:
                raise ShuttingDownError()
            free_rows = max(self.max_concurrency - len(self._running), 0)
            if self._waiting_count + count > self.max_queue + free_rows:
                raise QueueFullError(self.max_queue)
            if self.max_per_client is not None and self._load.get(client, 0) + count > self.max_per_client:
                raise QueueFullError(self.max_queue, per_client=self.max_per_client)
            self._waiting.setdefault(client, deque()).extend(sequences)
            self._waiting_count += count
            self._load[client] = self._load.get(client, 0) + count
            self._cond.notify()
        self._update_gauges()
        return handle

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Take no new requests, finish the queued and running ones, then stop the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The worker thread runs (False before start and after it stopped or crashed)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return not self._stopping and self._dead is None and self.alive

    def _cancel_waiting(self, handle: RequestHandle) -> None:
        with self._cond:
            queue = self._waiting.get(handle.client)
            kept = deque(seq for seq in queue or () if seq.handle is not handle)
            dropped = len(queue or ()) - len(kept)
            if queue is not None:
                self._set_waiting(handle.client, kept)
            self._waiting_count -= dropped
            self._release(handle.client, dropped)
            self._cond.notify()
        if dropped and self.metrics:
            self.metrics.cancelled.inc(dropped)
        self._update_gauges()

    def _set_waiting(self, client: str, queue: deque) -> None:
        if queue:
            self._waiting[client] = queue
        else:
            self._waiting.pop(client, None)

    def _release(self, client: str, count: int) -> None:
        """A client's sequences left (finished, failed or cancelled); hold the lock."""
        left = self._load.get(client, 0) - count
        if left > 0:
            self._load[client] = left
        else:
            self._load.pop(client, None)

    def _next_waiting(self) -> _Sequence:
        """Round-robin across clients: the next sequence of the waiting client whose turn was longest ago
        (a newcomer first), so one client's many sequences do not hold everyone else back."""
        client = min(self._waiting, key=lambda c: self._last_turn.get(c, -1))
        self._last_turn[client] = next(self._turns)
        queue = self._waiting[client]
        seq = queue.popleft()
        self._set_waiting(client, queue)
        self._waiting_count -= 1
        return seq

    @property
    def dead(self) -> bool:
        """The worker thread died of an error (as opposed to stopping after a shutdown)."""
        return self._dead is not None

    # ---- the worker thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - nothing may leave requests hanging
            log.exception("the generation engine stopped")
            self._die(err)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._stopping):
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._running:
                    return
                admitted = []
                while self._waiting and len(self._running) < self.max_concurrency:
                    seq = self._next_waiting()
                    self._running[seq.id] = seq
                    admitted.append(seq)
            self._update_gauges()
            self._drop_cancelled()
            chunks = self._prefill_chunks(admitted) if admitted else []
            # One forward for the running rows' next token and the first chunk of new prompts.
            batch = [self._running[seq_id] for seq_id in self.runner.seq_ids]
            first = chunks.pop(0) if chunks else []
            if batch or first:
                self._step(batch, first)
            for chunk in chunks:
                self._step([], chunk)
            self._flush()

    def _flush(self) -> None:
        """Hand the queued events to their event loops: one call_soon_threadsafe per loop."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Event]]] = {}
        for handle, event in batch:
            per_loop.setdefault(handle._loop, []).append((handle, event))
        for loop, items in per_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                pass

    def _die(self, err: BaseException) -> None:
        """The loop cannot go on: fail every waiting and running request now (nobody would ever answer them)."""
        with self._cond:
            self._dead = f"{type(err).__name__}"
            pending = [seq for queue in self._waiting.values() for seq in queue] + list(self._running.values())
            self._waiting.clear()
            self._waiting_count = 0
            self._running.clear()
            self._load.clear()
        for seq in pending:
            seq.handle._put(Event(seq.choice, "", "error", error="generation failed"))
        self._flush()
        self._update_gauges()

    def _prefill_chunks(self, admitted: list[_Sequence]) -> list[list[list[_Sequence]]]:
        """Newly admitted sequences as prefill chunks: one prefill per (request, prompt), shared by its
        choices (the groups); shortest first, so each forward pads little; at most
        max_prefill_tokens padded tokens per chunk."""
        groups: dict[tuple[int, int], list[_Sequence]] = {}
        for seq in admitted:
            if seq.handle.cancelled:
                self._leave(seq)
                continue
            groups.setdefault((id(seq.handle), seq.prompt_index), []).append(seq)
        pending = sorted(groups.values(), key=lambda group: len(group[0].prompt_ids))
        chunks = []
        while pending:
            chunk = [pending.pop(0)]
            while pending and (len(chunk) + 1) * len(pending[0][0].prompt_ids) <= self.max_prefill_tokens:
                chunk.append(pending.pop(0))
            chunks.append(chunk)
        return chunks

    def _step(self, batch: list[_Sequence], groups: list[list[_Sequence]]) -> None:
        """One forward: the next token of the running rows `batch` (all of them, in row order) and the
        prefill of the prompts of `groups`. A failing forward fails the requests in it only: a
        combined one is run again as two, to tell which part failed."""
        leaders = [group[0] for group in groups]
        prefills = [Prefill(seq.id, seq.prompt_ids, seq.adapter, prompt_logits=seq.params.prompt_logprobs) for seq in leaders]
        try:
            logits, results = self.runner.run([seq.last_token for seq in batch] if batch else None, prefills)
        except Exception:  # noqa: BLE001 - these requests fail, the server goes on
            if batch and groups:
                self._step(batch, [])
                self._step([], groups)
                return
            log.exception("%s failed for requests %s", "decode step" if batch else "prefill",
                          sorted({s.handle.request_id for s in batch + leaders}))
            self._fail(batch + [seq for group in groups for seq in group])
            return
        if batch:
            self._sample_and_advance(batch, logits)
        if groups:
            self._finish_prefill(groups, results)

    def _finish_prefill(self, groups: list[list[_Sequence]], results) -> None:
        """The prompts are in the cache: the other choices copy their leader's row, then each samples its first token."""
        for group, result in zip(groups, results):
            leader = group[0]
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(leader.prompt_ids))
                if result.cached_tokens:
                    self.metrics.cached_prompt_tokens.inc(result.cached_tokens)
            prompt_lp = self._prompt_logprobs(leader, result) if leader.params.prompt_logprobs else None
            for seq in group[1:]:
                try:
                    self.runner.fork(leader.id, seq.id)
                except Exception:  # noqa: BLE001
                    log.exception("request %s: fork failed", seq.handle.request_id)
                    self._fail([seq])
            live = [seq for seq in group if seq.id in self._running]
            if prompt_lp is not None:
                for seq in live:
                    seq.handle._put(Event(seq.choice, "", None, logprobs=prompt_lp, prompt=True))
            if leader.params.max_tokens == 0:  # scoring the prompt only (echo)
                for seq in live:
                    seq.handle._put(Event(seq.choice, "", "length"))
                    self._leave(seq)
                continue
            logits = result.logits[None].expand(len(live), -1)
            self._sample_and_advance(live, logits)

    def _prompt_logprobs(self, seq: _Sequence, result) -> list[TokenLogprob]:
        first = TokenLogprob(seq.prompt_ids[0], None, ())
        if result.prompt_logits is None:
            return [first]
        rest = token_logprobs(result.prompt_logits, seq.prompt_ids[1:], seq.params.logprobs or 0, self.vocab_limit)
        return [first, *rest]

    def _sample_and_advance(self, batch: list[_Sequence], raw: torch.Tensor) -> None:
        """Sample the next token of every row of raw logits [B, vocab] at once, then record each; a row
        whose sampling or text fails fails its own request only."""
        try:
            tokens = sample_batch(clean_logits(raw, self.vocab_limit), [s.params for s in batch], [s.generator for s in batch])
        except Exception:  # noqa: BLE001
            log.exception("sampling failed for requests %s", sorted({s.handle.request_id for s in batch}))
            self._fail(batch)
            return
        wanted = [row for row, seq in enumerate(batch) if seq.params.logprobs is not None and not isinstance(tokens[row], Exception)]
        logprobs: dict[int, TokenLogprob] = {}
        if wanted:
            top = max(batch[row].params.logprobs for row in wanted)
            rows = torch.tensor(wanted, device=raw.device)
            found = token_logprobs(raw.index_select(0, rows), [tokens[row] for row in wanted], top, self.vocab_limit)
            for row, item in zip(wanted, found):
                keep = batch[row].params.logprobs
                logprobs[row] = TokenLogprob(item.token, item.logprob, item.top[:keep])
        for row, (seq, token) in enumerate(zip(batch, tokens)):
            if isinstance(token, Exception):
                log.error("request %s: %s", seq.handle.request_id, token)
                self._fail([seq])
                continue
            self._advance(seq, token, logprobs.get(row))

    def _advance(self, seq: _Sequence, token: int, logprob: Optional[TokenLogprob] = None) -> None:
        """Record one generated token; a failure here (e.g. the tokenizer cannot decode) fails this sequence only."""
        try:
            self._record_token(seq, token, logprob)
        except Exception:  # noqa: BLE001
            log.exception("request %s: a generated token could not be turned into text", seq.handle.request_id)
            self._fail([seq])

    def _record_token(self, seq: _Sequence, token: int, logprob: Optional[TokenLogprob]) -> None:
        """Emit one generated token's text, and finish the sequence when it is done."""
        seq.generated += 1
        seq.last_token = token
        seq.handle.completion_tokens += 1
        if self.metrics:
            self.metrics.generated_tokens.inc()
        finish = None
        if token in self.stop_ids and not seq.params.ignore_eos:
            text, finish = seq.stream.flush(), "stop"
        else:
            text, hit_stop = seq.stream.push(token)
            if hit_stop:
                finish = "stop"
            elif seq.generated >= seq.params.max_tokens or len(seq.prompt_ids) + seq.generated >= self.max_model_len:
                text, finish = text + seq.stream.flush(), "length"
        seq.handle._put(Event(seq.choice, text, finish, logprobs=(logprob,) if logprob is not None else ()))
        if finish is not None:
            self._leave(seq)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running.values() if s.handle.cancelled]:
            if self.metrics:
                self.metrics.cancelled.inc()
            self._leave(seq)

    def _fail(self, seqs: list[_Sequence]) -> None:
        """The detail went to the server log; the client learns only that generation failed."""
        for seq in seqs:
            if seq.id in self._running:
                seq.handle._put(Event(seq.choice, "", "error", error="generation failed"))
                self._leave(seq)

    def _leave(self, seq: _Sequence) -> None:
        if seq.id in self.runner.seq_ids:
            self.runner.remove(seq.id)
        with self._cond:
            if self._running.pop(seq.id, None) is not None:
                self._release(seq.handle.client, 1)
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self._running))
            self.metrics.waiting.set(self._waiting_count)


def _deliver(items: list[tuple[RequestHandle, Event]]) -> None:
    for handle, event in items:
        handle._queue.put_nowait(event)


def engine_dead() -> ServeError:
    return ServeError("The generation engine stopped; the server must be restarted.", status_code=503, type="server_error", code="engine_dead")
