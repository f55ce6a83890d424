"""full_finetune vs a plain transformers training loop on a ~50M-parameter Llama, on the CPU.

Same model weights, same batches (the recipe's own data pipeline makes them), same batch size,
sequence length and AdamW hyperparameters. Each side runs in its own process so peak RSS is its
own. tokens/s = tokens in the timed steps / their wall time (the first WARMUP steps excluded).

    .venv/bin/python benchmarks/full_finetune_cpu.py [--steps 12] [--batch-size 4] [--seq-len 256]

Prints a markdown table; benchmarks/full_finetune_cpu.md records a run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 2
MODEL = {  # ~47M parameters
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8192, "hidden_size": 512,
    "intermediate_size": 1408, "num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 8,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0,
}
LR, WEIGHT_DECAY, BETAS = 1e-4, 0.0, (0.9, 0.999)


def make_workdir(root: Path) -> Path:
    """A random ~50M model folder (with the built-in tokenizer), one long text document (text.jsonl)
    and uneven instruction records (instruct.jsonl)."""
    import torch

    from kubetune.trainer.builtin import english_corpus, resolve_model_path
    from kubetune.trainer.checkpoint.hf import write_model_dir
    from kubetune.trainer.models.llama import LlamaForCausalLM, ModelArgs

    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelArgs.from_hf_config(MODEL))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0, 0.02)
    model_dir = root / "model"
    write_model_dir(model, model_dir, resolve_model_path("builtin://tiny"))
    (root / "text.jsonl").write_text(json.dumps({"text": " ".join(english_corpus(sentences=20000))}) + "\n")
    # Instruction data of realistic, uneven lengths: a one-sentence instruction, a 1-15 sentence answer.
    rng, sentences = random.Random(0), english_corpus(sentences=20000)
    with open(root / "instruct.jsonl", "w") as handle:
        for i in range(400):
            answer = " ".join(rng.sample(sentences, rng.randint(1, 15)))
            handle.write(json.dumps({"instruction": sentences[i], "output": answer}) + "\n")
    return model_dir


def recipe_overrides(args, model_dir: Path, data: Path, out: Path, packed: bool) -> list[str]:
    data_format = "alpaca" if args.data == "instruct" else "text"
    return [
        f"model.path={model_dir}", f"dataset.source={data}", f"dataset.format={data_format}",
        "dataset.eval_fraction=0", "dataset.shuffle=false", f"dataset.packed={str(packed).lower()}",
        f"max_seq_len={args.seq_len}", f"batch_size={args.batch_size}",
        f"max_steps={args.steps}", f"optimizer.lr={LR}", f"optimizer.weight_decay={WEIGHT_DECAY}",
        "lr_scheduler.name=constant", "max_grad_norm=1.0", "device=cpu", "dtype=fp32", f"output_dir={out}",
        "progress_bar=false", "resume=never", "save_every_steps=null", "eval_every_steps=null", "seed=0",
        f"compile={str(args.compile).lower()}",
    ]


def run_recipe(args, model_dir: Path, data: Path) -> dict:
    """The real recipe, as users run it. Its steps are timed from metrics.jsonl: the wall time it
    logs, and the process CPU time noted (by this benchmark only) as each step's line is written."""
    from kubetune.trainer.config import resolve_config
    from kubetune.trainer.recipes.full_finetune import recipe_main
    from kubetune.trainer.training import metrics
    from kubetune.trainer.training.metrics import read_metrics

    cpu_at_step: dict[int, float] = {}
    write = metrics.MetricsLog.write

    def noting_cpu_time(self, record):
        if "loss" in record:
            cpu_at_step[record["step"]] = time.process_time()
        write(self, record)

    metrics.MetricsLog.write = noting_cpu_time
    out = Path(args.workdir) / "recipe_out"
    recipe_main(resolve_config("full_finetune", None, recipe_overrides(args, model_dir, data, out, args.data == "instruct" and not args.no_pack)))
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][WARMUP:]
    tokens = sum(r["tokens"] for r in steps)
    seconds = sum(r["tokens"] / r["tokens_per_second"] for r in steps)
    cpu_seconds = cpu_at_step[steps[-1]["step"]] - cpu_at_step[WARMUP]
    return {"tokens_per_second": tokens / seconds, "tokens_per_cpu_second": tokens / cpu_seconds,
            "final_loss": steps[-1]["loss"]}


