"""Next-token sampling (against the softmax formula) and streamed text with stop sequences."""
import pytest
import torch

from kubetune.trainer.serve.sampling import SamplingParams, TextStream, make_generator, sample_token

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()
DRAWS = 2000
TOL = 0.04  # absolute tolerance on frequencies; 2000 draws give a standard error of at most 0.011


def frequencies(params: SamplingParams, logits=LOGITS) -> torch.Tensor:
    generator = make_generator(params, choice=0)
    counts = torch.zeros(len(logits))
    for _ in range(DRAWS):
        counts[sample_token(logits, params, generator)] += 1
    return counts / DRAWS


def test_greedy_is_argmax():
    assert sample_token(torch.tensor([0.1, 3.0, -1.0]), SamplingParams(max_tokens=1, temperature=0.0), None) == 1


def test_temperature_sampling_follows_softmax_of_scaled_logits():
    expected = (LOGITS / 0.5).softmax(-1)
    torch.testing.assert_close(frequencies(SamplingParams(max_tokens=1, temperature=0.5, seed=1)), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("top_p, kept", [(0.7, [0, 1]), (0.5, [0]), (0.9, [0, 1, 2])])
def test_top_p_keeps_the_smallest_prefix_reaching_p_and_renormalises(top_p, kept):
    expected = torch.zeros(4)
    expected[kept] = PROBS[kept] / PROBS[kept].sum()
    got = frequencies(SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p, seed=2))
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_top_k_keeps_the_k_most_likely():
    expected = torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8
    torch.testing.assert_close(frequencies(SamplingParams(max_tokens=1, top_k=2, seed=3)), expected, atol=TOL, rtol=0)


def test_a_seed_makes_sampling_reproducible_per_choice():
    params = SamplingParams(max_tokens=1, seed=11)
    draws = lambda choice: [sample_token(LOGITS, params, g) for g in [make_generator(params, choice)] for _ in range(50)]  # noqa: E731
    assert draws(0) == draws(0) and draws(0) != draws(1)


class PieceDecoder:
    """Decodes ids by joining fixed pieces; id 9 is half a UTF-8 character until id 10 completes it."""

    PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: " END", 7: "ing"}

    def decode(self, ids, skip_special_tokens=True):
        text = ""
        for i, token in enumerate(ids):
            if token == 9:
                text += "é" if i + 1 < len(ids) and ids[i + 1] == 10 else "\ufffd"
            elif token != 10:
                text += self.PIECES[token]
        return text


def stream(ids, stop=()):
    text_stream, deltas, stopped = TextStream(PieceDecoder(), stop), [], False
    for token in ids:
        delta, stopped = text_stream.push(token)
        deltas.append(delta)
        if stopped:
            break
    if not stopped:
        deltas.append(text_stream.flush())
    return deltas, stopped


def test_stop_string_split_across_tokens_is_held_back_and_cut():
    deltas, stopped = stream([1, 2, 3, 4, 5], stop=["o wo"])  # "Hello world!": the stop spans tokens 2 and 3
    assert stopped and "".join(deltas) == "Hell"
    assert deltas[1] == "l"  # "lo" ends with "o", which may start the stop string: "o" is held back


def test_a_held_back_prefix_is_released_when_the_stop_does_not_follow():
    deltas, stopped = stream([1, 2, 5], stop=["o wo"])
    assert not stopped and "".join(deltas) == "Hello!" and deltas[1] == "l"


def test_earliest_of_several_stop_strings_wins():
    deltas, stopped = stream([1, 2, 3, 4, 6], stop=[" END", "wor"])
    assert stopped and "".join(deltas) == "Hello "


def test_unfinished_characters_are_not_streamed_half():
    deltas, _ = stream([1, 9, 10, 2])
    assert "\ufffd" not in "".join(deltas) and "".join(deltas) == "Helélo"
