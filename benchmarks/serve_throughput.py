"""Output tokens/s of `kubetune serve` at concurrency 1 and 16 vs sequential transformers `generate`.

Same model (builtin://tiny), same prompts, same number of new tokens per prompt (greedy, EOS ignored
so every request produces exactly --max-tokens). The server runs as a separate process
(`python -m kubetune serve`) on 127.0.0.1 and is driven by the official openai client.

    .venv/bin/python benchmarks/serve_throughput.py [--prompts 16] [--max-tokens 32] [--threads N]

Prints a markdown table; benchmarks/serve_throughput.md records a run.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import time

PROMPTS = [
    "The model is", "What is the capital of France?", "In 2020, the team", "My friend reads a book",
    "Why is the sky blue?", "The old man walks to the park", "Children play music", "The weather seems",
    "Could you explain that again?", "The engineer fixes the bug", "People visit the museum", "This book was",
    "She sends an email", "The city looks different", "How many people live here?", "We learn something new",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def transformers_sequential(model_dir: str, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    encoded = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]
    with torch.no_grad():
        model.generate(encoded[0], max_new_tokens=4, do_sample=False)  # warm-up
        started, produced = time.perf_counter(), 0
        for ids in encoded:
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
            )
            produced += out.shape[1] - ids.shape[1]
    return time.perf_counter() - started, produced


async def drive_server(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[float, int]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> int:
        async with gate:
            result = await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
            )
            return result.usage.completion_tokens

    await one(prompts[0])  # warm-up
    started = time.perf_counter()
    produced = sum(await asyncio.gather(*(one(p) for p in prompts)))
    elapsed = time.perf_counter() - started
    await client.close()
    return elapsed, produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="number of prompts (cycled from a fixed list)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    args = parser.parse_args()

    import torch

    from kubetune.trainer.builtin import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    model_dir = str(resolve_model_path("builtin://tiny"))

    hf_seconds, hf_tokens = transformers_sequential(model_dir, prompts, args.max_tokens)
    rows = [("transformers generate, sequential", hf_seconds, hf_tokens)]

    port = free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    server = subprocess.Popen(
        [sys.executable, "-m", "kubetune", "serve", model_dir, "--served-model-name", "tiny", "--host", "127.0.0.1",
         "--port", str(port), "--max-concurrency", "16", "--device", "cpu", "--allow-ignore-eos"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)
        for concurrency in (1, 16):
            seconds, tokens = asyncio.run(drive_server(url, prompts, args.max_tokens, concurrency))
            rows.append((f"kubetune serve, concurrency {concurrency}", seconds, tokens))
    finally:
        server.terminate()
        server.wait(60)

    baseline = hf_tokens / hf_seconds
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{len(prompts)} prompts x {args.max_tokens} new tokens (greedy, EOS ignored), builtin://tiny, fp32 CPU\n")
    print("| setup | seconds | output tokens | output tokens/s | vs transformers |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, tokens in rows:
        print(f"| {name} | {seconds:.2f} | {tokens} | {tokens / seconds:.0f} | {tokens / seconds / baseline:.1f}x |")


if __name__ == "__main__":
    main()
