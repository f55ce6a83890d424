"""Trainer fixtures: the builtin tiny model folder and tiny random transformers checkpoints.

    tiny_model_dir                 builtin://tiny (Llama, byte-level BPE tokenizer with ChatML)
    hf_checkpoint("llama3")        a folder saved by transformers' save_pretrained
    hf_checkpoint("qwen2", max_shard_size="20KB", tie_word_embeddings=True)
    one_torch_thread               a module runs with one torch thread (pytestmark usefixtures)

Families: llama (Llama 2 style), llama3 (llama3 rope scaling, threshold 32 tokens), llama32
(llama3 rope + tied embeddings, like Llama 3.2 1B/3B), mistral (sliding window 16), qwen2
(q/k/v biases). Weights are random with biases and norm weights perturbed, so every parameter
matters in parity tests. Checkpoints are cached per session.
"""
import json

import pytest
import torch
from hf_checkpoints import make_hf_model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(family, max_shard_size=None, **config_overrides) -> folder saved by transformers."""
    cache = {}

    def make(family: str, max_shard_size=None, **overrides):
        key = (family, max_shard_size, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"hf-{family}")
            model = make_hf_model(family, **overrides)
            kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
            model.save_pretrained(folder, **kwargs)
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(kubetune_cache_dir):
    from kubetune.trainer.builtin import resolve_model_path

    return resolve_model_path("builtin://tiny")


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    """Tokenizer folders trained once per session: {"llama2_sp", "llama2_sp_legacy", "llama3", "qwen2", "sp_default_normalizer"}."""
    import tokenizer_files

    root = tmp_path_factory.mktemp("tokenizers")
    sp = tokenizer_files.make_sentencepiece_dir(root / "llama2_sp")
    legacy = root / "llama2_sp_legacy"
    legacy.mkdir()
    (legacy / "tokenizer.model").write_bytes((sp / "tokenizer.model").read_bytes())
    config = json.loads((sp / "tokenizer_config.json").read_text())
    (legacy / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    return {
        "llama2_sp": sp,
        "llama2_sp_legacy": legacy,
        "llama3": tokenizer_files.make_llama3_dir(root / "llama3"),
        "qwen2": tokenizer_files.make_qwen2_dir(root / "qwen2"),
        "sp_default_normalizer": tokenizer_files.make_sentencepiece_dir(root / "sp_nfkc", default_normalizer=True),
    }


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a CPU shared with other jobs extra
    threads make each op many times slower (measured: a 60-step fine-tune 20 s -> 120 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
