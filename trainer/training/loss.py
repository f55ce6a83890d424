"""The causal language-modelling loss, normalised over a whole accumulation window."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kubetune.trainer.data.formats import IGNORE_INDEX


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss (labels are shifted by one: the first never does)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of predicting token t+1 from position t.

    Summing (not averaging) per micro-batch and dividing by the tokens of the whole
    accumulation window makes a step's gradient independent of how the window is split into
    micro-batches, and of padding."""
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
