"""FSDP2 training throughput and MFU of a Llama-3.1-8B-shaped model on GPUs (random weights, bf16).

    torchrun --standalone --nproc-per-node 1 benchmarks/fsdp2_gpu.py            # 1 GPU (H100/H200: fits)
    torchrun --standalone --nproc-per-node 8 benchmarks/fsdp2_gpu.py --steps 30
    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp2_gpu.py --cpu-smoke --no-compile --tokens-per-gpu 256 --steps 2 --warmup 1

What it runs is the trainer's own path: `kubetune.trainer.distributed.shard_model` (fully_shard on each
decoder layer and the root, bf16 parameters, fp32 gradient reduce-scatter), activation checkpointing
and per-layer torch.compile as the recipes apply them, the fused chunked loss (`steps.batch_loss_sum`),
gradient clipping and fused AdamW. Each GPU trains on --tokens-per-gpu tokens per step (8192 by
default: one packed sequence of 8192 tokens of 4 documents, so document masking is exercised).
Reports tokens/s per GPU and MFU = achieved FLOP/s / peak bf16 FLOP/s, with FLOPs per token counted
as torchtitan does (6 x non-embedding parameters + 12 x layers x heads x head_dim x seq_len), so the
figure compares with torchtitan's ~40% for Llama 3 8B on H100.

Results go to stdout as JSON (rank 0) and belong in benchmarks/fsdp2_gpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from kubetune.trainer.distributed import World, shard_model
from kubetune.trainer.models.llama import LlamaForCausalLM, ModelArgs
from kubetune.trainer.training.steps import batch_loss_sum

# Llama-3.1-8B's config.json (meta-llama/Llama-3.1-8B), weights random.
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


class Settings:  # the recipe's `distributed:` section, as the benchmark sets it
    mixed_precision = "auto"
    cpu_offload = False
    reshard_after_forward = True


def peak_tflops(override: float | None) -> float:
    if override:
        return override
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16 TFLOP/s)")


def flops_per_token(args: ModelArgs, model: torch.nn.Module, seq_len: int) -> float:
    embedding = model.model.embed_tokens.weight.numel()
    params = sum(p.numel() for p in model.parameters()) - embedding
    head_dim = args.hidden_size // args.num_attention_heads
    return 6 * params + 12 * args.num_hidden_layers * args.num_attention_heads * head_dim * seq_len


def packed_batch(vocab: int, seq_len: int, documents: int, device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (1, seq_len), device=device)
    doc_len = seq_len // documents
    segments = (torch.arange(seq_len, device=device) // doc_len).clamp(max=documents - 1)[None] + 1
    positions = torch.arange(seq_len, device=device)[None] - (segments - 1) * doc_len
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
            "segment_ids": segments, "position_ids": positions}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed (compile, allocator warm-up)")
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--documents", type=int, default=4, help="documents packed per sequence")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-activation-checkpointing", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a smoke run)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check the script itself on CPUs (gloo, a small model of the same layout); no figures")
    parser.add_argument("--param-dtype", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: pure bf16 weights and AdamW state (fits one 80 GB GPU); fp32: fp32 master "
                        "weights with bf16 compute (FSDP2 mixed precision, as torchtitan; needs >= 2 GPUs)")
    cli = parser.parse_args()

    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if cli.cpu_smoke:  # the script's own logic on gloo and a small model: no figures, just "it runs"
        device, backend = torch.device("cpu"), "gloo"
        dist.init_process_group(backend)
    else:
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    world = World(rank=rank, size=size, local_rank=local, device=device, backend=backend)

    config = dict(LLAMA_3_1_8B, **({"num_hidden_layers": cli.layers} if cli.layers else {}))
    if cli.cpu_smoke:
        config.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=1024, num_hidden_layers=cli.layers or 2)
    args = ModelArgs.from_hf_config(config)
    torch.manual_seed(0)
    param_dtype = torch.bfloat16 if cli.param_dtype == "bf16" else torch.float32
    torch.set_default_dtype(param_dtype)  # parameters are created in it (on meta, then allocated)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    torch.set_default_dtype(torch.float32)
    model.enable_activation_checkpointing(not cli.no_activation_checkpointing)
    if not cli.no_compile:
        for layer in model.model.layers:
            layer.compile()
    shard_model(model, world, Settings(), param_dtype, force=True)  # FSDP2 even on one GPU
    model.to_empty(device=device)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02) if param.ndim > 1 else param.fill_(1.0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    fpt = flops_per_token(args, model, cli.tokens_per_gpu)

    times = []
    for step in range(cli.warmup + cli.steps):
        batch = packed_batch(args.vocab_size, cli.tokens_per_gpu, cli.documents, device)
        synchronize()
        started = time.perf_counter()
        tokens = world.sum_int(int(batch["labels"].numel() - 1))
        (batch_loss_sum(model, batch) / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if step >= cli.warmup:
            times.append(time.perf_counter() - started)

    seconds = sorted(times)[len(times) // 2]  # the median step
    tokens_per_gpu = cli.tokens_per_gpu / seconds
    if cli.cpu_smoke:
        if world.is_main:
            print(json.dumps({"cpu_smoke": "ok", "ranks": size, "median_step_seconds": round(seconds, 4)}))
        dist.destroy_process_group()
        return
    mfu = tokens_per_gpu * fpt / (peak_tflops(cli.peak_tflops) * 1e12)
    if world.is_main:
        print(json.dumps({
            "gpu": torch.cuda.get_device_name(), "gpus": size, "layers": args.num_hidden_layers,
            "tokens_per_gpu_per_step": cli.tokens_per_gpu, "median_step_seconds": round(seconds, 4),
            "tokens_per_second_per_gpu": round(tokens_per_gpu, 1), "mfu": round(mfu, 4),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "compile": not cli.no_compile, "activation_checkpointing": not cli.no_activation_checkpointing,
            "param_dtype": cli.param_dtype,
            "torch": torch.__version__,
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
