"""`kubetune serve` against transformers `generate`: simultaneous arrivals and Poisson arrivals.

Model: a random Llama of 8 layers, hidden 512 (~25M parameters, builtin://tiny's tokenizer, vocab
1024), written once into $KUBETUNE_CACHE_DIR; fp32 on the CPU. Greedy, EOS ignored, so every
request produces exactly its max_tokens.

Simultaneous arrivals (all requests at once, each `--max-tokens` new tokens):
- transformers generate, one prompt after another (the sequential baseline);
- transformers generate on all prompts in one left-padded batch (the static batch), at 16 and 32;
- kubetune serve (its own process, 127.0.0.1, the openai client) at concurrency 16 and 32;
the static batch and the server alternate for `--rounds` rounds and each reports its median round.

Staggered arrivals (Poisson, mixed prompt lengths and output lengths):
- kubetune serve, each request sent at its arrival time (streamed: time to first token measured
  at the first chunk);
- a static-batch loop: waits until `--batch` requests have arrived (or the last ones), runs one
  left-padded `generate` to the batch's longest max_tokens, and so on; its time to first token is
  when the batch's first logits exist (a logits processor records it).

    .venv/bin/python benchmarks/serve_throughput.py [--prompts 16 32] [--max-tokens 32] [--arrivals 48] [--threads 1]

Prints markdown tables; benchmarks/serve_throughput.md records runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORDS = (
    "the model is good today what is the capital of france in 2020 team my friend reads a book why sky blue "
    "old man walks to park children play music weather seems could you explain that again engineer fixes bug"
).split()

MODEL = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64
)


def prompt_text(i: int, words: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def model_dir() -> Path:
    """The benchmark model (random weights, seeded), made once next to the builtin models."""
    import torch

    from kubetune.trainer.builtin import TINY_CONFIG, cache_dir, resolve_model_path
    from kubetune.trainer.checkpoint.hf import write_model_dir
    from kubetune.trainer.models.llama import LlamaForCausalLM, ModelArgs

    folder = cache_dir() / "bench" / "llama-8x512"
    if (folder / "config.json").is_file():
        return folder
    tiny = resolve_model_path("builtin://tiny")
    config = {**json.loads((tiny / "config.json").read_text()), **MODEL}
    config = {k: v for k, v in config.items() if k in TINY_CONFIG or k.endswith("token_id")}
    args = ModelArgs.from_hf_config(config)
    args.generation_config = json.loads((tiny / "generation_config.json").read_text())
    torch.manual_seed(0)
    model = LlamaForCausalLM(args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    tmp = folder.parent / "llama-8x512.tmp"
    write_model_dir(model, tmp, tiny)
    os.replace(tmp, folder)
    return folder


class FirstLogits:
    """A transformers logits processor that records when the first logits of a generate call exist."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def hf_setup(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


def hf_generate(model, tokenizer, prompts: list[str], max_tokens: int, first: FirstLogits | None = None) -> int:
    import torch
    from transformers import LogitsProcessorList

    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([first] if first else []),
        )
    return (out.shape[1] - batch.input_ids.shape[1]) * len(prompts)


def hf_sequential(model, tokenizer, prompts, max_tokens) -> tuple[float, int]:
    started, produced = time.perf_counter(), 0
    for prompt in prompts:
        produced += hf_generate(model, tokenizer, [prompt], max_tokens)
    return time.perf_counter() - started, produced


def hf_static(model, tokenizer, prompts, max_tokens) -> tuple[float, int]:
    started = time.perf_counter()
    produced = hf_generate(model, tokenizer, prompts, max_tokens)
    return time.perf_counter() - started, produced


def hf_static_loop(model, tokenizer, arrivals, batch_size) -> dict:
    """Waits for each batch of `batch_size` arrivals, runs it to its longest max_tokens."""
    start = time.perf_counter()
    ttft, useful, k = [], 0, 0
    while k < len(arrivals):
        group = arrivals[k : k + batch_size]
        wait = start + group[-1]["at"] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        first = FirstLogits()
        hf_generate(model, tokenizer, [r["prompt"] for r in group], max(r["max_tokens"] for r in group), first)
        ttft += [first.at - (start + r["at"]) for r in group]
        useful += sum(r["max_tokens"] for r in group)
        k += batch_size
    return {"seconds": time.perf_counter() - start, "tokens": useful, "ttft": ttft}


