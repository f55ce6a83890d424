"""LoRA / QLoRA / full fine-tuning memory, and LoRA training tokens/s against transformers + peft.

One Llama-shaped model (random weights, float32 on the CPU), one training step = forward,
cross-entropy, backward, AdamW step, measured in separate subprocesses so each peak RSS is clean:

- `kubetune-lora`: our LlamaForCausalLM + apply_lora, rank 16 on all 7 projections;
- `peft-lora`:     transformers' LlamaForCausalLM (sdpa) + peft.get_peft_model, same rank/targets;
- `kubetune-full`: our model, every parameter trained (the memory baseline);
- `kubetune-qlora`: our model with NF4 decoder projections (torchao) + the same LoRA.

Reported per case: tokens/s of the fastest timed step (after warm-up; on a shared machine
other work only adds time, so the minimum is the least noisy estimate), peak RSS, RSS growth
during training (peak minus RSS once the model is built), trainable parameters, AdamW state
bytes, and the bytes of the decoder projection weights (QLoRA vs the same weights in bf16).
Runs alternate between implementations to spread the noise of a shared machine; the best
repeat of each is kept. Speed is also measured head to head: kubetune-lora and peft-lora in one
process, one training step of each in turn (the load of a shared machine hits both alike).

    .venv/bin/python benchmarks/lora_cpu.py                  # all cases, prints a markdown table
    .venv/bin/python benchmarks/lora_cpu.py --speed          # only the interleaved speed A/B
    .venv/bin/python benchmarks/lora_cpu.py --speed --padded # the same on right-padded rows (seq/4..seq real tokens)
    .venv/bin/python benchmarks/lora_cpu.py --case kubetune-lora --json   # one child run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from batches import random_batch

CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
CASES = ["kubetune-lora", "peft-lora", "kubetune-full", "kubetune-qlora"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(case: str):
    """(model, loss(ids, mask, labels)) for one case, from the same seed; each stack computes its training loss
    its own way: transformers from `labels`, kubetune with the recipes' fused lm_head + loss."""
    import torch

    torch.manual_seed(0)
    if case == "peft-lora":
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa"))
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
        return model, lambda ids, mask, labels: model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss

    from kubetune.trainer.models import LlamaForCausalLM, ModelArgs
    from kubetune.trainer.peft import apply_lora

    model = LlamaForCausalLM(ModelArgs.from_hf_config({"architectures": ["LlamaForCausalLM"], **CONFIG}))
    if case == "kubetune-qlora":
        from kubetune.trainer.quant import quantize_base

        quantize_base(model)
    if case != "kubetune-full":
        from types import SimpleNamespace

        apply_lora(model, SimpleNamespace(rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS, use_dora=False))
    from kubetune.trainer.training.loss import causal_lm_loss_sum_from_hidden

    def loss_of(ids, mask, labels):
        hidden = model.hidden_states(ids, attention_mask=mask)
        return causal_lm_loss_sum_from_hidden(hidden, model.lm_head, labels) / int((labels[:, 1:] != -100).sum())

    return model, loss_of


def projection_bytes(model) -> tuple[int, int]:
    """(bytes the decoder projection weights take here, bytes they would take in bf16)."""
    from kubetune.trainer.quant import tensor_nbytes

    held = bf16 = 0
    for name, param in model.named_parameters():
        module = name.replace(".base_layer", "").rsplit(".", 2)[-2]  # peft keeps the base under base_layer
        if module in TARGETS and name.endswith(".weight") and "lora_" not in name:
            held += tensor_nbytes(param)
            bf16 += param.numel() * 2
    return held, bf16


