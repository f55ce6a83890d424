"""The causal language-modelling loss, normalised over a whole accumulation window.

Training does not build the full [B, T, vocab] logits. `causal_lm_loss_sum_from_hidden` keeps only
the positions that have a label (prompt tokens and padding have none), and runs the lm_head and
the cross-entropy over them in chunks, computing the gradient of each chunk while its logits are
at hand (the approach of Liger Kernel's fused linear cross-entropy). The loss and gradients are
those of `cross_entropy(lm_head(hidden))`; what goes away is the lm_head work on unlabelled
positions and the memory traffic of full-size logits, log-softmax and their gradients — at a
32k-128k vocabulary, the largest tensors of a training step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kubetune.trainer.data.formats import IGNORE_INDEX

# Logits are computed for this many elements (tokens x vocab) at a time: 64 MiB of float32.
CHUNK_ELEMENTS = 2**24


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


def causal_lm_loss_sum_from_hidden(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """`causal_lm_loss_sum(lm_head(hidden), labels)`, computed only where there is a label.

    A plain bias-free nn.Linear lm_head takes the fused chunked path; anything else (a LoRA- or
    otherwise wrapped lm_head) runs the module on the labelled positions only."""
    targets = labels[:, 1:]
    has_label = targets != IGNORE_INDEX
    positions = hidden[:, :-1][has_label]  # [N, hidden]: only the positions that are scored
    targets = targets[has_label]
    if type(lm_head) is nn.Linear and lm_head.bias is None:
        return LinearCrossEntropySum.apply(positions, lm_head.weight, targets, _compute_dtype(hidden, lm_head.weight))
    return F.cross_entropy(lm_head(positions).float(), targets, reduction="sum")


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the lm_head matmul would run in: autocast's when it is on, else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_i cross_entropy(hidden[i] @ weight.T, targets[i]), with the gradient computed in forward.

    For each chunk of rows: logits (float32), log-sum-exp, loss; then softmax - one_hot is the
    gradient of the loss w.r.t. the logits, from which the gradients of hidden and weight follow
    by two matmuls. Backward only scales them by the incoming gradient (a scalar). The weight's
    gradient is summed in float32 across chunks, so bf16 training loses no precision there.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, compute_dtype: torch.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
            need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_hidden = torch.empty_like(hidden_c) if need_hidden_grad else None
            grad_weight: Optional[torch.Tensor] = None  # float32, summed over chunks
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            rows = hidden_c.shape[0]
            chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
            for start in range(0, rows, chunk):
                h, t = hidden_c[start:start + chunk], targets[start:start + chunk]
                logits = (h @ weight_c.T).float()
                target_logits = logits.gather(1, t[:, None]).squeeze(1)
                # Softmax in place, keeping its pieces for the log-sum-exp: one logits-size buffer in all.
                row_max = logits.amax(dim=-1, keepdim=True)
                exps = logits.sub_(row_max).exp_()
                row_sum = exps.sum(dim=-1, keepdim=True)
                loss += (row_max + row_sum.log()).sum() - target_logits.sum()
                if not (need_hidden_grad or need_weight_grad):
                    continue
                grad_logits = exps.div_(row_sum)  # softmax - one_hot is d loss / d logits
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
                grad_logits = grad_logits.to(compute_dtype)
                if need_hidden_grad:
                    torch.mm(grad_logits, weight_c, out=grad_hidden[start:start + chunk])
                if need_weight_grad:
                    partial = (grad_logits.T @ h).float()
                    grad_weight = partial if grad_weight is None else grad_weight.add_(partial)
            if need_weight_grad and grad_weight is None:  # no labelled position at all
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.input_dtypes = (hidden.dtype, weight.dtype)
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.backward_done:  # the buffers below were scaled in place: a second pass would be wrong
            raise RuntimeError("the fused lm_head loss supports one backward per forward (no retain_graph reuse)")
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_dtypes
        # Scale in place: these buffers are this call's own, and a weight-size pass is not free.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, None, None
