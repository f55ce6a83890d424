"""What checkpoint integrity costs: how fast `write_checksums` (at every save) and
`verify_checkpoint` (at every resume, on the newest checkpoint) get through a real checkpoint, and
whether the sha256 or the disk is the limit.

A real checkpoint of about --gb GB is written by `CheckpointManager.save`, the writer the recipes
use: `model.safetensors` (the weights, fp32) and `distcp/` (torch.distributed.checkpoint: the
weights again and AdamW's two moments, after one optimizer step), `training_state.pt`, then
`checksums.json`. Model: --layers bias-free Linear(--width, --width) layers; 16 bytes per parameter
in all. It goes into a temporary folder on local disk (--dir, default the system temp folder) and
is deleted at the end.

Measured, in GB/s of checkpoint bytes, best of --repeats (on a shared machine other work only adds
time), the hashing cases with one hashing thread and with HASH_THREADS (the default, min(8,
cores)), all cases alternating so that load affects each alike:
- sha256 of one in-memory buffer: the ceiling of one hashing thread;
- read only, cold: every file's pages dropped from the page cache first (fsync, then
  posix_fadvise DONTNEED: no root needed), then read, not hashed: the disk's share;
- write_checksums, warm: the files just written are in the page cache, as at save;
- verify_checkpoint, cold (a restarted pod on another node) and warm;
- verify_checkpoint in 2 processes at once, cold: what resume cost under torchrun with 2 ranks
  before rank 0 alone verified (every rank ran plan_resume).

    .venv/bin/python benchmarks/checkpoint_verify.py              # ~1.2 GB, a markdown table
    .venv/bin/python benchmarks/checkpoint_verify.py --gb 2 --json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kubetune.trainer.training import checkpointing
from kubetune.trainer.training.checkpointing import (
    CheckpointManager,
    sharded_training_state,
    verify_checkpoint,
    write_checksums,
)


def make_checkpoint(root: Path, layers: int, width: int) -> tuple[Path, float]:
    """One real checkpoint (step 1) of a model of `layers` Linear(width, width), after one AdamW
    step; and the seconds CheckpointManager.save took (writing, fsync, checksums, rename)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()

    def write_model(folder: Path) -> None:
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))

    state = sharded_training_state(model, optimizer)
    started = time.perf_counter()
    folder = CheckpointManager(root).save(1, write_model, {"step": 1}, sharded_state=state)
    return folder, time.perf_counter() - started


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def drop_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache (clean pages only, hence the fsync first)."""
    for path in files_of(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(folder: Path) -> None:
    for path in files_of(folder):
        with open(path, "rb") as handle:
            while handle.read(1 << 22):
                pass


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def sha256_memory_gbps(size: int = 1 << 28) -> float:
    data = os.urandom(1 << 20) * (size >> 20)
    return size / 1e9 / timed(lambda: hashlib.sha256(data).hexdigest())


def verify(folder: Path) -> None:
    problem = verify_checkpoint(folder)
    assert problem is None, problem


def verify_in_processes(folder: Path, processes: int) -> None:
    """`processes` processes verifying the same checkpoint at once: what resume did under torchrun
    before rank 0 alone decided (every rank ran plan_resume, so every rank hashed the checkpoint)."""
    import multiprocessing

    workers = [multiprocessing.get_context("fork").Process(target=verify, args=(folder,)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="kubetune-ckpt-bench-", dir=args.dir))
    default = checkpointing.HASH_THREADS
    try:
        folder, save_seconds = make_checkpoint(root, args.layers, args.width)
        sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in files_of(folder)}
        total = sum(sizes.values())
        # (case, cache cold?, hashing threads, what runs); the cases alternate, so load hits all alike.
        cases = [("read only, no hashing", True, 1, read_all)]
        for name, cold, fn in [("write_checksums", False, write_checksums), ("verify_checkpoint", True, verify),
                               ("verify_checkpoint", False, verify)]:
            cases += [(name, cold, 1, fn), (name, cold, default, fn)]
        cases.append(("verify_checkpoint in 2 processes at once (resume under torchrun before: every rank)", True, default,
                      lambda folder: verify_in_processes(folder, 2)))
        best: dict[tuple[str, bool, int], float] = {}
        for _ in range(args.repeats):
            for name, cold, threads, fn in cases:
                if cold:
                    drop_cache(folder)
                else:
                    read_all(folder)  # warm: every page in memory, as right after a save
                checkpointing.HASH_THREADS = threads
                try:
                    seconds = timed(fn, folder)
                finally:
                    checkpointing.HASH_THREADS = default
                key = (name, cold, threads)
                best[key] = min(best.get(key, float("inf")), seconds)
        return {
            "bytes": total, "files": {k: v for k, v in sizes.items() if v > 1 << 20}, "save_seconds": save_seconds,
            "sha256_memory_gbps": max(sha256_memory_gbps() for _ in range(3)),
            "cases": [{"case": name, "cache": "cold" if cold else "warm", "threads": threads, "seconds": seconds,
                       "gbps": total / 1e9 / seconds} for (name, cold, threads), seconds in best.items()],
        }
    finally:
        checkpointing.HASH_THREADS = default
        shutil.rmtree(root, ignore_errors=True)


def table(result: dict) -> str:
    lines = [f"checkpoint: {result['bytes'] / 1e9:.2f} GB written by CheckpointManager.save in {result['save_seconds']:.1f} s "
             f"(checksums included); files over 1 MiB: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in result["files"].items()),
             f"sha256 of an in-memory buffer, one thread: {result['sha256_memory_gbps']:.2f} GB/s", "",
             "| case | page cache | hashing threads | seconds | GB/s |", "|---|---|---:|---:|---:|"]
    for row in result["cases"]:
        lines.append(f"| {row['case']} | {row['cache']} | {row['threads']} | {row['seconds']:.2f} | {row['gbps']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=3072, help="8 x 3072^2 params x 16 bytes = 1.2 GB")
    parser.add_argument("--gb", type=float, default=None, help="size wanted instead of --layers (GB)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (a local disk)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.gb:
        args.layers = max(1, round(args.gb * 1e9 / (16 * args.width * args.width)))
    result = run(args)
    print(json.dumps(result, indent=1) if args.json else table(result))


if __name__ == "__main__":
    sys.exit(main())