async def server_simultaneous(url: str, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(prompt: str) -> int:
        result = await client.completions.create(
            model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return result.usage.completion_tokens

    await asyncio.gather(*(one(p) for p in prompts[:4]))  # warm-up
    started = time.perf_counter()
    produced = sum(await asyncio.gather(*(one(p) for p in prompts)))
    elapsed = time.perf_counter() - started
    await client.close()
    return elapsed, produced


async def server_poisson(url: str, arrivals: list[dict]) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()

    async def one(request: dict) -> tuple[float, int]:
        await asyncio.sleep(max(0.0, start + request["at"] - time.perf_counter()))
        sent, first, tokens = time.perf_counter(), None, 0
        stream = await client.completions.create(
            model="bench", prompt=request["prompt"], max_tokens=request["max_tokens"], temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return (first or time.perf_counter()) - sent, tokens

    results = await asyncio.gather(*(one(r) for r in arrivals))
    elapsed = time.perf_counter() - start
    await client.close()
    return {"seconds": elapsed, "tokens": sum(t for _, t in results), "ttft": [f for f, _ in results]}


def poisson_arrivals(count: int, rate: float, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    at, arrivals = 0.0, []
    for i in range(count):
        at += rng.expovariate(rate)
        arrivals.append({"at": at, "prompt": prompt_text(1000 + i, rng.choice([4, 12, 32, 80])),
                         "max_tokens": rng.choice([8, 16, 32, 64])})
    return arrivals


def start_server(folder: Path, concurrency: int) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "kubetune", "serve", str(folder), "--served-model-name", "bench", "--host", "127.0.0.1",
         "--port", str(port), "--max-concurrency", str(concurrency), "--max-queue", "256", "--device", "cpu",
         "--allow-ignore-eos"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit("the server did not become ready")
        time.sleep(0.2)


def median_run(runs: list[tuple[float, int]]) -> tuple[float, int]:
    """The (seconds, tokens) round of median time."""
    return sorted(runs)[len(runs) // 2]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 32], help="simultaneous request counts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--arrivals", type=int, default=48, help="requests in the Poisson run (0: skip it)")
    parser.add_argument("--rate", type=float, default=12.0, help="Poisson arrivals per second")
    parser.add_argument("--batch", type=int, default=16, help="the static loop's batch size")
    parser.add_argument("--rounds", type=int, default=3, help="simultaneous-arrival rounds per side (the median is reported)")
    parser.add_argument("--sequential", type=int, default=16, help="prompts for the sequential baseline (0: skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OMP threads on both sides (1: fair on a shared box, where 2 OMP threads stall each other)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server process

    import torch

    torch.set_num_threads(args.threads)

    folder = model_dir()
    model, tokenizer = hf_setup(folder)
    hf_generate(model, tokenizer, [prompt_text(0, 8)] * 2, 4)  # warm-up
    prompts = [prompt_text(i, 6 + i % 10) for i in range(max(args.prompts))]
    rows = []
    if args.sequential:
        rows.append(("transformers generate, sequential", args.sequential, *hf_sequential(model, tokenizer, prompts[: args.sequential], args.max_tokens)))
    arrivals = poisson_arrivals(args.arrivals, args.rate) if args.arrivals else []

    poisson = static_loop = None
    concurrency = max(args.prompts)
    server, url = start_server(folder, concurrency)
    try:
        # Rounds alternate the two sides (static batch, then the server, per count), and each side's
        # median round is reported: a load change on a shared box then hits both sides alike.
        static_runs: dict[int, list[tuple[float, int]]] = {count: [] for count in args.prompts}
        served_runs: dict[int, list[tuple[float, int]]] = {count: [] for count in args.prompts}
        for _ in range(args.rounds):
            for count in args.prompts:
                static_runs[count].append(hf_static(model, tokenizer, prompts[:count], args.max_tokens))
                served_runs[count].append(asyncio.run(server_simultaneous(url, prompts[:count], args.max_tokens)))
        if arrivals:
            static_loop = hf_static_loop(model, tokenizer, arrivals, args.batch)
            poisson = asyncio.run(server_poisson(url, arrivals))
    finally:
        server.terminate()
        server.wait(60)
    rows += [("transformers generate, one left-padded batch", count, *median_run(static_runs[count])) for count in args.prompts]
    served = [("kubetune serve", count, *median_run(served_runs[count])) for count in args.prompts]

    static = {count: tokens / seconds for name, count, seconds, tokens in rows if "batch" in name}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: random Llama 8 layers x 512 hidden (~25M parameters), fp32 CPU; greedy, EOS ignored\n")
    print(f"### Simultaneous arrivals, {args.max_tokens} new tokens each (median of {args.rounds} alternating rounds)\n")
    print("| setup | requests | seconds | output tokens | output tokens/s | vs static batch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, count, seconds, tokens in rows + served:
        base = static.get(count)
        ratio = f"{tokens / seconds / base:.2f}x" if base else "-"
        print(f"| {name} | {count} | {seconds:.2f} | {tokens} | {tokens / seconds:.0f} | {ratio} |")
    if arrivals:
        print(f"\n### Poisson arrivals: {args.arrivals} requests at {args.rate:g}/s, prompts of 4-80 words, "
              f"max_tokens from {{8, 16, 32, 64}}\n")
        print("| setup | seconds | useful output tokens | output tokens/s | TTFT p50 | TTFT p99 |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, result in ((f"static-batch loop (batches of {args.batch})", static_loop), (f"kubetune serve (--max-concurrency {concurrency})", poisson)):
            print(f"| {name} | {result['seconds']:.2f} | {result['tokens']} | {result['tokens'] / result['seconds']:.0f} | "
                  f"{statistics.median(result['ttft']) * 1000:.0f} ms | {percentile(result['ttft'], 0.99) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
