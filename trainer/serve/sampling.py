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
    if not bool(torch.isfinite(logits).any()):
        raise SamplingError("the model produced no finite logits for this sequence")
    if params.greedy:
        return int(logits.argmax())
    logits = logits.float().cpu() / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


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
