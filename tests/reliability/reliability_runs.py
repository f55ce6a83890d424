"""Real training runs for the fault tests: start one as the CLI does (a subprocess), interrupt it,
damage it, resume it, and compare it with the uninterrupted run (losses, rewards and weights,
CPU fp32, max abs difference <= TOL). The pattern of tests/trainer/test_resume_kill.py, for
every recipe: full, LoRA, full DPO, LoRA DPO, and full fine-tuning with 2 processes."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from safetensors.torch import load_file
from processes import kill_run

from kubetune.trainer.training.checkpointing import CheckpointManager
from kubetune.trainer.training.metrics import read_metrics

TOL = 1e-6
TOL_DISTRIBUTED = 1e-5  # two processes sum their gradients in another order


@dataclass(frozen=True)
class Recipe:
    recipe: str
    config: str
    weights: str  # the trained file compared at the end
    steps: int
    overrides: tuple[str, ...]
    nproc: int = 1

    @property
    def tol(self) -> float:
        return TOL_DISTRIBUTED if self.nproc > 1 else TOL


_COMMON = ("gradient_accumulation_steps=2", "save_every_steps=3", "log_every_steps=1", "keep_last_checkpoints=2",
           "progress_bar=false", "device=cpu", "dtype=fp32", "resume=auto", "max_seq_len=160")
RECIPES = {
    "full": Recipe("full_finetune", "tiny_full", "model/model.safetensors", 12,
                   ("max_steps=12", "batch_size=2", "eval_every_steps=4", "eval_max_batches=2", "dataset.packed=true", *_COMMON)),
    "lora": Recipe("lora_finetune", "tiny_lora", "adapter/adapter_model.safetensors", 12,
                   ("max_steps=12", "batch_size=2", "eval_every_steps=4", "eval_max_batches=2", "save_merged=false", *_COMMON)),
    "dpo": Recipe("dpo", "tiny_dpo", "model/model.safetensors", 10,
                  ("max_steps=10", "batch_size=4", "eval_every_steps=4", "eval_max_batches=1", *_COMMON)),
    "dpo_lora": Recipe("dpo", "tiny_dpo_lora", "adapter/adapter_model.safetensors", 10,
                       ("max_steps=10", "batch_size=4", "eval_every_steps=4", "eval_max_batches=1", *_COMMON)),
    "full_2proc": Recipe("full_finetune", "tiny_full", "model/model.safetensors", 12,
                         ("max_steps=12", "batch_size=1", "eval_every_steps=4", "eval_max_batches=2", "dataset.packed=true",
                          "distributed.timeout_seconds=60", *_COMMON), nproc=2),
}


def command(recipe: Recipe, output_dir: Path, *extra: str) -> list[str]:
    launch = ["--nproc-per-node", str(recipe.nproc)] if recipe.nproc > 1 else []
    return [sys.executable, "-m", "kubetune", "run", *launch, recipe.recipe, "--config", recipe.config,
            f"output_dir={output_dir}", *recipe.overrides, *extra]


def start(recipe: Recipe, output_dir: Path, *extra: str, termination_log: Optional[Path] = None,
          preexec_fn: Optional[Callable[[], None]] = None, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    # One thread per process: the CI box is small and shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if termination_log:
        env["KUBETUNE_TERMINATION_LOG"] = str(termination_log)
    return subprocess.Popen(command(recipe, output_dir, *extra), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec_fn)


def finish(process: subprocess.Popen, timeout: float = 400) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-4000:]
    return out, err


def train(recipe: Recipe, output_dir: Path, *extra: str) -> tuple[str, str]:
    return finish(start(recipe, output_dir, *extra))


def wait_until(predicate: Callable[[], bool], process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.stderr.read()[-3000:]}")
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout}s: {what}")


def logged_step(output_dir: Path) -> int:
    """The last training step metrics.jsonl shows (0: none yet)."""
    path = output_dir / "metrics.jsonl"
    try:
        return max((r["step"] for r in read_metrics(path) if "loss" in r), default=0) if path.exists() else 0
    except ValueError:  # a line being written
        return 0


def checkpoint_steps(output_dir: Path) -> list[int]:
    return [step for step, _ in CheckpointManager(output_dir).complete_checkpoints()]


def kill_step(seed: int, recipe: Recipe) -> int:
    """The step after which trial `seed` kills the run (seeded: a failing trial is rerun exactly)."""
    return random.Random(seed).randint(1, recipe.steps - 2)


def logged(output_dir: Path) -> dict[tuple[int, str], float]:
    """Every number metrics.jsonl holds, by (step, key): losses, rewards, margins, accuracies, eval."""
    values = {}
    for record in read_metrics(output_dir / "metrics.jsonl"):
        for key, value in record.items():
            if key.startswith(("loss", "rewards/", "eval_")):
                values[(record["step"], key)] = value
    return values


def assert_same_run(recipe: Recipe, output_dir: Path, reference_dir: Path) -> None:
    got, want = logged(output_dir), logged(reference_dir)
    assert sorted(got) == sorted(want)
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= recipe.tol, (worst, [(k, got[k], want[k]) for k in want if abs(got[k] - want[k]) > recipe.tol][:5])
    ours, theirs = load_file(output_dir / recipe.weights), load_file(reference_dir / recipe.weights)
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst <= recipe.tol, worst
