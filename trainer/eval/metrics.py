"""Scoring math of the local tasks, defined as EleutherAI's lm-evaluation-harness defines it.

Torch-free, pure functions:
- multiple choice: `acc` picks the choice with the highest log-likelihood; `acc_norm` divides each
  log-likelihood by the choice's length in characters first (lm-eval's `completion_len`);
- stderr of a mean: sample standard deviation (n - 1) / sqrt(n) (lm-eval's `mean_stderr`);
- perplexity: exp(total NLL / count) with count = scored tokens, words (lm-eval splits on
  whitespace) or UTF-8 bytes; `bits_per_byte` = NLL / bytes / ln 2. Corpus-level ratios have no
  closed-form stderr (lm-eval bootstraps them); we report none.
- generate: exact, regex-extracted or contains match against any reference answer.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Metric:
    value: float
    stderr: Optional[float]


def argmax(values: Sequence[float]) -> int:
    """First index of the maximum, like numpy.argmax (ties go to the earlier choice)."""
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def choice_predictions(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(prediction by log-likelihood, prediction by log-likelihood per character of the choice)."""
    per_char = [ll / float(len(choice)) for ll, choice in zip(loglikelihoods, choices)]
    return argmax(loglikelihoods), argmax(per_char)


def mean_with_stderr(values: Sequence[float]) -> Metric:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Metric(mean, None)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Metric(mean, math.sqrt(variance) / math.sqrt(n))


def count_words(text: str) -> int:
    """Words as lm-eval counts them for word_perplexity."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def perplexity_metrics(nll_sum: float, n_tokens: int, n_words: int, n_bytes: int) -> dict[str, Metric]:
    """Corpus-level perplexities from the summed negative log-likelihood (nats) of all samples."""
    return {
        "perplexity": Metric(math.exp(nll_sum / n_tokens), None),
        "word_perplexity": Metric(math.exp(nll_sum / n_words), None),
        "byte_perplexity": Metric(math.exp(nll_sum / n_bytes), None),
        "bits_per_byte": Metric(nll_sum / n_bytes / math.log(2), None),
    }


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """Generated text up to (not including) the first stop string."""
    end = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if found != -1:
                end = min(end, found)
    return text[:end]


def extract_answer(text: str, pattern: Optional[str]) -> Optional[str]:
    """The answer inside a generation: the first group of the first match (or the whole match)."""
    if pattern is None:
        return text
    found = re.search(pattern, text)
    if found is None:
        return None
    return found.group(1) if found.groups() else found.group(0)


def _normalize(text: str, ignore_case: bool, strip: bool) -> str:
    text = text.strip() if strip else text
    return text.lower() if ignore_case else text


def generation_correct(generated: str, answers: Sequence[str], options: dict) -> bool:
    """Score one generation (already cut at the stop strings) against the reference answers."""
    kind = options["match"]
    candidate = extract_answer(generated, options["regex"] if kind == "regex" else None)
    if candidate is None:
        return False
    candidate = _normalize(candidate, options["ignore_case"], options["strip"])
    references = [_normalize(a, options["ignore_case"], options["strip"]) for a in answers]
    if kind == "contains":
        return any(ref in candidate for ref in references)
    return candidate in references
