"""apply_lora / load_adapter / merge_adapter behaviour: merge parity, frozen base, optimizer contents,
and clear errors for bad input."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_fixtures import ALL_TARGETS, LoRA, fresh_copy, input_ids, logits, randomize_adapters, tiny_hf_model

from kubetune.errors import KubetuneError
from kubetune.trainer.peft import (
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_adapter,
    read_adapter,
    save_adapter,
    trainable_parameters,
)

TOL = 1e-5


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_model_matches_unmerged(use_dora):
    model = apply_lora(tiny_hf_model(), LoRA(target_modules=ALL_TARGETS + ["lm_head"], use_dora=use_dora))
    randomize_adapters(model)
    ids = input_ids()
    before = logits(model, ids)
    merged = merge_adapter(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(type(m.weight) is nn.Parameter for m in merged.modules() if isinstance(m, nn.Linear))
    assert (logits(merged, ids) - before).abs().max().item() <= TOL
    # and the merged state dict has the plain HF names again
    assert not any("lora" in key for key in merged.state_dict())


def test_merge_equals_peft_merge_and_unload(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_hf_model()
    ours = apply_lora(fresh_copy(base), LoRA(use_dora=True))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "a").merge_and_unload()
    ours = merge_adapter(ours)
    for (name, ours_p), (_, theirs_p) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.allclose(ours_p, theirs_p, atol=1e-6), name


def test_merging_tied_lm_head_leaves_embeddings_alone():
    model = apply_lora(tiny_hf_model(tie_word_embeddings=True), LoRA(target_modules=["lm_head"]))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied while training
    randomize_adapters(model)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    ids = input_ids()
    before = logits(model, ids)
    merge_adapter(model)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert model.config.tie_word_embeddings is False
    assert (logits(model, ids) - before).abs().max().item() <= TOL


def test_only_adapters_train_and_base_stays_bit_identical():
    model = apply_lora(tiny_hf_model(), LoRA(target_modules=["q_proj", "v_proj", "lm_head"], use_dora=True))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    params = trainable_parameters(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert len(params) == 2 * 2 * 3 + 3  # (q, v) x 2 layers x (A, B, m) + lm_head (A, B, m)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)
    ids = input_ids()
    losses = []
    for _ in range(5):
        out = model(ids, labels=ids)
        losses.append(out.loss.item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), name


def test_unknown_target_module_names_the_field():
    with pytest.raises(KubetuneError, match=r"lora\.target_modules: w_pack match no linear layer.*q_proj"):
        apply_lora(tiny_hf_model(), LoRA(target_modules=["q_proj", "w_pack"]))


def test_rank_must_be_positive():
    with pytest.raises(KubetuneError, match=r"lora\.rank"):
        apply_lora(tiny_hf_model(), LoRA(rank=0))


def test_adapter_for_another_base_is_refused(tmp_path):
    save_adapter(apply_lora(tiny_hf_model(), LoRA(target_modules=["q_proj"])), tmp_path / "a", "small")
    with pytest.raises(KubetuneError, match=r"q_proj expects a base of shape.*different base model"):
        load_adapter(tiny_hf_model(hidden_size=48, num_attention_heads=4), tmp_path / "a")
    with pytest.raises(KubetuneError, match=r"model\.layers\.1\.self_attn\.q_proj does not exist"):
        load_adapter(tiny_hf_model(num_hidden_layers=1), tmp_path / "a")


def test_adapter_target_that_the_model_lacks_is_refused(tmp_path):
    save_adapter(apply_lora(tiny_hf_model(), LoRA(target_modules=["q_proj"])), tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["q_proj", "c_attn"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(KubetuneError, match=r"adapter_config\.json: target_modules \['c_attn'\]"):
        load_adapter(tiny_hf_model(), tmp_path / "a")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"r": 0}, r"r must be a number > 0"),
        ({"r": 3}, r"rank 4 differs from r=3"),
        ({"peft_type": "IA3"}, r"peft_type='IA3': only LORA"),
        ({"target_modules": ".*proj"}, r"target_modules is a regex"),
    ],
)
def test_bad_adapter_config_names_the_field(tmp_path, change, message):
    save_adapter(apply_lora(tiny_hf_model(), LoRA(target_modules=["q_proj"])), tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(KubetuneError, match=message):
        read_adapter(tmp_path / "a")


def test_missing_adapter_folder_says_what_it_needs(tmp_path):
    with pytest.raises(KubetuneError, match=r"adapter_config\.json"):
        load_adapter(tiny_hf_model(), tmp_path / "nope")


def test_read_adapter_gives_tensors_and_scaling_for_serving(tmp_path):
    """A server holding several adapters adds scaling * B @ A x per module: check it against the layer."""
    model = apply_lora(tiny_hf_model(), LoRA(target_modules=["v_proj"], rank=2, alpha=6))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    assert adapter.scaling == 3.0 and set(adapter.modules) == {f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)}
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    x = torch.randn(3, layer.in_features)
    weights = adapter.modules["model.layers.0.self_attn.v_proj"]
    manual = x @ layer.weight.T + adapter.scaling * (x @ weights.lora_A.T) @ weights.lora_B.T
    assert torch.allclose(layer(x), manual, atol=1e-6)
    assert torch.allclose(layer.weight + weights.delta_weight(adapter.scaling), layer.merged_weight(), atol=1e-6)
