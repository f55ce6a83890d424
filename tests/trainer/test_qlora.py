"""QLoRA: LoRA/DoRA on an NF4 base. The forward differs from the unquantized one only by the
weight quantization error, training lowers the loss, and the NF4 base does not change."""
from __future__ import annotations

import pytest
import torch

from lora_fixtures import ALL_TARGETS, LoRA, fresh_copy, input_ids, logits, randomize_adapters, tiny_hf_model

from kubetune.trainer.peft import apply_lora, load_adapter, merge_adapter, save_adapter
from kubetune.trainer.quant import dequantize, is_nf4, quantize_base

TOL = 1e-5


def dequantized_twin(base, quantized):
    """The unquantized model with every NF4 weight replaced by its dequantized value."""
    twin = fresh_copy(base)
    quantized_weights = {n: p for n, p in quantized.named_parameters() if is_nf4(p)}
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if name in quantized_weights:
                param.copy_(dequantize(quantized_weights[name], param.dtype))
    return twin


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_qlora_forward_differs_only_by_the_quantization_error(tmp_path, use_dora):
    base = tiny_hf_model()
    qlora = apply_lora(quantize_base(fresh_copy(base)), LoRA(target_modules=ALL_TARGETS, use_dora=use_dora))
    randomize_adapters(qlora)
    assert sum(is_nf4(p) for p in qlora.parameters()) == 2 * 7  # every decoder projection, not lm_head
    save_adapter(qlora, tmp_path / "a")

    # Same adapters on the dequantized weights: identical function, so the only difference from the
    # full-precision model is the weight quantization error...
    twin = load_adapter(dequantized_twin(base, qlora), tmp_path / "a")
    ids = input_ids()
    assert (logits(qlora, ids) - logits(twin, ids)).abs().max().item() <= TOL

    if use_dora:
        return  # DoRA rescales rows by m / ||W + sBA||: the twin equality above is the check
    # ...which, layer by layer, is bounded by ||x|| * ||W - Wq|| per output (Cauchy-Schwarz).
    full = load_adapter(fresh_copy(base), tmp_path / "a")
    layer_q = qlora.get_submodule("model.layers.0.mlp.up_proj")
    layer_f = full.get_submodule("model.layers.0.mlp.up_proj")
    x = torch.randn(5, layer_q.in_features)
    row_error = (layer_f.weight - dequantize(layer_q.weight)).norm(dim=1)
    with torch.no_grad():
        diff = (layer_q(x) - layer_f(x)).abs()
    assert (diff <= x.norm(dim=1, keepdim=True) * row_error + 1e-6).all()
    assert diff.max() > 0  # quantization did change the weights


def test_qlora_training_lowers_loss_and_keeps_the_nf4_base(tmp_path):
    model = tiny_hf_model().to(torch.bfloat16)
    quantize_base(model)
    apply_lora(model, LoRA(target_modules=ALL_TARGETS + ["lm_head"], rank=8, alpha=16))
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" in n)
    frozen = {n: p.quantized_data.clone() for n, p in model.named_parameters() if is_nf4(p)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # synthetic task: each next token is the previous one + 1 (mod vocab)
    ids = (torch.arange(16) + torch.randint(0, 96, (4, 1), generator=torch.Generator().manual_seed(0))) % 96
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses
    for name, param in model.named_parameters():
        if name in frozen:
            assert is_nf4(param) and torch.equal(param.quantized_data, frozen[name]), name


def test_merging_a_qlora_model_gives_dense_weights():
    base = tiny_hf_model()
    qlora = apply_lora(quantize_base(fresh_copy(base)), LoRA(target_modules=["q_proj", "gate_proj"]))
    randomize_adapters(qlora)
    ids = input_ids()
    before = logits(qlora, ids)
    merged = merge_adapter(qlora)
    merged_proj = merged.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert not is_nf4(merged_proj) and merged_proj.dtype == torch.float32
    assert (logits(merged, ids) - before).abs().max().item() <= TOL


def test_adapter_loads_onto_an_nf4_base(tmp_path):
    """Evaluating a QLoRA run: NF4 base + saved adapter reproduces the trained model."""
    base = tiny_hf_model()
    qlora = apply_lora(quantize_base(fresh_copy(base)), LoRA(target_modules=["v_proj", "up_proj"], use_dora=True))
    randomize_adapters(qlora)
    save_adapter(qlora, tmp_path / "a")
    reloaded = load_adapter(quantize_base(fresh_copy(base)), tmp_path / "a")
    assert is_nf4(reloaded.get_submodule("model.layers.0.mlp.up_proj").weight)
    ids = input_ids()
    assert (logits(reloaded, ids) - logits(qlora, ids)).abs().max().item() <= TOL
