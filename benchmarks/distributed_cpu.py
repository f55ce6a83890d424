"""full_finetune with 1 process vs 2 processes (FSDP2 over gloo) on the CPU: tokens/s and peak RSS per rank.

The same global batch either way (1 x batch_size 2B, or 2 x batch_size B), the recipe's own data
pipeline (text, packed), the built-in tiny model (~0.1M parameters) and a random ~47M-parameter Llama
(benchmarks/full_finetune_cpu.py's). tokens/s is the recipe's own figure (all ranks' tokens / step wall
time) averaged over the steps after WARMUP; peak RSS is each rank process's VmHWM, read from /proc
while it runs. Each process uses --threads torch threads.

    .venv/bin/python benchmarks/distributed_cpu.py [--steps 8] [--batch-size 2] [--seq-len 256] [--threads 1]

Prints a markdown table; benchmarks/distributed_cpu.md records a run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from full_finetune_cpu import make_workdir  # noqa: E402  (the ~47M model and its data)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processes import descendants  # noqa: E402  (every process below torchrun, read from /proc)

WARMUP = 2


def rank_peaks(launcher: subprocess.Popen, nproc: int, peaks: dict[int, int]) -> None:
    """Update {rank: peak RSS bytes}: the VmHWM of the one process, or of each torchrun worker (RANK set)."""
    for pid in [launcher.pid] if nproc == 1 else descendants(launcher.pid):
        try:
            environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                           if b"=" in item)
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, ValueError):
            continue
        if nproc > 1 and b"RANK" not in environ:
            continue  # torchrun's own processes
        rank = int(environ.get(b"RANK", b"0"))
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[rank] = max(peaks.get(rank, 0), int(line.split()[1]) * 1024)


def run(model: str, data: Path, out: Path, nproc: int, args) -> dict:
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    command = [
        sys.executable, "-m", "kubetune", "run", *launch, "full_finetune", "--config", "tiny_full",
        f"model.path={model}", f"dataset.source={data}", "dataset.format=text", "dataset.packed=true",
        "dataset.eval_fraction=0.0", f"output_dir={out}", f"batch_size={args.batch_size * 2 // nproc}",
        f"max_seq_len={args.seq_len}", f"max_steps={args.steps}", "save_every_steps=null", "eval_every_steps=null",
        "log_every_steps=1", "progress_bar=false", "device=cpu", "dtype=fp32", "resume=never",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    peaks: dict[int, int] = {}
    while process.poll() is None:
        rank_peaks(process, nproc, peaks)
        time.sleep(0.1)
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"run failed ({process.returncode}):\n{output[-3000:]}")
    from kubetune.trainer.training.metrics import read_metrics

    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r and r["step"] > WARMUP]
    return {"tokens_per_second": sum(r["tokens_per_second"] for r in steps) / len(steps),
            "peaks": [peaks.get(rank, 0) for rank in range(nproc)], "loss": steps[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="per rank with 2 processes (1 process: twice this)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_workdir(root)
        rows = []
        for label, model in (("tiny (0.1M)", "builtin://tiny"), ("~47M", str(model_dir))):
            for nproc in (1, 2):
                result = run(model, root / "text.jsonl", root / f"out-{len(rows)}", nproc, args)
                rows.append((label, nproc, result))
    print(f"| model | processes | global batch | tokens/s (all ranks) | peak RSS per rank (MiB) | final loss |")
    print("|---|---|---|---|---|---|")
    for label, nproc, result in rows:
        peaks = ", ".join(f"{p / 2**20:.0f}" for p in result["peaks"])
        print(f"| {label} | {nproc} | {args.batch_size * 2} x {args.seq_len} | {result['tokens_per_second']:.0f} "
              f"| {peaks} | {result['loss']:.4f} |")


if __name__ == "__main__":
    main()