def run_transformers(args, model_dir: Path, data: Path) -> dict:
    """What a user writes with transformers: from_pretrained, AdamW, loss from labels, clip, step."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.config import resolve_config
    from kubetune.trainer.data.dataset import BatchLoader, build_datasets
    from kubetune.trainer.tokenizers import load_tokenizer

    cfg = resolve_config("full_finetune", None, recipe_overrides(args, model_dir, data, Path(args.workdir) / "x", False))
    torch.manual_seed(0)
    splits = build_datasets(cfg.dataset, load_tokenizer(str(model_dir)), cfg.max_seq_len, cfg.seed)
    loader = BatchLoader(splits.train, cfg.batch_size, splits.pad_id, shuffle=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
                                  fused=args.hf_fused or None)
    timings, cpu_timings, tokens = [], [], []
    for _ in range(args.steps):
        batch = loader.next_batch()
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        final_loss = loss.item()
        timings.append(time.perf_counter() - started)
        cpu_timings.append(time.process_time() - cpu_started)
        tokens.append(int(batch["attention_mask"].sum()))
    timed = sum(tokens[WARMUP:])
    return {"tokens_per_second": timed / sum(timings[WARMUP:]), "tokens_per_cpu_second": timed / sum(cpu_timings[WARMUP:]),
            "final_loss": final_loss}


def child(args) -> None:
    model_dir, data = Path(args.workdir) / "model", Path(args.workdir) / f"{args.data}.jsonl"
    result = run_recipe(args, model_dir, data) if args.child == "recipe" else run_transformers(args, model_dir, data)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two sides this many times")
    parser.add_argument("--data", choices=["text", "instruct"], default="text",
                        help="text: identical full-length batches on both sides (engine vs engine); instruct: "
                        "uneven alpaca records, the recipe packs them, the transformers loop pads each batch")
    parser.add_argument("--no-pack", action="store_true",
                        help="with --data instruct: the recipe does not pack either, so both sides get identical padded batches")
    parser.add_argument("--compile", action="store_true", help="recipe with compile: true")
    parser.add_argument("--hf-fused", action="store_true", help="give the transformers loop fused AdamW too")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per side (OMP_NUM_THREADS)")
    parser.add_argument("--child", choices=["recipe", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    with tempfile.TemporaryDirectory() as workdir:
        model_dir = make_workdir(Path(workdir))
        params = sum(t.numel() for t in __import__("safetensors.torch").torch.load_file(model_dir / "model.safetensors").values())
        results: dict[str, list[dict]] = {"recipe": [], "transformers": []}
        passthrough = [a for a in sys.argv[1:]]
        for _ in range(args.rounds):  # alternate, so drifting load on a shared box hits both sides
            for side in ("transformers", "recipe"):
                env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
                proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", side, "--workdir", workdir],
                                      capture_output=True, text=True, env=env)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
                results[side].append(json.loads(line[0][7:]))
    print(f"model: {params / 1e6:.1f}M parameters; batch {args.batch_size} x seq {args.seq_len}; {args.steps} steps "
          f"({WARMUP} warm-up excluded); torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; data={args.data}; recipe packs={args.data == 'instruct' and not args.no_pack}; compile={args.compile}, transformers loop fused AdamW={args.hf_fused}")
    print()
    print("| | tokens/s wall (best round) | tokens per CPU-second (best round) | each round (wall / CPU) "
          "| peak RSS MiB (max) | final loss |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for side, runs in results.items():
        # Best round: on a shared machine, slower rounds measure the neighbours, not the code.
        tps = max(r["tokens_per_second"] for r in runs)
        cps = max(r["tokens_per_cpu_second"] for r in runs)
        rss = max(r["peak_rss_mib"] for r in runs)
        summary[side] = (tps, cps, rss)
        each = "; ".join(f"{r['tokens_per_second']:.0f} / {r['tokens_per_cpu_second']:.0f}" for r in runs)
        print(f"| {side} | {tps:.0f} | {cps:.0f} | {each} | {rss:.0f} | {runs[-1]['final_loss']:.4f} |")
    print()
    print(f"recipe / transformers: {summary['recipe'][0] / summary['transformers'][0]:.2f}x tokens/s wall, "
          f"{summary['recipe'][1] / summary['transformers'][1]:.2f}x tokens per CPU-second, "
          f"{summary['recipe'][2] / summary['transformers'][2]:.2f}x peak RSS")


if __name__ == "__main__":
    main()
