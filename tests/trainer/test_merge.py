"""The native model with adapters against transformers + PEFT from the same checkpoint, and
`kubetune merge` end to end: the merged folder loads in transformers and gives the unmerged logits."""
from __future__ import annotations

import json

import pytest
import torch

from lora_fixtures import ALL_TARGETS, LoRA, input_ids, logits, randomize_adapters, tiny_hf_model

from kubetune.cli import main as kubetune_main
from kubetune.trainer.checkpoint import load_pretrained
from kubetune.trainer.peft import apply_lora, save_adapter

peft = pytest.importorskip("peft")
TOL = 1e-5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_hf_model(seed=5, tie_word_embeddings=False).save_pretrained(folder)
    return folder


def peft_model(base_dir, adapter_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_native_model_with_adapter_matches_transformers_with_peft(base_dir, tmp_path, use_dora):
    model = apply_lora(load_pretrained(base_dir), LoRA(target_modules=ALL_TARGETS + ["lm_head"], use_dora=use_dora))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    ids = input_ids()
    assert (logits(model, ids) - logits(peft_model(base_dir, tmp_path / "adapter"), ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_kubetune_merge_writes_a_model_transformers_loads(base_dir, tmp_path, use_dora):
    from transformers import AutoModelForCausalLM

    model = apply_lora(load_pretrained(base_dir), LoRA(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    ids = input_ids()
    unmerged = logits(model, ids)

    code = kubetune_main(["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    assert code == 0
    merged_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert (logits(merged_hf, ids) - unmerged).abs().max().item() <= TOL
    assert (logits(load_pretrained(tmp_path / "merged"), ids) - unmerged).abs().max().item() <= TOL
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert not list(tmp_path.glob("merged.tmp-*"))


def test_merge_keeps_the_base_dtype(base_dir, tmp_path):
    bf16_base = tmp_path / "bf16"
    from kubetune.trainer.checkpoint import save_pretrained

    save_pretrained(load_pretrained(base_dir, dtype=torch.bfloat16), bf16_base)
    save_adapter(apply_lora(load_pretrained(base_dir), LoRA(target_modules=["q_proj"])), tmp_path / "adapter")
    assert kubetune_main(["merge", "--base", str(bf16_base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 0
    merged = load_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reference = load_pretrained(bf16_base, dtype=torch.bfloat16)
    for name, tensor in reference.state_dict().items():  # B = 0 at init: merging changes nothing
        assert torch.equal(merged.state_dict()[name], tensor), name


def test_merge_with_adapter_of_another_base_fails_cleanly(base_dir, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_hf_model(hidden_size=48).save_pretrained(other)
    save_adapter(apply_lora(load_pretrained(other), LoRA(target_modules=["q_proj"])), tmp_path / "adapter")
    capsys.readouterr()  # drop transformers' progress output
    code = kubetune_main(["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "different base model" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
