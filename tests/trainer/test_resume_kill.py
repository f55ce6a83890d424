"""Exact resume: a run killed at a random moment (SIGKILL) or stopped by SIGTERM, then resumed
with resume: auto, ends with the same weights and loss curve as an uninterrupted run
(CPU, fp32, same seed; max abs weight difference <= 1e-6)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from kubetune.trainer.training.metrics import read_metrics

pytest.importorskip("kubetune.trainer.tokenizers")

TOTAL_STEPS = 12
# Packed sequences and gradient accumulation, so the resumed state covers both.
OVERRIDES = [
    f"max_steps={TOTAL_STEPS}", "batch_size=2", "gradient_accumulation_steps=2", "save_every_steps=3",
    "eval_every_steps=4", "eval_max_batches=2", "log_every_steps=1", "keep_last_checkpoints=2",
    "dataset.packed=true", "max_seq_len=160", "progress_bar=false", "device=cpu", "dtype=fp32", "resume=auto",
]


def start(output_dir, termination_log=None):
    # One thread: the CI box is small and shared (one busy thread beats two waiting ones).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if termination_log:
        env["KUBETUNE_TERMINATION_LOG"] = str(termination_log)
    command = [sys.executable, "-m", "kubetune", "run", "full_finetune", "--config", "tiny_full",
               f"output_dir={output_dir}", *OVERRIDES]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return process.returncode


def wait_for_step(output_dir, step, process, timeout=240):
    """Block until metrics.jsonl shows `step` (the run is then somewhere past it)."""
    deadline = time.monotonic() + timeout
    path = output_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if path.exists():
            try:
                if any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(path)):
                    return
            except ValueError:  # a line being written
                pass
        time.sleep(0.01)
    raise AssertionError(f"no step {step} within {timeout}s")


def losses(output_dir):
    return {(r["step"], "eval" if "eval_loss" in r else "train"): r.get("loss", r.get("eval_loss"))
            for r in read_metrics(output_dir / "metrics.jsonl")}


def assert_same_run(output_dir, reference_dir):
    got, want = losses(output_dir), losses(reference_dir)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-6, (key, got[key], value)
    ours = load_file(output_dir / "model" / "model.safetensors")
    theirs = load_file(reference_dir / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("reference")
    finish(start(output_dir))
    return output_dir


def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(tmp_path, reference):
    seed = random.randrange(2**16)
    kill_after = random.Random(seed).randint(2, TOTAL_STEPS - 3)
    print(f"kill after step {kill_after} (seed {seed})")
    process = start(tmp_path)
    wait_for_step(tmp_path, kill_after, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "model").exists()  # it really was cut short

    finish(start(tmp_path))
    assert_same_run(tmp_path, reference)


def test_sigterm_checkpoints_and_exits_143_then_resume_matches(tmp_path, reference):
    log = tmp_path / "termination-log"
    process = start(tmp_path, termination_log=log)
    wait_for_step(tmp_path, 4, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 143
    import json

    summary = json.loads(log.read_text())
    last_step = max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl"))
    assert summary["steps"] == last_step < TOTAL_STEPS
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / f"step_{last_step}")
    assert (tmp_path / "checkpoints" / f"step_{last_step}" / "training_state.pt").is_file()

    finish(start(tmp_path, termination_log=log))
    assert json.loads(log.read_text())["steps"] == TOTAL_STEPS
    assert_same_run(tmp_path, reference)
