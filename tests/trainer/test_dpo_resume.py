"""Exact resume of the dpo recipe: a full-DPO run killed at a random step (SIGKILL) and a LoRA-DPO run
stopped by SIGTERM, each resumed with resume: auto, end with the same losses, rewards and weights as an
uninterrupted run (CPU, fp32, same seed; max abs difference <= 1e-6). The pattern of test_resume_kill.py."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from kubetune.trainer.training.metrics import read_metrics

TOTAL_STEPS = 10
OVERRIDES = [
    f"max_steps={TOTAL_STEPS}", "batch_size=4", "gradient_accumulation_steps=2", "save_every_steps=3",
    "eval_every_steps=4", "eval_max_batches=1", "log_every_steps=1", "keep_last_checkpoints=2", "max_seq_len=160",
    "progress_bar=false", "device=cpu", "dtype=fp32", "resume=auto",
]
WEIGHTS = {"tiny_dpo": "model/model.safetensors", "tiny_dpo_lora": "adapter/adapter_model.safetensors"}


def start(config, output_dir, termination_log=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if termination_log:
        env["KUBETUNE_TERMINATION_LOG"] = str(termination_log)
    command = [sys.executable, "-m", "kubetune", "run", "dpo", "--config", config, f"output_dir={output_dir}", *OVERRIDES]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def wait_for_step(output_dir, step, process, timeout=240):
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


def logged(output_dir):
    """Every number metrics.jsonl holds, by (step, key): losses, rewards, margins, accuracies, eval."""
    values = {}
    for record in read_metrics(output_dir / "metrics.jsonl"):
        for key, value in record.items():
            if key.startswith(("loss", "rewards/", "eval_")):
                values[(record["step"], key)] = value
    return values


def assert_same_run(config, output_dir, reference_dir):
    got, want = logged(output_dir), logged(reference_dir)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-6, (key, got[key], value)
    ours, theirs = load_file(output_dir / WEIGHTS[config]), load_file(reference_dir / WEIGHTS[config])
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}

    def get(config):
        if config not in runs:
            runs[config] = tmp_path_factory.mktemp(config)
            finish(start(config, runs[config]))
        return runs[config]

    return get


def test_full_dpo_killed_at_a_random_step_then_resumed_matches_the_uninterrupted_run(tmp_path, uninterrupted):
    reference = uninterrupted("tiny_dpo")
    seed = random.randrange(2**16)
    kill_after = random.Random(seed).randint(2, TOTAL_STEPS - 3)
    print(f"kill after step {kill_after} (seed {seed})")
    process = start("tiny_dpo", tmp_path)
    wait_for_step(tmp_path, kill_after, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "model").exists()  # it really was cut short

    finish(start("tiny_dpo", tmp_path))
    assert_same_run("tiny_dpo", tmp_path, reference)


def test_lora_dpo_sigterm_checkpoints_exits_143_and_resumes_exactly(tmp_path, uninterrupted):
    reference = uninterrupted("tiny_dpo_lora")
    log = tmp_path / "termination-log"
    process = start("tiny_dpo_lora", tmp_path, termination_log=log)
    wait_for_step(tmp_path, 4, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 143
    summary = json.loads(log.read_text())
    last_step = max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl"))
    assert summary["steps"] == last_step < TOTAL_STEPS
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / f"step_{last_step}")

    finish(start("tiny_dpo_lora", tmp_path, termination_log=log))
    assert json.loads(log.read_text())["steps"] == TOTAL_STEPS
    assert_same_run("tiny_dpo_lora", tmp_path, reference)
