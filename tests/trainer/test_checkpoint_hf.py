"""HF checkpoints: save -> transformers load -> identical logits; sharded save/load; atomic
writes; and bad checkpoints raise CheckpointError naming the file and the tensor."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kubetune.errors import KubetuneError
from kubetune.trainer.checkpoint import CheckpointError, load_pretrained, save_pretrained
from kubetune.trainer.models import UnsupportedModelError

ATOL = 1e-5


def logits_of(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("family", ["llama", "llama32", "mistral", "qwen2"])
def test_saved_model_loads_in_transformers_with_identical_logits(hf_checkpoint, tmp_path, family):
    ours = load_pretrained(hf_checkpoint(family))
    out = save_pretrained(ours, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    assert (logits_of(ours, ids) - logits_of(reloaded, ids)).abs().max().item() <= ATOL
    assert (out / "generation_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == [ours.args.architecture]


def test_tied_model_saves_without_lm_head_like_transformers(hf_checkpoint, tmp_path):
    ours = load_pretrained(hf_checkpoint("llama32"))
    out = save_pretrained(ours, tmp_path / "out")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_sharded_save_writes_an_index_and_loads_back_in_both(hf_checkpoint, tmp_path):
    ours = load_pretrained(hf_checkpoint("qwen2"))
    out = save_pretrained(ours, tmp_path / "out", max_shard_size=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(ours.state_dict())
    ids = torch.randint(0, ours.args.vocab_size, (1, 20))
    want = logits_of(ours, ids)
    assert (logits_of(load_pretrained(out), ids) - want).abs().max().item() <= ATOL
    assert (logits_of(AutoModelForCausalLM.from_pretrained(out).eval(), ids) - want).abs().max().item() <= ATOL


def test_loads_checkpoints_sharded_by_transformers(hf_checkpoint):
    folder = hf_checkpoint("llama", max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 128, (1, 12))
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert (logits_of(load_pretrained(folder), ids) - logits_of(reference, ids)).abs().max().item() <= ATOL


def test_load_in_bf16_gives_bf16_parameters(hf_checkpoint):
    model = load_pretrained(hf_checkpoint("llama"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_save_replaces_existing_folder_and_leaves_no_temp_dirs(hf_checkpoint, tmp_path):
    ours = load_pretrained(hf_checkpoint("llama"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    save_pretrained(ours, tmp_path / "out")
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tokenizer_files_are_copied(tiny_model_dir, tmp_path):
    model = load_pretrained(tiny_model_dir)
    out = save_pretrained(model, tmp_path / "out", tokenizer_dir=tiny_model_dir)
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()


# --- bad input ------------------------------------------------------------------------------


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "ckpt")


def test_truncated_safetensors_names_the_file(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint("llama"), tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_pretrained(folder)
    assert str(weights) in str(info.value)


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint("llama"), tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'") as info:
        load_pretrained(folder)
    assert "model.safetensors" in str(info.value)


def test_unexpected_tensor_is_named_with_its_file(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint("llama"), tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.self_attn.q_proj.bias'") as info:
        load_pretrained(folder)
    assert str(folder / "model.safetensors") in str(info.value)


def test_wrong_shape_is_named(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight' has shape"):
        load_pretrained(folder)


def test_unsupported_architecture_names_config_json(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["GemmaForCausalLM"], model_type="gemma")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture GemmaForCausalLM") as info:
        load_pretrained(folder)
    assert str(folder / "config.json") in str(info.value)
    assert isinstance(info.value, KubetuneError)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
                                                       "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(tmp_path)


def test_unknown_scheme_is_a_clear_error():
    # hf:// and org/name are Hub ids now (tests/trainer/test_hub.py); other schemes are refused.
    with pytest.raises(CheckpointError, match=r"s3://bucket/model.*local folders, Hub ids"):
        load_pretrained("s3://bucket/model")


def test_missing_shard_file_is_named(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint("llama", max_shard_size="50KB"), tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="file not found") as info:
        load_pretrained(folder)
    assert shard.name in str(info.value)


def test_invalid_config_json_is_named(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint("llama"), tmp_path)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_pretrained(folder)
