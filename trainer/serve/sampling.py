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
        return self.temperature == 0.0


def make_generator(params: SamplingParams, choice: int) -> Optional[torch.Generator]:
    """A seeded generator per choice (seed + choice index), so n > 1 choices differ but are reproducible."""
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed + choice)
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """Next token from float32 logits [vocab]: argmax when greedy, else temperature / top-k / top-p sampling."""
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
        hits = [self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop]
        found = [h for h in hits if h >= 0]
        return min(found) if found else None

    def _safe_end(self) -> int:
        complete = len(self.text.rstrip("\ufffd"))
        end = complete
        for stop in self.stop:
            for k in range(min(len(stop) - 1, complete), 0, -1):
                if self.text[:complete].endswith(stop[:k]):
                    end = min(end, complete - k)
                    break
        return end

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
