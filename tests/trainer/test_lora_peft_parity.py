"""Our LoRA / DoRA layers against PEFT on the same transformers Llama: same weights -> same logits
(within 1e-5 fp32), adapters written by one are read by the other, and gradients agree."""
from __future__ import annotations

import pytest
import torch

from lora_fixtures import ALL_TARGETS, LoRA, fresh_copy, input_ids, logits, randomize_adapters, tiny_hf_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from kubetune.trainer.peft import apply_lora, load_adapter, save_adapter  # noqa: E402

TOL = 1e-5  # float32, the bound

CASES = [
    pytest.param(False, ALL_TARGETS, id="lora-all"),
    pytest.param(True, ALL_TARGETS, id="dora-all"),
    pytest.param(False, ["q_proj", "v_proj", "lm_head"], id="lora-lm_head"),
    pytest.param(True, ["k_proj", "down_proj", "lm_head"], id="dora-lm_head"),
]


@pytest.mark.parametrize("use_dora,targets", CASES)
def test_our_adapter_loaded_by_peft_gives_same_logits(tmp_path, use_dora, targets):
    base = tiny_hf_model()
    ours = apply_lora(fresh_copy(base), LoRA(target_modules=targets, use_dora=use_dora))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")

    theirs = PeftModel.from_pretrained(fresh_copy(base), tmp_path / "adapter").eval()
    ids = input_ids()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() <= TOL
    # ...and the update is not a no-op, so the comparison says something about the adapters
    assert (logits(ours, ids) - logits(base, ids)).abs().max().item() > 1e-3


@pytest.mark.parametrize("use_dora,targets", CASES)
def test_peft_adapter_loaded_by_us_gives_same_logits(tmp_path, use_dora, targets):
    base = tiny_hf_model()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, init_lora_weights=False)
    theirs = get_peft_model(fresh_copy(base), config).eval()
    randomize_adapters(theirs)  # also moves DoRA's magnitude away from ||W||
    theirs.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)

    ours = load_adapter(fresh_copy(base), tmp_path / "adapter")
    ids = input_ids()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gradients_match_peft(tmp_path, use_dora):
    """Training sees the same function: the adapter gradients equal PEFT's (DoRA's detached norm included)."""
    base = tiny_hf_model()
    ours = apply_lora(fresh_copy(base), LoRA(target_modules=["q_proj", "up_proj"], use_dora=use_dora))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(fresh_copy(base), tmp_path / "adapter", is_trainable=True)

    ids = input_ids()
    for model in (ours, theirs):
        model.train()
        out = model(ids)
        (out.logits if hasattr(out, "logits") else out).float().logsumexp(-1).mean().backward()

    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    theirs_grads = {n.replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): g for n, g in theirs_grads.items()}
    assert set(ours_grads) == set(theirs_grads)
    for name, grad in ours_grads.items():
        assert torch.allclose(grad, theirs_grads[name], atol=1e-6, rtol=1e-4), name


def test_saved_adapter_has_peft_names_and_config(tmp_path):
    import json

    from safetensors import safe_open

    model = apply_lora(tiny_hf_model(), LoRA(target_modules=["q_proj", "v_proj"], use_dora=True, rank=2, alpha=4))
    save_adapter(model, tmp_path / "a", base_model_name_or_path="org/base")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_dora"]) == ("LORA", 2, 4, True)
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["base_model_name_or_path"] == "org/base"
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector" in keys
    assert len(keys) == 2 * 2 * 3  # 2 layers x 2 targets x (A, B, m): no base weights
    assert not list(tmp_path.glob("a.tmp-*"))  # the temp folder was renamed into place
