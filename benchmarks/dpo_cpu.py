"""DPO training speed and memory: kubetune's `dpo` recipe against TRL's DPOTrainer (+ peft for LoRA).

Same model folder (a Llama-shaped model with random weights, float32, saved once), same tokenizer
(builtin://tiny's), same preference pairs (prompt + chosen + rejected strings of varied lengths),
same settings: batch of PAIRS pairs, AdamW at lr 1e-6, beta 0.1, sigmoid DPO, no gradient
accumulation, no evaluation, no checkpoints. Full DPO: a frozen reference copy in both.
LoRA-DPO: rank 16 / alpha 32 on all 7 projections, the reference is the base with adapters off.

Each case runs in its own subprocess (peak RSS is per process; TRL's imports of datasets and
accelerate are part of what it costs). tokens/s = real (non-padding) tokens of the chosen and
rejected rows per second of training step, over the steps after WARMUP, both timed the same way
(the wall time of whole optimizer steps). Cases alternate, REPEATS times; the best of each is kept
(on a shared machine other work only adds time).

    .venv/bin/python benchmarks/dpo_cpu.py                 # all four cases, a markdown table
    .venv/bin/python benchmarks/dpo_cpu.py --case kubetune-lora --json   # one child run
    .venv/bin/python benchmarks/dpo_cpu.py --only lora --threads 1       # the LoRA pair, one thread each
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

CONFIG = dict(
    vocab_size=8192, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAIRS, WARMUP, TIMED, MAX_LEN, RECORDS = 4, 1, 6, 256, 32
CASES = ["kubetune-full", "trl-full", "kubetune-lora", "trl-lora"]
WORDS = ("the cat sat on a mat while rain fell over quiet hills and rivers ran past old stone walls "
         "near farms where people worked long days under a wide grey sky").split()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_inputs(root: Path) -> tuple[Path, Path]:
    """The model folder (random weights, builtin://tiny's tokenizer) and the pairs file, made once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune.trainer.builtin import resolve_model_path

    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(model_dir)
        tokenizer_dir = resolve_model_path("builtin://tiny")
        for name in os.listdir(tokenizer_dir):
            if name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (model_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    rng = random.Random(0)
    text = lambda low, high: " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))  # noqa: E731
    data = root / "pairs.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": text(20, 60) + "?", "chosen": text(5, 40), "rejected": text(5, 40)}) + "\n"
        for _ in range(RECORDS)))
    return model_dir, data


def run_kubetune(case: str, model_dir: Path, data: Path, out: Path) -> dict:
    import torch

    from kubetune.trainer.config import resolve_config
    from kubetune.trainer.recipes.dpo import recipe_main
    from kubetune.trainer.training.metrics import read_metrics

    overrides = [
        f"model.path={model_dir}", f"dataset.source={data}", "dataset.eval_fraction=0", "dataset.shuffle=false",
        f"output_dir={out}", f"max_steps={WARMUP + TIMED}", f"batch_size={PAIRS}", f"max_seq_len={MAX_LEN}",
        "optimizer.lr=1e-6", "lr_scheduler.name=constant", "beta=0.1", "save_every_steps=null", "eval_every_steps=null",
        "progress_bar=false", "resume=never", "log_every_steps=1", "device=cpu", "dtype=fp32",
    ]
    if case == "kubetune-lora":
        overrides += ["lora.rank=16", "lora.alpha=32", "lora.dropout=0.0", f"lora.target_modules=[{','.join(TARGETS)}]"]
    recipe_main(resolve_config("dpo", "tiny_dpo", overrides))
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r and r["step"] > WARMUP]
    seconds = sum(r["tokens"] / r["tokens_per_second"] for r in steps)
    return {"tokens": sum(r["tokens"] for r in steps), "seconds": seconds, "threads": torch.get_num_threads()}


def run_trl(case: str, model_dir: Path, data: Path, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.trainer, self.started, self.tokens, self.seconds, self.before = None, 0.0, 0, 0.0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started, self.before = time.perf_counter(), self.trainer._total_train_tokens

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > WARMUP:
                self.seconds += time.perf_counter() - self.started
                self.tokens += self.trainer._total_train_tokens - self.before

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if case == "trl-lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    args = DPOConfig(
        output_dir=str(out), max_steps=WARMUP + TIMED, per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1,
        learning_rate=1e-6, lr_scheduler_type="constant", beta=0.1, loss_type=["sigmoid"], max_length=MAX_LEN,
        save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1, use_cpu=True, bf16=False,
        dataloader_num_workers=0, seed=0, disable_tqdm=True, max_grad_norm=1.0,
    )
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(data), split="train"),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    timer.trainer = trainer
    trainer.train()
    return {"tokens": timer.tokens, "seconds": timer.seconds, "threads": torch.get_num_threads()}


def child(case: str, root: Path) -> dict:
    model_dir, data = make_inputs(root)
    with tempfile.TemporaryDirectory() as out:
        runner = run_trl if case.startswith("trl") else run_kubetune
        result = runner(case, model_dir, data, Path(out))
    return {"case": case, **result, "tokens_per_second": result["tokens"] / result["seconds"], "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=["full", "lora"], help="run only this pair of cases")
    parser.add_argument("--threads", type=int, help="torch threads per case (default: torch's, the cores)")
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "kubetune-dpo-bench"))
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.case:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(child(args.case, root)))
        return
    make_inputs(root)  # once, before any timing
    cases = [case for case in CASES if args.only is None or case.endswith(args.only)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for case in cases:
            done = subprocess.run([sys.executable, __file__, "--case", case, "--root", str(root), *threads],
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(result), file=sys.stderr)
            if case not in best or result["tokens_per_second"] > best[case]["tokens_per_second"]:
                best[case] = result
    print("| case | tokens/s | peak RSS (MiB) |\n|---|---:|---:|")
    for case in cases:
        print(f"| {case} | {best[case]['tokens_per_second']:.0f} | {best[case]['peak_rss_mib']:.0f} |")
    for kind in [args.only] if args.only else ["full", "lora"]:
        ours, theirs = best[f"kubetune-{kind}"], best[f"trl-{kind}"]
        print(f"{kind}: {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x tokens/s, "
              f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
