"""The fused lm_head + cross-entropy equals cross_entropy(lm_head(hidden)) in value and gradients.

Reference: `causal_lm_loss_sum` on full logits (F.cross_entropy), the path transformers takes.
Tolerances: float32 1e-5 relative on the loss, 1e-5 absolute on gradients; bf16 autocast 2e-2.
"""
import pytest
import torch
from torch import nn

from kubetune.trainer.data.formats import IGNORE_INDEX
from kubetune.trainer.training import loss as loss_module
from kubetune.trainer.training.loss import causal_lm_loss_sum, causal_lm_loss_sum_from_hidden


def _case(tied_to_embedding: bool = False):
    torch.manual_seed(0)
    head = nn.Linear(32, 300, bias=False)
    if tied_to_embedding:
        embedding = nn.Embedding(300, 32)
        head.weight = embedding.weight
    hidden = torch.randn(3, 11, 32, requires_grad=True)
    labels = torch.randint(0, 300, (3, 11))
    labels[0, :5] = IGNORE_INDEX  # a masked prompt
    labels[2, 8:] = IGNORE_INDEX  # padding
    return head, hidden, labels


def _reference(head, hidden, labels):
    loss = causal_lm_loss_sum(head(hidden), labels)
    hidden_grad, weight_grad = torch.autograd.grad(loss * 0.37, (hidden, head.weight))
    return loss.detach(), hidden_grad, weight_grad


@pytest.mark.parametrize("chunk_elements", [2**24, 300 * 4, 300])  # one chunk, chunks of 4 rows, of 1 row
def test_fused_loss_and_gradients_equal_full_logits_cross_entropy(monkeypatch, chunk_elements):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_elements)
    head, hidden, labels = _case()
    ref_loss, ref_hidden_grad, ref_weight_grad = _reference(head, hidden, labels)

    loss = causal_lm_loss_sum_from_hidden(hidden, head, labels)
    hidden_grad, weight_grad = torch.autograd.grad(loss * 0.37, (hidden, head.weight))

    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0)
    assert (hidden_grad - ref_hidden_grad).abs().max() <= 1e-5
    assert (weight_grad - ref_weight_grad).abs().max() <= 1e-5
    # Unlabelled positions (masked prompt, padding, the last one) get exactly zero gradient.
    assert hidden_grad[0, :4].abs().max() == 0 and hidden_grad[:, -1].abs().max() == 0


def test_fused_loss_with_a_tied_lm_head_sums_both_gradients():
    head, hidden, labels = _case(tied_to_embedding=True)
    ref_loss, _, ref_weight_grad = _reference(head, hidden, labels)
    loss = causal_lm_loss_sum_from_hidden(hidden, head, labels)
    (weight_grad,) = torch.autograd.grad(loss * 0.37, (head.weight,))
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0)
    assert (weight_grad - ref_weight_grad).abs().max() <= 1e-5


def test_frozen_lm_head_gets_no_gradient_and_hidden_still_does():
    head, hidden, labels = _case()
    head.weight.requires_grad_(False)
    (ref_hidden_grad,) = torch.autograd.grad(causal_lm_loss_sum(head(hidden), labels), (hidden,))
    loss = causal_lm_loss_sum_from_hidden(hidden, head, labels)
    loss.backward()
    assert head.weight.grad is None
    assert (hidden.grad - ref_hidden_grad).abs().max() <= 1e-5


def test_wrapped_lm_head_takes_the_module_path_on_labelled_positions():
    head, hidden, labels = _case()
    wrapped = nn.Sequential(head)  # stands for a LoRA-wrapped lm_head: not a plain nn.Linear
    ref_loss, ref_hidden_grad, _ = _reference(head, hidden, labels)
    loss = causal_lm_loss_sum_from_hidden(hidden, wrapped, labels)
    (hidden_grad,) = torch.autograd.grad(loss * 0.37, (hidden,))
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0)
    assert (hidden_grad - ref_hidden_grad).abs().max() <= 1e-5


def test_no_labelled_position_gives_zero_loss_and_zero_gradients():
    head, hidden, labels = _case()
    labels[:] = IGNORE_INDEX
    loss = causal_lm_loss_sum_from_hidden(hidden, head, labels)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert hidden.grad.abs().max() == 0 and head.weight.grad.abs().max() == 0


def test_fused_loss_under_bf16_autocast_matches_the_autocast_reference():
    head, hidden, labels = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = causal_lm_loss_sum(head(hidden), labels)
        loss = causal_lm_loss_sum_from_hidden(hidden, head, labels)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, head.weight))
    grads = torch.autograd.grad(loss, (hidden, head.weight))
    assert grads[0].dtype == hidden.dtype and grads[1].dtype == head.weight.dtype
    assert torch.allclose(loss, ref_loss, rtol=2e-2)
    for ours, theirs in zip(grads, ref_grads):
        assert (ours - theirs).abs().max() <= 2e-2 * theirs.abs().max()


def test_a_second_backward_through_the_same_loss_is_refused_not_silently_wrong():
    head, hidden, labels = _case()
    loss = causal_lm_loss_sum_from_hidden(hidden, head, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
