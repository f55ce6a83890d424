"""Our preference losses equal TRL's on the same fixed log-probabilities, within 1e-6.

TRL's own code runs on the numbers: `DPOTrainer._compute_loss` (loss types sigmoid and ipo) and the
experimental `CPOTrainer.cpo_loss` (sigmoid with label smoothing = conservative DPO, which
DPOTrainer's sigmoid no longer takes since TRL 0.29, and simpo). The trainer objects they are
methods of are stood in for by the few settings they read (beta, loss type, ...), and the policy
model by one that returns fixed per-token log-probabilities: building a real trainer adds nothing
to the loss arithmetic under test.
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from kubetune.trainer.data.formats import IGNORE_INDEX
from kubetune.trainer.training.preference_loss import preference_loss, sequence_logps_from_logits

trl = pytest.importorskip("trl")
from trl import DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402

PAIRS, LENGTH, VOCAB = 4, 12, 9
TOLERANCE = 1e-6


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather


def fixed_pairs(seed=0):
    """2*PAIRS rows (every chosen, then every rejected) of fixed logits, prompts of different lengths,
    right padding; and the reference's sequence log-probs."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * PAIRS, LENGTH, VOCAB, generator=generator, dtype=torch.float64) * 2
    input_ids = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH), generator=generator)
    completion_mask = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    attention_mask = torch.ones(2 * PAIRS, LENGTH, dtype=torch.long)
    for row in range(2 * PAIRS):
        prompt_end = 2 + row % 3
        end = LENGTH - (row * 5) % 4  # some rows padded on the right
        completion_mask[row, prompt_end:end] = 1
        attention_mask[row, end:] = 0
    reference = torch.randn(2 * PAIRS, generator=generator, dtype=torch.float64) * 3 - 20
    return logits, input_ids, completion_mask, attention_mask, reference


def ours(loss_type, beta, label_smoothing=0.0, gamma=0.5, seed=0):
    logits, input_ids, completion_mask, _, reference = fixed_pairs(seed)
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    logps, tokens = sequence_logps_from_logits(logits, labels)
    ref = reference.chunk(2) if loss_type != "simpo" else (None, None)
    out = preference_loss(loss_type, *logps.chunk(2), *ref, *tokens.chunk(2), beta=beta,
                          label_smoothing=label_smoothing, gamma=gamma)
    return out, logps, tokens


def trl_dpo_trainer_loss(loss_type, beta, seed=0):
    """TRL's DPOTrainer._compute_loss on the fixed pairs (reference log-probs given, as with precompute)."""
    logits, input_ids, completion_mask, attention_mask, reference = fixed_pairs(seed)
    shift_mask = completion_mask[:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1) * shift_mask

    def policy(**kwargs):  # what TRL's fused lm head returns: per-token log-probs and statistics
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                               mean_logits=logits[:, :-1].mean(-1), is_top1=torch.zeros_like(shift_mask, dtype=torch.bool))

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    ref_chosen, ref_rejected = reference.chunk(2)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def trl_cpo_loss(loss_type, beta, label_smoothing, gamma, chosen, rejected):
    trainer = SimpleNamespace(alpha=0.0, loss_type=loss_type, simpo_gamma=gamma, beta=beta,
                              label_smoothing=label_smoothing, accelerator=_Accelerator())
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_sigmoid_equals_trl_dpo_trainer(beta, seed):
    out, _, _ = ours("dpo", beta, seed=seed)
    loss, logged = trl_dpo_trainer_loss("sigmoid", beta, seed=seed)
    assert abs(out.losses.mean().item() - loss.item()) <= TOLERANCE
    # The reported rewards are TRL's too.
    assert abs(out.chosen_rewards.mean().item() - logged["rewards/chosen"][0]) <= TOLERANCE
    assert abs(out.rejected_rewards.mean().item() - logged["rewards/rejected"][0]) <= TOLERANCE
    margins = out.chosen_rewards - out.rejected_rewards
    assert abs(margins.mean().item() - logged["rewards/margins"][0]) <= TOLERANCE
    assert abs((margins > 0).double().mean().item() - logged["rewards/accuracies"][0]) <= TOLERANCE


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_ipo_equals_trl_dpo_trainer(beta, seed):
    out, _, _ = ours("ipo", beta, seed=seed)
    loss, _ = trl_dpo_trainer_loss("ipo", beta, seed=seed)
    assert abs(out.losses.mean().item() - loss.item()) <= TOLERANCE


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_with_label_smoothing_equals_trls_conservative_sigmoid(beta, label_smoothing):
    out, logps, _ = ours("dpo", beta, label_smoothing)
    reference = fixed_pairs()[-1]
    chosen_ratio, rejected_ratio = (logps - reference).chunk(2)
    # CPO's sigmoid on log-ratios is DPO's: logits = (pi_w - ref_w) - (pi_l - ref_l).
    losses, chosen_rewards, rejected_rewards = trl_cpo_loss("sigmoid", beta, label_smoothing, 0.0, chosen_ratio, rejected_ratio)
    assert (out.losses - losses).abs().max().item() <= TOLERANCE
    assert (out.chosen_rewards - chosen_rewards).abs().max().item() <= TOLERANCE
    assert (out.rejected_rewards - rejected_rewards).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.4), (0.1, 0.05)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_trainer_simpo(beta, gamma, label_smoothing):
    out, logps, tokens = ours("simpo", beta, label_smoothing, gamma)
    average = logps / tokens  # CPOTrainer averages the log-probs over the response for simpo
    losses, chosen_rewards, rejected_rewards = trl_cpo_loss("simpo", beta, label_smoothing, gamma, *average.chunk(2))
    assert (out.losses - losses).abs().max().item() <= TOLERANCE
    assert (out.chosen_rewards - chosen_rewards).abs().max().item() <= TOLERANCE
    assert (out.rejected_rewards - rejected_rewards).abs().max().item() <= TOLERANCE


def test_the_comparison_can_fail():
    """The fixed pairs are not degenerate: a different beta gives a different TRL loss."""
    out, _, _ = ours("dpo", 0.1)
    loss, _ = trl_dpo_trainer_loss("sigmoid", 0.2)
    assert abs(out.losses.mean().item() - loss.item()) > 1e-3
