"""Preference losses: the published formulas by hand (math, no torch ops), TRL's implementations on the
same fixed log-probabilities (within 1e-6), and the sequence log-probabilities they start from."""
import math

import pytest
import torch
import torch.nn.functional as F

from kubetune.trainer.data.formats import IGNORE_INDEX
from kubetune.trainer.training.preference_loss import (
    dpo_loss,
    ipo_loss,
    preference_loss,
    sequence_logps,
    sequence_logps_from_logits,
    simpo_loss,
)

# Four pairs of fixed sequence log-probabilities (policy/reference, chosen/rejected) and response lengths.
POLICY_CHOSEN = [-12.5, -30.25, -7.0, -55.5]
POLICY_REJECTED = [-14.0, -28.75, -9.5, -41.0]
REFERENCE_CHOSEN = [-13.0, -29.0, -7.25, -50.0]
REFERENCE_REJECTED = [-13.5, -29.5, -8.0, -45.0]
CHOSEN_TOKENS = [5, 12, 3, 20]
REJECTED_TOKENS = [6, 10, 4, 15]


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_is_the_papers_formula(beta, label_smoothing):
    # Rafailov et al. 2023 eq. 7; conservative DPO (Mitchell 2023) mixes in the flipped label.
    out = dpo_loss(t(POLICY_CHOSEN) - t(REFERENCE_CHOSEN), t(POLICY_REJECTED) - t(REFERENCE_REJECTED), beta, label_smoothing)
    for i in range(4):
        margin = (POLICY_CHOSEN[i] - REFERENCE_CHOSEN[i]) - (POLICY_REJECTED[i] - REFERENCE_REJECTED[i])
        want = -(1 - label_smoothing) * log_sigmoid(beta * margin) - label_smoothing * log_sigmoid(-beta * margin)
        assert out.losses[i].item() == pytest.approx(want, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (POLICY_CHOSEN[i] - REFERENCE_CHOSEN[i]))
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (POLICY_REJECTED[i] - REFERENCE_REJECTED[i]))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_is_the_papers_formula_on_per_token_log_ratios(beta):
    # Azar et al. 2023 eq. 17: (h - 1/(2 tau))^2 with h the difference of (length-averaged) log-ratios.
    out = ipo_loss(t(POLICY_CHOSEN) - t(REFERENCE_CHOSEN), t(POLICY_REJECTED) - t(REFERENCE_REJECTED),
                   t(CHOSEN_TOKENS), t(REJECTED_TOKENS), beta)
    for i in range(4):
        h = ((POLICY_CHOSEN[i] - REFERENCE_CHOSEN[i]) / CHOSEN_TOKENS[i]
             - (POLICY_REJECTED[i] - REFERENCE_REJECTED[i]) / REJECTED_TOKENS[i])
        assert out.losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-12)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.4), (0.1, 0.0)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_is_the_papers_formula(beta, gamma, label_smoothing):
    # Meng et al. 2024 eq. 6: -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma); no reference.
    out = simpo_loss(t(POLICY_CHOSEN), t(POLICY_REJECTED), t(CHOSEN_TOKENS), t(REJECTED_TOKENS), beta, gamma, label_smoothing)
    for i in range(4):
        z = beta * POLICY_CHOSEN[i] / CHOSEN_TOKENS[i] - beta * POLICY_REJECTED[i] / REJECTED_TOKENS[i] - gamma
        want = -(1 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)
        assert out.losses[i].item() == pytest.approx(want, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * POLICY_CHOSEN[i] / CHOSEN_TOKENS[i])


def test_dpo_of_a_policy_equal_to_its_reference_is_ln2():
    same = t(POLICY_CHOSEN)
    out = preference_loss("dpo", same, t(POLICY_REJECTED), same, t(POLICY_REJECTED), t(CHOSEN_TOKENS), t(REJECTED_TOKENS), 0.1)
    torch.testing.assert_close(out.losses, torch.full((4,), math.log(2), dtype=torch.float64))


def test_unknown_loss_and_missing_reference_are_refused():
    args = (t(POLICY_CHOSEN), t(POLICY_REJECTED))
    with pytest.raises(ValueError, match="unknown loss type 'kto'"):
        preference_loss("kto", *args, *args, t(CHOSEN_TOKENS), t(REJECTED_TOKENS), 0.1)
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss("dpo", *args, None, None, t(CHOSEN_TOKENS), t(REJECTED_TOKENS), 0.1)


def test_sequence_logps_score_only_labelled_tokens_and_match_full_logits():
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 8)
            self.lm_head = torch.nn.Linear(8, 11, bias=False)

        def hidden_states(self, input_ids, attention_mask=None):
            return self.embed(input_ids)

        def forward(self, input_ids, attention_mask=None):
            return self.lm_head(self.hidden_states(input_ids))

    model = Tiny()
    input_ids = torch.randint(0, 11, (4, 7))
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    fused, tokens = sequence_logps(model, {"input_ids": input_ids, "labels": labels})
    full, full_tokens = sequence_logps_from_logits(model(input_ids), labels)
    torch.testing.assert_close(fused, full, rtol=1e-6, atol=1e-6)
    assert tokens.tolist() == full_tokens.tolist() == [4, 4, 2, 4]  # labels[:, 1:] scored positions
    # By hand for row 0: sum over t of log softmax(logits[t])[input_ids[t+1]] for t >= 2.
    logits = model(input_ids)[0].double()
    want = sum(torch.log_softmax(logits[i], -1)[input_ids[0, i + 1]].item() for i in range(2, 6))
    assert fused[0].item() == pytest.approx(want, abs=1e-5)
    # Gradients flow to the lm_head through the fused path as through full logits.
    fused.sum().backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    sequence_logps_from_logits(model(input_ids), labels)[0].sum().backward()
    torch.testing.assert_close(grad, model.lm_head.weight.grad, rtol=1e-5, atol=1e-6)
