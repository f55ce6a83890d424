"""Per-sequence sampling settings, next-token choice and incremental text with stop sequences."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one
    ignore_eos: bool = False  # keep going past the tokenizer's stop tokens (benchmarks, tests)
    logprobs: Optional[int] = None  # None: off; k: each token's log-probability and the k most likely
    prompt_logprobs: bool = False  # also score the prompt's tokens (completions' echo)

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE the scaled logits overflow and the distribution is the argmax anyway.
        return self.temperature < MIN_TEMPERATURE


# Temperatures below this are greedy (vLLM's convention): dividing logits by a tiny temperature
# overflows to inf/NaN, and the distribution is the argmax anyway (docs/security.md).
MIN_TEMPERATURE = 1e-5
_SEED_SPACE = 2**63  # torch generators take signed 64-bit seeds


class SamplingError(RuntimeError):
    """A row's logits cannot be sampled (no finite value): fails that sequence only."""


def make_generator(params: SamplingParams, choice: int) -> Optional[torch.Generator]:
    """A seeded generator per choice (seed + choice index), so n > 1 choices differ but are reproducible."""
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:  # wraps within the seed space, so no seed the API accepts can overflow part-way through n
        generator.manual_seed((params.seed + choice) % _SEED_SPACE)
    return generator


def clean_logits(logits: torch.Tensor, vocab_limit: Optional[int] = None) -> torch.Tensor:
    """Logits [..., vocab] with NaN/inf and ids >= vocab_limit (ids the tokenizer cannot decode) at -inf.

    A model whose embedding is larger than its tokenizer, or a numerically broken row, must not
    produce a token nobody can decode nor make sampling raise for the whole batch."""
    logits = logits.float()
    bad = ~torch.isfinite(logits)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        bad[..., vocab_limit:] = True
    return logits.masked_fill(bad, float("-inf")) if bool(bad.any()) else logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """Next token from float32 logits [vocab]: argmax when greedy, else temperature / top-k / top-p sampling.

    Non-finite logits should be masked first (clean_logits); a row without any finite value raises
    SamplingError."""
    token = sample_batch(logits[None], [params], [generator])[0]
    if isinstance(token, Exception):
        raise token
    return token


def sample_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[Optional[torch.Generator]]
) -> list:
    """Next tokens for a batch of rows [B, vocab], each with its own settings and generator, in a
    few tensor ops for the whole batch: argmax for greedy rows; for the others temperature, top-k
    and top-p on one sort of the batch, then one uniform draw per row from its own generator
    (inverse CDF), so a seeded choice stays reproducible whatever it is batched with.

    Returns a token id per row, or a SamplingError for a row without any finite logit (that row's
    request fails; the others go on)."""
    finite = torch.isfinite(logits).any(-1).tolist()
    tokens: list = logits.argmax(-1).tolist()
    for row, ok in enumerate(finite):
        if not ok:
            tokens[row] = SamplingError("the model produced no finite logits for this sequence")
    sampled = [row for row, p in enumerate(params) if not p.greedy and finite[row]]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    temperature = torch.tensor([params[r].temperature for r in sampled], device=logits.device)[:, None]
    scaled = logits.index_select(0, rows).float() / temperature
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    vocab = scaled.shape[-1]
    top_k = torch.tensor([min(params[r].top_k or vocab, vocab) for r in sampled], device=logits.device)[:, None]
    drop = torch.arange(vocab, device=logits.device)[None] >= top_k
    top_p = torch.tensor([params[r].top_p for r in sampled], device=logits.device)[:, None]
    if bool((top_p < 1.0).any()):
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        drop = drop | (probs.cumsum(-1) - probs >= top_p)  # keep the smallest prefix reaching top_p
    cdf = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1).cumsum(-1).cpu()
    order = order.cpu()
    for i, row in enumerate(sampled):
        draw = torch.rand(1, generator=generators[row]) * cdf[i, -1]
        index = min(int(torch.searchsorted(cdf[i], draw, right=True)), vocab - 1)
        tokens[row] = int(order[i, index])
    return tokens


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the model (log-softmax of its raw logits) and, when
    asked, the most likely alternatives at that position [(token id, logprob)]."""

    token: int
    logprob: Optional[float]  # None for a prompt's first token (nothing predicts it)
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top: int, vocab_limit: Optional[int] = None
) -> list[TokenLogprob]:
    """logits [N, vocab] (float32, raw: before temperature and masking) -> the logprob of tokens[i]
    at row i (the model's log-softmax, as transformers computes it), and the `top` most likely
    tokens of each row among those the tokenizer can decode (ids < vocab_limit)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = [_finite(v) for v in logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()]
    if top > 0:
        candidates = logprobs
        if vocab_limit is not None and vocab_limit < logprobs.shape[-1]:
            candidates = logprobs[:, :vocab_limit]
        values, ids = torch.topk(candidates, min(top, candidates.shape[-1]), dim=-1)
        alternatives = [tuple((t, _finite(v)) for t, v in zip(i, vs)) for i, vs in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [()] * len(tokens)
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens, chosen, alternatives)]


def _finite(value: float) -> float:
    """JSON has no -inf/NaN: OpenAI's convention for an impossible token is -9999."""
    return value if value > -9999.0 else -9999.0  # NaN compares False: also -9999


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class TextStream:
    """Turns generated token ids into text deltas, ending the text before the first stop string.

    Decodes all ids each time (decoding piece by piece breaks multi-byte characters and
    sentencepiece spaces) and holds back an unfinished character (U+FFFD) or a tail that could
    still become a stop string, so streamed deltas never have to be taken back.
    """

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (new text, whether a stop string ended the text)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids)
        hit = self._first_stop()
        if hit is not None:
            self.text = self.text[:hit]
            return self._emit(len(self.text)), True
        return self._emit(self._safe_end()), False

    def flush(self) -> str:
        """The held-back rest, once no more tokens come."""
        return self._emit(len(self.text))

    def _first_stop(self) -> Optional[int]:
        # Only the tail can hold a new match: text before `emitted` was checked on earlier pushes.
        hits = [self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop]
        found = [h for h in hits if h >= 0]
        return min(found) if found else None

    def _safe_end(self) -> int:
        """Where the text may be released: before an unfinished character or a tail that is the start
        of a stop string. Looks only at the last len(stop) - 1 characters (the tail), and only at
        lengths whose last character fits, so the work per token is bounded by the stop lengths."""
        complete = len(self.text.rstrip("\ufffd"))
        end = complete
        if complete == 0:
            return 0
        last = self.text[complete - 1]
        for stop in self.stop:
            tail = self.text[max(0, complete - len(stop) + 1) : complete]
            # candidate prefix lengths k (longest first): stop[k - 1] must equal the text's last character
            for k in range(min(len(stop) - 1, len(tail)), 0, -1):
                if stop[k - 1] == last and tail.endswith(stop[:k]):
                    end = min(end, complete - k)
                    break
        return end

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
