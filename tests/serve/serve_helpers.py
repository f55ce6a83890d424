"""Tiny random transformers models and PEFT adapters for the server's parity tests, and the server on loopback."""
from __future__ import annotations

import copy
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
FAMILIES = {
    # llama3 rope scaling with a short original context, so positions past 8 use the scaled band
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6, "head_dim": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
}


def make_hf_model(family: str, seed: int = 0):
    import torch
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)  # larger than init: logits far apart, so argmax is robust
    return model


def make_peft_adapter(base, folder: Path, seed: int, targets: list[str], rank: int = 4, alpha: float = 8.0):
    """Save a PEFT LoRA adapter with random (non-zero) A and B for `base`; returns the PeftModel (reference)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(str(folder))
    return model.eval()


@contextmanager
def running_server(app, **config):
    """Run `app` with uvicorn (as `kubetune serve` configures it) on 127.0.0.1:<free port> in a thread;
    yields the base URL."""
    import uvicorn

    from kubetune.trainer.serve.cli import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
