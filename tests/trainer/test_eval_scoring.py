"""Batched, shared-context log-likelihood scoring equals a direct transformers computation."""
from __future__ import annotations

import pytest
import torch

from kubetune.trainer.eval.scoring import score_requests, score_rolling

transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-4  # float32, summed over a few tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def reference_loglikelihood(hf_model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) from one plain forward pass of transformers' model."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(ids).logits.float(), dim=-1)[0]
    predicting = logprobs[len(context) - 1 : -1]
    target = torch.tensor(continuation)
    total = predicting.gather(-1, target[:, None]).sum().item()
    return total, bool((predicting.argmax(-1) == target).all())


def random_requests(vocab: int, questions: int, choices: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(questions):
        context = torch.randint(0, vocab, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        for _ in range(choices):
            length = int(torch.randint(1, 6, (1,), generator=g))
            requests.append((context, torch.randint(0, vocab, (length,), generator=g).tolist()))
    return requests


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_loglikelihoods_equal_transformers(hf_checkpoint, family):
    from kubetune.trainer.checkpoint import load_pretrained

    folder = hf_checkpoint(family)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model = load_pretrained(folder).eval()
    requests = random_requests(hf_model.config.vocab_size, questions=4, choices=3)
    expected = [reference_loglikelihood(hf_model, *request) for request in requests]
    # batch_size 1 and 5 split questions across batches and mix padded lengths; 64 takes all at once.
    for batch_size in (1, 5, 64):
        scores = score_requests(model, requests, batch_size=batch_size, max_len=256)
        for (logprob, greedy), (expected_logprob, expected_greedy) in zip(scores, expected):
            assert logprob == pytest.approx(expected_logprob, abs=TOLERANCE)
            assert greedy == expected_greedy


def test_greedy_flag_is_true_for_the_models_own_argmax(hf_checkpoint):
    from kubetune.trainer.checkpoint import load_pretrained

    folder = hf_checkpoint("llama3")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    context = [5, 17, 42, 8]
    with torch.no_grad():
        generated = hf_model.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False)[0, 4:].tolist()
    (_, greedy), (_, other) = score_requests(load_pretrained(folder), [(context, generated), (context, [(generated[0] + 1) % 128])])
    assert greedy and not other


def test_long_contexts_are_cut_from_the_left_like_lm_eval(hf_checkpoint):
    from kubetune.trainer.checkpoint import load_pretrained

    folder = hf_checkpoint("llama")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    context, continuations = list(range(1, 41)), [[50, 51, 52], [60]]
    max_len = 16
    scores = score_requests(load_pretrained(folder), [(context, c) for c in continuations], max_len=max_len)
    longest = max(len(c) for c in continuations)
    kept = context[-(max_len + 1 - longest):]  # the model sees at most max_len tokens
    for continuation, (logprob, _) in zip(continuations, scores):
        assert logprob == pytest.approx(reference_loglikelihood(hf_model, kept, continuation)[0], abs=TOLERANCE)


def test_rolling_loglikelihood_of_short_and_windowed_documents(hf_checkpoint):
    from kubetune.trainer.checkpoint import load_pretrained

    folder = hf_checkpoint("llama")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model = load_pretrained(folder)
    prefix = 1
    short = list(range(10, 22))
    (total, count), = score_rolling(model, [short], prefix_id=prefix, max_len=64)
    assert count == len(short)
    assert total == pytest.approx(reference_loglikelihood(hf_model, [prefix], short)[0], abs=TOLERANCE)

    # A document longer than the window: each window predicts its chunk given the tokens before it.
    long = list(range(3, 3 + 20))
    (total, _), = score_rolling(model, [long], prefix_id=prefix, max_len=8)
    expected = reference_loglikelihood(hf_model, [prefix], long[:8])[0]
    expected += reference_loglikelihood(hf_model, long[7:8], long[8:16])[0]
    expected += reference_loglikelihood(hf_model, long[11:16], long[16:20])[0]
    assert total == pytest.approx(expected, abs=TOLERANCE)


def test_bad_requests_are_errors(hf_checkpoint):
    from kubetune.errors import KubetuneError
    from kubetune.trainer.checkpoint import load_pretrained

    model = load_pretrained(hf_checkpoint("llama"))
    with pytest.raises(KubetuneError, match="max_seq_len"):
        score_requests(model, [([1, 2], list(range(3, 40)))], max_len=16)
    with pytest.raises(KubetuneError, match="at least one"):
        score_requests(model, [([1, 2], [])])
