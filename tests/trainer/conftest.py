"""Trainer fixtures: the builtin tiny model folder and tiny random transformers checkpoints.

    tiny_model_dir                 builtin://tiny (Llama, byte-level BPE tokenizer with ChatML)
    hf_checkpoint("llama3")        a folder saved by transformers' save_pretrained
    hf_checkpoint("qwen2", max_shard_size="20KB", tie_word_embeddings=True)

Families: llama (Llama 2 style), llama3 (llama3 rope scaling, threshold 32 tokens), llama32
(llama3 rope + tied embeddings, like Llama 3.2 1B/3B), mistral (sliding window 16), qwen2
(q/k/v biases). Weights are random with biases and norm weights perturbed, so every parameter
matters in parity tests. Checkpoints are cached per session.
"""
import pytest
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
