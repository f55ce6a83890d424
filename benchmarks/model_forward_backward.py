"""Forward+backward throughput and peak memory: kubetune's LlamaForCausalLM vs transformers'.

Both build the same ~50M-parameter Llama config (random weights, float32, CPU), run the same
cross-entropy training step (no optimizer), and are measured in separate subprocesses so each
peak RSS is clean. Runs alternate (kubetune, transformers, kubetune, ...) to spread the noise of
a shared machine; each implementation's best repeat (by tokens per CPU-second) is reported. With --threads 1 the
CPU time is the work done, unaffected by other processes competing for the cores.

    .venv/bin/python benchmarks/model_forward_backward.py                # kubetune vs transformers, a table
    .venv/bin/python benchmarks/model_forward_backward.py --variants kubetune transformers kubetune+compile transformers+compile
    .venv/bin/python benchmarks/model_forward_backward.py --impl kubetune --json   # one child run
    .venv/bin/python benchmarks/model_forward_backward.py --padded --variants kubetune transformers matmuls-only

--padded: right-padded batches whose rows hold between a quarter and all of `seq` real tokens
(uniform, seeded; the same batches for every variant), like padded instruction data; padding
carries no label and tokens/s counts real tokens only.

matmuls-only: not a model, a floor. It runs just the matmuls a step of this config must do
(every projection and the lm_head: forward, grad-input and grad-weight, at the step's token
count), with nothing else. No implementation that does the same matmuls on the same tokens can
beat its tokens/s, so `matmuls-only / transformers` is the largest speedup still possible.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from batches import random_batch

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


def matmul_shapes(tokens: int) -> list[tuple[int, int, int]]:
    """(rows, in_features, out_features) of every matmul in a forward of `tokens` tokens."""
    hidden, heads, kv_heads = CONFIG["hidden_size"], CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
    head_dim, inter = hidden // heads, CONFIG["intermediate_size"]
    per_layer = [(hidden, heads * head_dim), (hidden, kv_heads * head_dim), (hidden, kv_heads * head_dim),
                 (heads * head_dim, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    return [(tokens, i, o) for i, o in per_layer] * CONFIG["num_hidden_layers"] + [(tokens, hidden, CONFIG["vocab_size"])]


class MatmulsOnly:
    """The matmuls of a training step and nothing else: forward, grad-input, grad-weight per Linear."""

    def __init__(self, tokens: int):
        import torch

        self.operands = [(torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)) for m, k, n in matmul_shapes(tokens)]
        self.params = sum(n * k for _, k, n in matmul_shapes(tokens))

    def step(self) -> float:
        import torch

        for x, weight, grad_out in self.operands:
            torch.nn.functional.linear(x, weight)  # forward
            grad_out @ weight  # grad of the input
            grad_out.T @ x  # grad of the weight
        return float("nan")


def build(impl: str, compile_layers: bool = False):
    """The model and its training loss on (ids, mask, labels), each side through its own API."""
    import torch

    torch.manual_seed(0)
    if impl == "kubetune":
        from kubetune.trainer.models import LlamaForCausalLM, ModelArgs
        from kubetune.trainer.training.loss import causal_lm_loss_sum_from_hidden

        hf_config = {"architectures": ["LlamaForCausalLM"], **CONFIG}
        model = LlamaForCausalLM(ModelArgs.from_hf_config(hf_config))
        layers = model.model.layers

        def loss_of(ids, mask, labels):  # what the recipes run: lm_head + cross-entropy fused, labelled positions only
            hidden = model.hidden_states(ids, attention_mask=mask)
            return causal_lm_loss_sum_from_hidden(hidden, model.lm_head, labels) / int((labels[:, 1:] != -100).sum())
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa"))
        layers = model.model.layers

        def loss_of(ids, mask, labels):  # the usual transformers training step: labels in, mean loss out
            return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    if compile_layers:  # as the recipes' `compile: true` does: each decoder layer, in place
        for layer in layers:
            layer.compile()
    return model, loss_of


def child(impl: str, batch: int, seq: int, steps: int, warmup: int, threads: int, compile_layers: bool = False,
          padded: bool = False) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    baseline = current_rss_mib()  # after imports, before the model
    ids, mask, labels = random_batch(CONFIG["vocab_size"], batch, seq, padded, seed=0)
    real_tokens = int(mask.sum())
    if impl == "matmuls-only":
        floor = MatmulsOnly(real_tokens)
        step, params = floor.step, floor.params
    else:
        model, loss_of = build(impl, compile_layers)
        model.train()
        params = sum(p.numel() for p in model.parameters())

        def step():
            loss = loss_of(ids, mask, labels)
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
        "params_m": params / 1e6,
        "real_tokens": real_tokens,
        "tokens_per_s": real_tokens * steps / seconds,
        "step_s": seconds / steps,
        # CPU time is steadier than wall time on a machine shared with other work.
        "tokens_per_cpu_s": real_tokens * steps / cpu_seconds,
        "peak_rss_mib": rss_mib(),
        "baseline_rss_mib": baseline,
        "loss": loss,
        "threads": torch.get_num_threads(),
    }


VARIANTS = ("kubetune", "transformers", "kubetune+compile", "transformers+compile", "matmuls-only")


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
    parser.add_argument("--padded", action="store_true", help="right-padded rows of seq/4..seq real tokens")
    parser.add_argument("--json", action="store_true", help="child mode: print one JSON result")
    args = parser.parse_args()
    if args.impl:
        impl, _, compiled = args.impl.partition("+")
        result = child(impl, args.batch, args.seq, args.steps, args.warmup, args.threads, compile_layers=bool(compiled),
                       padded=args.padded)
        result["impl"] = args.impl
        print(json.dumps(result) if args.json else result)
        return 0

    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for variant in args.variants:
            command = [sys.executable, __file__, "--impl", variant, "--json", "--batch", str(args.batch), "--seq", str(args.seq),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            command += ["--padded"] if args.padded else []
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"  {variant}: {result['tokens_per_s']:.0f} tokens/s, {result['tokens_per_cpu_s']:.0f} tokens/CPU-s, "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB, loss {result['loss']:.4f}", file=sys.stderr)
            if variant not in best or result["tokens_per_cpu_s"] > best[variant]["tokens_per_cpu_s"]:
                best[variant] = result
    baseline = best.get("transformers") or next(iter(best.values()))
    print(f"config: {CONFIG}")
    print(f"batch {args.batch} x seq {args.seq} ({'padded, ' if args.padded else ''}{baseline['real_tokens']} real tokens), "
          f"{args.steps} timed steps after {args.warmup} warmup, {baseline['threads']} torch threads, best of {args.repeats}")
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
