"""Forward+backward throughput and peak memory: kubetune's LlamaForCausalLM vs transformers'.

Both build the same ~50M-parameter Llama config (random weights, float32, CPU), run the same
cross-entropy training step (no optimizer), and are measured in separate subprocesses so each
peak RSS is clean. Runs alternate (kubetune, transformers, kubetune, ...) to spread the noise of
a shared machine; each implementation's best repeat (by tokens per CPU-second) is reported. With --threads 1 the
CPU time is the work done, unaffected by other processes competing for the cores.

    .venv/bin/python benchmarks/model_forward_backward.py                # kubetune vs transformers, a table
    .venv/bin/python benchmarks/model_forward_backward.py --variants kubetune transformers kubetune+compile transformers+compile
    .venv/bin/python benchmarks/model_forward_backward.py --impl kubetune --json   # one child run
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(impl: str, compile_layers: bool = False):
    """The model and its training loss on (ids, labels), each side through its own API."""
    import torch

    torch.manual_seed(0)
    if impl == "kubetune":
        from kubetune.trainer.models import LlamaForCausalLM, ModelArgs
        from kubetune.trainer.training.loss import causal_lm_loss_sum_from_hidden

        hf_config = {"architectures": ["LlamaForCausalLM"], **CONFIG}
        model = LlamaForCausalLM(ModelArgs.from_hf_config(hf_config))
        layers = model.model.layers

        def loss_of(ids):  # what the recipes run: lm_head + cross-entropy fused, labelled positions only
            return causal_lm_loss_sum_from_hidden(model.hidden_states(ids), model.lm_head, ids) / (ids.numel() - len(ids))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa"))
        layers = model.model.layers

        def loss_of(ids):  # the usual transformers training step: labels in, mean loss out
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    if compile_layers:  # as the recipes' `compile: true` does: each decoder layer, in place
        for layer in layers:
            layer.compile()
    return model, loss_of


def child(impl: str, batch: int, seq: int, steps: int, warmup: int, threads: int, compile_layers: bool = False) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    baseline = current_rss_mib()  # after imports, before the model
    model, loss_of = build(impl, compile_layers)
    model.train()
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        loss = loss_of(ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = step()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "impl": impl,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens_per_s": batch * seq * steps / seconds,
        "step_s": seconds / steps,
        # CPU time is steadier than wall time on a machine shared with other work.
        "tokens_per_cpu_s": batch * seq * steps / cpu_seconds,
        "peak_rss_mib": rss_mib(),
        "baseline_rss_mib": baseline,
        "loss": loss,
        "threads": torch.get_num_threads(),
    }


VARIANTS = ("kubetune", "transformers", "kubetune+compile", "transformers+compile")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=VARIANTS, help="child mode: run one variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["kubetune", "transformers"],
                        help="what to compare; the first two are eager, '+compile' compiles each decoder layer")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="child mode: print one JSON result")
    args = parser.parse_args()
    if args.impl:
        impl, _, compiled = args.impl.partition("+")
        result = child(impl, args.batch, args.seq, args.steps, args.warmup, args.threads, compile_layers=bool(compiled))
        result["impl"] = args.impl
        print(json.dumps(result) if args.json else result)
        return 0

    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for variant in args.variants:
            command = [sys.executable, __file__, "--impl", variant, "--json", "--batch", str(args.batch), "--seq", str(args.seq),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"  {variant}: {result['tokens_per_s']:.0f} tokens/s, {result['tokens_per_cpu_s']:.0f} tokens/CPU-s, "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB, loss {result['loss']:.4f}", file=sys.stderr)
            if variant not in best or result["tokens_per_cpu_s"] > best[variant]["tokens_per_cpu_s"]:
                best[variant] = result
    baseline = best.get("transformers") or next(iter(best.values()))
    print(f"config: {CONFIG}")
    print(f"batch {args.batch} x seq {args.seq}, {args.steps} timed steps after {args.warmup} warmup, "
          f"{baseline['threads']} torch threads, best of {args.repeats}")
    print()
    print("| implementation | params (M) | tokens/s (wall) | tokens per CPU-second | vs transformers (CPU time) | peak RSS (MiB) | "
          "peak - before model (MiB) | RSS vs transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r['params_m']:.1f} | {r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | "
              f"{r['tokens_per_cpu_s'] / baseline['tokens_per_cpu_s']:.2f}x | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f} | {r['peak_rss_mib'] / baseline['peak_rss_mib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
