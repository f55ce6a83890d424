"""Log-likelihood scoring on our models, batched, with each shared context run only once.

A multiple-choice question asks for log P(choice_k | context) for every k. The requests are
grouped by their context tokens; a batch runs each distinct context once through the model
into a KV cache, copies that cache once per continuation, and then runs only the
continuation tokens. With K choices that is one context pass instead of K (lm-eval's HFLM
runs context + choice K times).

Tokenization follows lm-eval's causal-LM rules (`TemplateLM._encode_pair`) so our numbers and
the lm-eval adapter's agree: trailing whitespace of the context moves to the continuation, and
the continuation's tokens are those of tokenize(context + continuation) after tokenize(context).
Contexts longer than the model's window are cut from the left, as lm-eval does.
"""
from __future__ import annotations

import copy
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from kubetune.errors import KubetuneError
from kubetune.trainer.models import KVCache

Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = True, move_trailing_space: bool = True) -> Request:
    """(context tokens, continuation tokens) as lm-eval's TemplateLM splits them for causal LMs.

    `move_trailing_space=False` keeps the context's trailing whitespace in the context: a chat
    template's assistant header ends in its own newline, which is not part of the answer."""
    spaces = len(context) - len(context.rstrip()) if move_trailing_space else 0
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context, add_bos=add_bos)
    whole = tokenizer.encode(context + continuation, add_bos=add_bos)
    continuation_ids = whole[len(context_ids):]
    if not context_ids:  # no BOS and an empty context: condition on a prefix token, as lm-eval does
        context_ids = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    if not continuation_ids:
        raise KubetuneError(f"the continuation {continuation!r} encodes to no tokens; every choice/answer must be non-empty")
    return context_ids, continuation_ids


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_len: int) -> list[Request]:
    """Disjoint windows that together predict every token once (lm-eval's loglikelihood_rolling).

    The first window predicts up to `max_len` tokens after `prefix_id`; each later one predicts
    the next chunk with as much preceding text as fits in the window as context.
    """
    windows: list[Request] = []
    first = min(max_len, len(tokens))
    if first:
        windows.append(([prefix_id], list(tokens[:first])))
    done = first
    while done < len(tokens):
        end = min(done + max_len, len(tokens))
        start = max(0, end - max_len - 1)  # input window [start, end - 1); predicts [done, end)
        windows.append((list(tokens[start:done]), list(tokens[done:end])))
        done = end
    return windows


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The activation dtype (the embedding's: linear weights may be NF4 tensor subclasses)."""
    return model.model.embed_tokens.weight.dtype


def _batches(groups: list[tuple[tuple[int, ...], list[int]]], batch_size: int):
    """Consecutive groups with up to `batch_size` continuations in all."""
    batch: list = []
    size = 0
    for group in groups:
        if batch and size + len(group[1]) > batch_size:
            yield batch
            batch, size = [], 0
        batch.append(group)
        size += len(group[1])
    if batch:
        yield batch


@torch.inference_mode()
def score_requests(
    model: torch.nn.Module, requests: Sequence[Request], batch_size: int = 8, max_len: int = 2048, pad_id: int = 0
) -> list[tuple[float, bool]]:
    """For each (context, continuation): (sum of log P(continuation tokens | prefix), greedy?).

    `greedy` is True when every continuation token is the model's argmax, as lm-eval reports it.
    `batch_size` counts continuations per batch (the lm-eval meaning).
    """
    by_context: dict[tuple[int, ...], list[int]] = {}
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise KubetuneError("a scoring request needs at least one context and one continuation token")
        if len(continuation) > max_len:
            raise KubetuneError(
                f"a continuation of {len(continuation)} tokens does not fit max_seq_len={max_len}; raise max_seq_len"
            )
        by_context.setdefault(tuple(context), []).append(index)
    # A context with more continuations than fit a batch is run once per chunk of them.
    groups = [(context, list(chunk)) for context, members in by_context.items() for chunk in chunks(members, batch_size)]
    # Longest first: similar lengths share a batch (less padding) and memory peaks up front.
    groups.sort(key=lambda g: -(len(g[0]) + max(len(requests[i][1]) for i in g[1])))
    results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
    for batch in _batches(groups, batch_size):
        contexts = [list(context) for context, _ in batch]
        continuations = [[list(requests[i][1]) for i in members] for _, members in batch]
        scored = _score_batch(model, contexts, continuations, max_len, pad_id)
        for (_, members), group_scores in zip(batch, scored):
            for index, score in zip(members, group_scores):
                results[index] = score
    return results  # type: ignore[return-value]


def _score_batch(
    model: torch.nn.Module, contexts: list[list[int]], continuations: list[list[list[int]]], max_len: int, pad_id: int
) -> list[list[tuple[float, bool]]]:
    device = model.model.embed_tokens.weight.device
    # The model sees context + continuation[:-1]; keep the context's last tokens so that fits.
    contexts = [ctx[-(max_len + 1 - max(len(c) for c in conts)):] for ctx, conts in zip(contexts, continuations)]
    context_len = max(len(c) for c in contexts)
    feed_len = max(len(c) for conts in continuations for c in conts) - 1  # continuation tokens to run

    # 1. Each distinct context once, left-padded, into a KV cache.
    context_ids = torch.tensor([[pad_id] * (context_len - len(c)) + c for c in contexts], device=device)
    context_mask = torch.tensor([[0] * (context_len - len(c)) + [1] * len(c) for c in contexts], device=device)
    cache = KVCache(model.args, len(contexts), context_len + feed_len, device=device, dtype=model_dtype(model))
    last_logits = model(context_ids, attention_mask=context_mask, kv_cache=cache)[:, -1]

    # 2. One row per continuation, continuing its context's cache; right-padded.
    counts = torch.tensor([len(conts) for conts in continuations])
    rows = torch.repeat_interleave(torch.arange(len(contexts)), counts).to(device)
    flat = [c for conts in continuations for c in conts]
    logits = last_logits.index_select(0, rows)[:, None]  # predicts each continuation's first token
    if feed_len > 0:
        feed = torch.tensor([c[:-1] + [pad_id] * (feed_len + 1 - len(c)) for c in flat], device=device)
        feed_mask = torch.tensor([[1] * (len(c) - 1) + [0] * (feed_len + 1 - len(c)) for c in flat], device=device)
        more = model(feed, attention_mask=feed_mask, kv_cache=_repeat_rows(cache, rows))
        logits = torch.cat([logits, more], dim=1)

    # 3. Gather the continuation tokens' log-probabilities.
    targets = torch.tensor([c + [0] * (feed_len + 1 - len(c)) for c in flat], device=device)
    valid = torch.tensor([[True] * len(c) + [False] * (feed_len + 1 - len(c)) for c in flat], device=device)
    logprobs = F.log_softmax(logits.float(), dim=-1)
    token_logprobs = logprobs.gather(-1, targets[..., None]).squeeze(-1)
    totals = (token_logprobs * valid).sum(-1).tolist()
    greedy = ((logprobs.argmax(-1) == targets) | ~valid).all(-1).tolist()

    out: list[list[tuple[float, bool]]] = []
    start = 0
    for conts in continuations:
        out.append([(totals[i], greedy[i]) for i in range(start, start + len(conts))])
        start += len(conts)
    return out


def _repeat_rows(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """A cache whose row i is a copy of row rows[i]: each choice continues its question's context."""
    repeated = copy.copy(cache)
    repeated.keys = [k.index_select(0, rows) for k in cache.keys]
    repeated.values = [v.index_select(0, rows) for v in cache.values]
    repeated.valid = cache.valid.index_select(0, rows)
    repeated.seen = cache.seen.index_select(0, rows)
    return repeated


def score_rolling(
    model: torch.nn.Module,
    documents: Sequence[Sequence[int]],
    prefix_id: int,
    batch_size: int = 8,
    max_len: int = 2048,
    pad_id: int = 0,
) -> list[tuple[float, int]]:
    """For each token list: (log-likelihood of every token, number of tokens scored)."""
    requests: list[Request] = []
    owner: list[int] = []
    for doc_index, tokens in enumerate(documents):
        for window in rolling_windows(tokens, prefix_id, max_len):
            requests.append(window)
            owner.append(doc_index)
    scores = score_requests(model, requests, batch_size=batch_size, max_len=max_len, pad_id=pad_id)
    totals = [0.0] * len(documents)
    for doc_index, (logprob, _) in zip(owner, scores):
        totals[doc_index] += logprob
    return [(totals[i], len(tokens)) for i, tokens in enumerate(documents)]


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
