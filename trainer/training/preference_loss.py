"""Preference losses (DPO, IPO, SimPO) on per-sequence log-probabilities, and those log-probabilities.

A pair is a prompt with a chosen and a rejected response. The policy's (and, except for SimPO,
the reference's) log-probability of each response given the prompt is the sum over the response
tokens of log p(token | everything before it); prompt tokens never count.

With Δ = (log πθ(y_w) - log πref(y_w)) - (log πθ(y_l) - log πref(y_l)) and |y| a response's tokens:

    dpo    -(1 - ε) log σ(β Δ) - ε log σ(-β Δ)               Rafailov et al. 2023, eq. 7; ε > 0 is
                                                              conservative DPO (Mitchell 2023), what
                                                              TRL's CPOTrainer "sigmoid" (and its
                                                              DPOTrainer before 0.29) computes
    ipo    (Δ_w / |y_w| - Δ_l / |y_l| - 1 / (2β))²           Azar et al. 2023, eq. 17, with each
                                                              log-ratio averaged over its tokens as
                                                              TRL's DPOTrainer does (the IPO authors'
                                                              form, per TRL's note)
    simpo  -(1 - ε) log σ(z) - ε log σ(-z),                   Meng et al. 2024, eq. 6 (ε: TRL's
           z = β log πθ(y_w) / |y_w| - β log πθ(y_l) / |y_l| - γ    CPOTrainer "simpo"); no reference

Rewards (what the metrics report): β · log-ratio for dpo and ipo (TRL's rewards/chosen and
rewards/rejected), β · mean token log-prob for simpo. Margin = chosen - rejected; accuracy =
the share of pairs whose chosen reward is the larger.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kubetune.trainer.data.formats import IGNORE_INDEX

LOSS_TYPES = ("dpo", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)  # losses that never look at a reference model


@dataclass
class PreferenceLoss:
    """Per pair: the loss and the rewards of the chosen and the rejected response."""

    losses: torch.Tensor  # [pairs]
    chosen_rewards: torch.Tensor  # [pairs], detached
    rejected_rewards: torch.Tensor  # [pairs], detached


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> PreferenceLoss:
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_tokens: torch.Tensor,
             rejected_tokens: torch.Tensor, beta: float) -> PreferenceLoss:
    delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    losses = (delta - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float, label_smoothing: float = 0.0) -> PreferenceLoss:
    chosen_rewards = beta * chosen_logps / chosen_tokens.clamp(min=1)
    rejected_rewards = beta * rejected_logps / rejected_tokens.clamp(min=1)
    logits = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLoss(losses, chosen_rewards.detach(), rejected_rewards.detach())


def preference_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: Optional[torch.Tensor],
    reference_rejected_logps: Optional[torch.Tensor],
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> PreferenceLoss:
    """The loss named by `loss_type` (dpo | ipo | simpo); see the module docstring for each formula."""
    if loss_type == "simpo":
        return simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens,
                          beta, gamma, label_smoothing)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss: unknown loss type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if reference_chosen_logps is None or reference_rejected_logps is None:
        raise ValueError(f"loss {loss_type} needs the reference model's log-probabilities")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    if loss_type == "dpo":
        return dpo_loss(chosen_logratios, rejected_logratios, beta, label_smoothing)
    return ipo_loss(chosen_logratios, rejected_logratios, chosen_tokens, rejected_tokens, beta)


def sequence_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each row's labelled positions, labelled tokens per row) from full
    logits [rows, T, vocab]; labels are aligned with the inputs (shifted here), -100 = not scored.
    The reference the fused version below is tested against."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    logits = logits[:, :-1]
    logps = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    token_logps = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * scored).sum(dim=1), scored.sum(dim=1)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps_from_logits(model(...), labels)`, with the lm_head run on the scored positions
    only: a response is a small part of a prompt + response row, and the vocabulary is the largest
    dimension, so this skips most of the lm_head and log-softmax work (and the model skips padding)."""
    labels = batch["labels"]
    hidden = model.hidden_states(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[scored]
    logits = model.lm_head(hidden[:, :-1][scored]).float()  # [scored tokens, vocab]
    token_logps = -F.cross_entropy(logits, targets[scored], reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_logps)
    return sums, scored.sum(dim=1)