def run_case(case: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, loss_of = build(case)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    held, bf16 = projection_bytes(model)
    rss_model = current_rss_mib()
    ids, mask, labels = random_batch(CONFIG["vocab_size"], batch, seq, seed=1)
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        loss_of(ids, mask, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    state_bytes = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "case": case,
        # the fastest step: on a shared machine, other work only ever adds time
        "tokens_per_second": batch * seq / min(times),
        "median_tokens_per_second": batch * seq / statistics.median(times),
        "peak_rss_mib": peak_rss_mib(),
        "training_rss_growth_mib": peak_rss_mib() - rss_model,
        "trainable_params": sum(p.numel() for p in params),
        "optimizer_state_mib": state_bytes / 2**20,
        "projection_mib": held / 2**20,
        "projection_bf16_mib": bf16 / 2**20,
    }


def train_step(model, loss_of, optimizer, batch) -> float:
    started = time.perf_counter()
    loss_of(*batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def interleaved_speed(cases: list[str], batch: int, seq: int, steps: int, warmup: int, padded: bool = False) -> dict[str, dict]:
    """tokens/s of several cases in one process, one step of each in turn, so the load of a shared
    machine falls on all of them alike (the fairest speed comparison available here)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    ids, mask, labels = random_batch(CONFIG["vocab_size"], batch, seq, padded, seed=1)
    real_tokens = int(mask.sum())  # what tokens/s counts
    runs = {}
    for case in cases:
        model, loss_of = build(case)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[case] = (model, loss_of, optimizer)
    times: dict[str, list[float]] = {case: [] for case in cases}
    for step in range(warmup + steps):
        for case, (model, loss_of, optimizer) in runs.items():
            elapsed = train_step(model, loss_of, optimizer, (ids, mask, labels))
            if step >= warmup:
                times[case].append(elapsed)
    return {case: {"min_tokens_per_second": real_tokens / min(t), "median_tokens_per_second": real_tokens / statistics.median(t)}
            for case, t in times.items()}


def child(case: str, args) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--json", "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_speed(args) -> None:
    speed = interleaved_speed(["kubetune-lora", "peft-lora"], args.batch, args.seq, 3 * args.steps, args.warmup, args.padded)
    ratio_min = speed["kubetune-lora"]["min_tokens_per_second"] / speed["peft-lora"]["min_tokens_per_second"]
    ratio_median = speed["kubetune-lora"]["median_tokens_per_second"] / speed["peft-lora"]["median_tokens_per_second"]
    print(f"interleaved in one process{' (padded rows)' if args.padded else ''}, {3 * args.steps} steps each: kubetune-lora "
          f"{speed['kubetune-lora']['min_tokens_per_second']:.0f} tokens/s (median {speed['kubetune-lora']['median_tokens_per_second']:.0f}), "
          f"peft-lora {speed['peft-lora']['min_tokens_per_second']:.0f} (median {speed['peft-lora']['median_tokens_per_second']:.0f}): "
          f"{ratio_min:.2f}x by fastest step, {ratio_median:.2f}x by median\n")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed", action="store_true", help="only the interleaved kubetune-lora vs peft-lora speed run")
    parser.add_argument("--padded", action="store_true", help="speed run on right-padded rows (tokens/s counts real tokens)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.batch, args.seq, args.steps, args.warmup)))
        return
    if args.speed:
        print_speed(args)
        return
    # Memory first, in fresh children: Linux keeps a parent's peak RSS in a forked child's
    # ru_maxrss, so this process must still be small when it starts them.
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for case in CASES:
            result = child(case, args)
            if case not in best or result["tokens_per_second"] > best[case]["tokens_per_second"]:
                best[case] = result
    print(f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after {args.warmup} warm-up, "
          f"best of {args.repeats}, rank {RANK} on {len(TARGETS)} projections, fp32 CPU\n")
    print("| case | tokens/s | peak RSS MiB | RSS growth in training MiB | trainable params | AdamW state MiB | projection weights MiB (bf16 equiv.) |")
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        r = best[case]
        print(f"| {case} | {r['tokens_per_second']:.0f} | {r['peak_rss_mib']:.0f} | {r['training_rss_growth_mib']:.0f} | "
              f"{r['trainable_params']:,} | {r['optimizer_state_mib']:.1f} | {r['projection_mib']:.1f} ({r['projection_bf16_mib']:.1f}) |")
    ours, theirs = best["kubetune-lora"], best["peft-lora"]
    q = best["kubetune-qlora"]
    print(f"\nkubetune LoRA vs transformers+peft: {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x tokens/s, "
          f"peak RSS {ours['peak_rss_mib']:.0f} vs {theirs['peak_rss_mib']:.0f} MiB")
    print(f"QLoRA projection bytes / bf16 bytes: {q['projection_mib'] / q['projection_bf16_mib']:.3f}")
    print(f"LoRA AdamW state / full AdamW state: {ours['optimizer_state_mib'] / best['kubetune-full']['optimizer_state_mib']:.4f}\n")
    print_speed(args)

if __name__ == "__main__":
    main()
