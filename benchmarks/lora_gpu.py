"""LoRA and QLoRA on a Llama-3.1-8B-shaped model on one GPU: tokens/s and peak GPU memory.

GPU only (prints a notice and exits 0 without CUDA). Random weights are fine: speed and
memory do not depend on the values. The model is built on the meta device and materialized
one decoder layer at a time on the GPU (quantized to NF4 right away for QLoRA), so the
full bf16 model never has to fit next to its NF4 copy.

Settings: bf16 base, LoRA rank 16 / alpha 32 on all 7 projections, batch 2 x 2048 tokens,
activation checkpointing, AdamW over the adapters, as the lora_finetune recipe runs it.
Targets (issue 4): QLoRA peak < 16 GB, LoRA peak < 24 GB.

    .venv/bin/python benchmarks/lora_gpu.py                    # both cases
    .venv/bin/python benchmarks/lora_gpu.py --case qlora --steps 10
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def materialize(module, device, dtype) -> None:
    """Meta -> real (random) weights on `device`: normal(0, 0.02) matrices, ones for norms."""
    import torch

    module.to_empty(device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    module.to(dtype)


def build(case: str, device):
    import torch

    from kubetune.trainer.models import LlamaForCausalLM, ModelArgs
    from kubetune.trainer.peft import apply_lora
    from kubetune.trainer.quant import quantize_base

    with torch.device("meta"):
        model = LlamaForCausalLM(ModelArgs.from_hf_config(LLAMA_3_1_8B))
    for layer in model.model.layers:
        materialize(layer, device, torch.bfloat16)
        if case == "qlora":
            quantize_base(layer)
    for part in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialize(part, device, torch.bfloat16)
    lora = SimpleNamespace(rank=16, alpha=32.0, dropout=0.0, target_modules=TARGETS, use_dora=False)
    apply_lora(model, lora)
    model.enable_activation_checkpointing(True)
    return model


def run(case: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import torch

    from kubetune.trainer.quant import weight_nbytes
    from kubetune.trainer.training.loss import causal_lm_loss_sum_from_hidden

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    model = build(case, device)
    weights_gib = weight_nbytes(model) / 2**30
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, LLAMA_3_1_8B["vocab_size"], (batch, seq), device=device)
    model.train()
    times = []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        # The recipes' loss: lm_head + cross-entropy fused in chunks, no full [B, T, vocab] logits.
        loss = causal_lm_loss_sum_from_hidden(model.hidden_states(ids), model.lm_head, ids) / (ids.numel() - len(ids))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    result = {
        "case": case,
        "tokens_per_second": batch * seq / statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "weights_gib": weights_gib,
        "trainable_params": sum(p.numel() for p in params),
    }
    del model, optimizer
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["lora", "qlora"], action="append")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("lora_gpu: no CUDA GPU here; this benchmark runs on a GPU machine only (skipped)")
        return
    print(f"{torch.cuda.get_device_name()}, batch {args.batch} x {args.seq}, rank 16 on 7 projections, "
          "bf16, activation checkpointing\n")
    print("| case | tokens/s | peak GPU memory GiB | weights GiB | trainable params |")
    print("|---|---|---|---|---|")
    for case in args.case or ["qlora", "lora"]:
        r = run(case, args.batch, args.seq, args.steps, args.warmup)
        print(f"| {case} | {r['tokens_per_second']:.0f} | {r['peak_gib']:.2f} | {r['weights_gib']:.2f} | {r['trainable_params']:,} |",
              flush=True)


if __name__ == "__main__":
    main()
