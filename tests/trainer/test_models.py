"""Native Llama-family models produce the same float32 logits as transformers on the same
checkpoint (tolerance: max abs diff <= 1e-5, logits and gradients), with padding, past the rope-scaling threshold and
the sliding window, packed with segment ids, and with activation checkpointing."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from kubetune.trainer.checkpoint import load_pretrained
from kubetune.trainer.models import ModelArgs, UnsupportedModelError

from hf_checkpoints import FAMILIES, ROPE_THRESHOLD, SLIDING_WINDOW

ATOL = 1e-5
SEQ = max(ROPE_THRESHOLD, SLIDING_WINDOW) + 8  # past the llama3 rope threshold and the Mistral window


def load_both(hf_checkpoint, family):
    folder = hf_checkpoint(family)
    return load_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def random_batch(vocab, batch=3, seq=SEQ, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def max_diff_on(mask, ours, reference):
    keep = mask.bool()
    return (ours[keep] - reference[keep]).abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_with_right_padding(hf_checkpoint, family):
    ours, reference = load_both(hf_checkpoint, family)
    ids = random_batch(ours.args.vocab_size)
    mask = torch.ones_like(ids)
    mask[1, SEQ - 5 :] = 0  # right padding
    mask[2, SEQ // 2 :] = 0
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = reference(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert max_diff_on(mask, got, want) <= ATOL


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_left_padding_with_explicit_positions_matches_transformers(hf_checkpoint, family):
    ours, reference = load_both(hf_checkpoint, family)
    ids = random_batch(ours.args.vocab_size, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=positions)
        want = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert max_diff_on(mask, got, want) <= ATOL


def test_left_padded_row_equals_the_unpadded_sequence(hf_checkpoint):
    """Default positions count real tokens, so padding on the left does not shift RoPE."""
    ours, _ = load_both(hf_checkpoint, "llama3")
    ids = random_batch(ours.args.vocab_size, batch=1)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        alone = ours(ids)
        with_padding = ours(padded, attention_mask=mask)[:, 5:]
    assert (alone - with_padding).abs().max().item() <= ATOL


def test_segment_ids_keep_packed_documents_apart(hf_checkpoint):
    ours, reference = load_both(hf_checkpoint, "qwen2")
    first, second = random_batch(ours.args.vocab_size, batch=1, seq=11, seed=1), random_batch(ours.args.vocab_size, batch=1, seq=17, seed=2)
    packed = torch.cat([first, second], dim=1)
    segments = torch.tensor([[0] * 11 + [1] * 17])
    with torch.no_grad():
        got = ours(packed, segment_ids=segments)
        want_first = reference(input_ids=first).logits
        want_second = reference(input_ids=second).logits
    assert (got[:, :11] - want_first).abs().max().item() <= ATOL
    assert (got[:, 11:] - want_second).abs().max().item() <= ATOL


def test_tied_embeddings_share_one_parameter(hf_checkpoint):
    ours, _ = load_both(hf_checkpoint, "llama32")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(ours.named_parameters())  # counted once, like transformers


def test_parameter_names_are_exactly_transformers_names(hf_checkpoint):
    for family in FAMILIES:
        ours, reference = load_both(hf_checkpoint, family)
        assert set(ours.state_dict()) == set(reference.state_dict()), family


def test_activation_checkpointing_gives_the_same_gradients(hf_checkpoint):
    ids = random_batch(128, batch=2, seq=24)
    grads = []
    for enabled in (False, True):
        model = load_pretrained(hf_checkpoint("llama")).train()
        model.enable_activation_checkpointing(enabled)
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_backward_matches_transformers_gradients(hf_checkpoint):
    ours, reference = load_both(hf_checkpoint, "llama3")
    ids = random_batch(128, batch=2, seq=SEQ)
    for model, logits in ((ours, ours(ids)), (reference, reference(input_ids=ids).logits)):
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    reference_params = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert (param.grad - reference_params[name].grad).abs().max().item() <= ATOL, name


def padded_mask(ids, side):
    """Rows of 3 real-token counts (full, most, half), padded on the right or the left."""
    mask = torch.ones_like(ids)
    seq = ids.shape[1]
    for row, pad in ((1, 5), (2, seq // 2)):
        if side == "right":
            mask[row, seq - pad :] = 0
        else:
            mask[row, :pad] = 0
    return mask


def masked_loss(logits, ids, mask):
    """Next-token loss where both the predicting position and the target are real tokens
    (the output at a padding position is undefined, in transformers as here)."""
    scored = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    targets = ids[:, 1:].masked_fill(~scored, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)


@pytest.mark.parametrize("side", ["right", "left"])
def test_backward_on_a_padded_batch_matches_transformers_gradients(hf_checkpoint, side):
    """Padded batches run on their real tokens only (TokenLayout); the gradients are transformers'."""
    ours, reference = load_both(hf_checkpoint, "qwen2")  # q/k/v biases: every projection's gradient checked
    ids = random_batch(128, batch=3, seq=SEQ)
    mask = padded_mask(ids, side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    masked_loss(ours(ids, attention_mask=mask, position_ids=positions), ids, mask).backward()
    masked_loss(reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits, ids, mask).backward()
    reference_params = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert (param.grad - reference_params[name].grad).abs().max().item() <= ATOL, name


def test_padding_positions_do_no_projection_or_mlp_work(hf_checkpoint):
    ours, _ = load_both(hf_checkpoint, "llama3")
    ids = random_batch(ours.args.vocab_size)
    seen_rows = []
    for layer in ours.model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.register_forward_hook(lambda module, inputs, output: seen_rows.append(inputs[0].shape[:-1].numel()))
    mask = padded_mask(ids, "right")
    with torch.no_grad():
        padded_logits = ours(ids, attention_mask=mask)
    assert set(seen_rows) == {int(mask.sum())}  # real tokens only, in every projection
    assert int(mask.sum()) < ids.numel()
    assert padded_logits.shape[:2] == ids.shape  # callers still get [B, T, vocab]
    seen_rows.clear()
    with torch.no_grad():
        ours(ids)
    assert set(seen_rows) == {ids.numel()}  # without padding nothing is gathered


def test_activation_checkpointing_on_a_padded_batch_gives_the_same_gradients(hf_checkpoint):
    ids = random_batch(128, batch=3, seq=24)
    mask = padded_mask(ids, "right")
    grads = []
    for enabled in (False, True):
        model = load_pretrained(hf_checkpoint("llama")).train()
        model.enable_activation_checkpointing(enabled)
        masked_loss(model(ids, attention_mask=mask), ids, mask).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


@pytest.mark.parametrize(
    "config, message",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture GPT2LMHeadModel"),
        ({"architectures": ["LlamaForCausalLM"], "vocab_size": 8}, "missing required key"),
        (
            {"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "vocab_size": 8,
             "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2},
            "rope scaling type 'yarn'",
        ),
    ],
)
def test_unsupported_configs_are_clear_errors(config, message):
    with pytest.raises(UnsupportedModelError, match=message) as info:
        ModelArgs.from_hf_config(config, source="some/config.json")
    assert "some/config.json" in str(info.value)
