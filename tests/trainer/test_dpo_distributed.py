"""The dpo recipe under torchrun on the CPU (2 gloo processes, FSDP2), proved as test_distributed.py
proves full_finetune and lora_finetune:

- 2 processes with batch_size 2 and 1 process with batch_size 4 (the same global batch of pairs,
  2 micro-batches a step) give the same per-step losses, rewards, held-out metrics and final
  weights (fp32, max abs diff <= 1e-5), for full DPO (its frozen reference sharded too) and for
  LoRA-DPO (the reference = the sharded base with its adapters off);
- a 2-process full-DPO run SIGKILLed after its step-2 checkpoint and resumed with 2 processes
  ends as the 1-process run (1e-5) and, slow, exactly as an uninterrupted 2-process run (1e-6);
- QLoRA-DPO (NF4 base): 2 processes = 1 process quantized with the same NF4 groups (1e-5);
- slow: the same parity for loss: ipo and loss: simpo (no reference).
To keep CI short the fast tests launch 6 runs and one in this process: full DPO at 1 process and at 2
(killed, resumed), LoRA-DPO at 1 and at 2, QLoRA-DPO at 2 and (in this process) at 1.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kubetune.trainer.training.checkpointing import SHARDED_STATE
from kubetune.trainer.training.metrics import read_metrics
from test_distributed import checkpoint_steps, env, kill_run, wait_for

TOL = 1e-5
STEPS = 4
COMMON = [
    f"max_steps={STEPS}", "gradient_accumulation_steps=2", "max_seq_len=160", "eval_every_steps=2",
    "eval_max_batches=1", "log_every_steps=1", "progress_bar=false", "device=cpu", "dtype=fp32",
    "lr_scheduler.warmup_steps=1", "distributed.timeout_seconds=60", "save_every_steps=2", "keep_last_checkpoints=3",
]


def run_overrides(output_dir: Path, nproc: int, *overrides: str) -> list[str]:
    """The key=value overrides of a test run (also for a run in this process: recipe_main)."""
    return [f"output_dir={output_dir}", f"batch_size={4 // nproc}", *COMMON, *overrides]  # 2 x 2 pairs = 1 x 4 pairs


def start(config: str, output_dir: Path, nproc: int, *overrides: str) -> subprocess.Popen:
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    command = [sys.executable, "-m", "kubetune", "run", *launch, "dpo", "--config", config,
               *run_overrides(output_dir, nproc, *overrides)]
    return subprocess.Popen(command, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def train(config: str, output_dir: Path, nproc: int, *overrides: str) -> None:
    process = start(config, output_dir, nproc, *overrides)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-4000:]


def logged(output_dir: Path) -> dict[tuple[int, str], float]:
    """Every loss, reward, margin, accuracy and gradient norm of metrics.jsonl, train and eval, by
    (step, key). The gradient norm is what catches a wrong normalisation (e.g. by the pairs of one rank
    instead of the global step): AdamW's update is nearly blind to a constant factor on the gradient."""
    return {(r["step"], key): value for r in read_metrics(output_dir / "metrics.jsonl")
            for key, value in r.items() if key.startswith(("loss", "rewards/", "eval_", "grad_norm"))}


def assert_same_run(got_dir: Path, want_dir: Path, weights: str, tolerance: float = TOL) -> None:
    got, want = logged(got_dir), logged(want_dir)
    assert sorted(got) == sorted(want) and len(want) > 20
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= tolerance, (worst, got, want)
    ours, theirs = load_file(got_dir / weights), load_file(want_dir / weights)
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= tolerance


def kill_after_step_2_and_resume(config: str, output_dir: Path) -> None:
    process = start(config, output_dir, 2)
    wait_for(lambda: 2 in checkpoint_steps(output_dir), process, what="the step-2 checkpoint")
    kill_run(process)  # SIGKILL of the launcher and both ranks
    assert not (output_dir / "model").exists()  # it really was cut short
    train(config, output_dir, 2)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Full DPO with 1 process, and with 2 killed after the step-2 checkpoint and resumed."""
    root = tmp_path_factory.mktemp("dpo_full")
    train("tiny_dpo", root / "nproc1", 1)
    kill_after_step_2_and_resume("tiny_dpo", root / "nproc2")
    return {nproc: root / f"nproc{nproc}" for nproc in (1, 2)}


def test_full_dpo_two_processes_killed_and_resumed_match_one(full_runs):
    assert_same_run(full_runs[2], full_runs[1], "model/model.safetensors")
    # the policy moved away from the reference (else equal losses would prove little)
    assert logged(full_runs[2])[(STEPS, "loss")] != pytest.approx(0.6931471805599453, abs=1e-3)
    shards = list((full_runs[2] / "checkpoints" / "step_4" / SHARDED_STATE).glob("*.distcp"))
    assert len(shards) == 2  # one per rank


def test_lora_dpo_two_processes_match_one(tmp_path):
    for nproc in (1, 2):
        train("tiny_dpo_lora", tmp_path / f"nproc{nproc}", nproc, "save_merged=false", "save_every_steps=null")
    assert_same_run(tmp_path / "nproc2", tmp_path / "nproc1", "adapter/adapter_model.safetensors")


@pytest.mark.slow
def test_full_dpo_resumed_at_two_processes_is_exactly_the_uninterrupted_run(tmp_path, full_runs):
    train("tiny_dpo", tmp_path / "uninterrupted", 2)
    assert_same_run(full_runs[2], tmp_path / "uninterrupted", "model/model.safetensors", tolerance=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_ipo_and_simpo_two_processes_match_one(tmp_path, loss):
    # lr 1e-3, not the config's 1e-2: AdamW turns the rounding of the tiny first gradients of lora_B
    # (zero at the start) into weight differences of ~1e-5 at 1e-2 (losses still within 6e-8),
    # ~4e-7 at 1e-3. (A wrong pair count would show in grad_norm, compared too.)
    for nproc in (1, 2):
        train("tiny_dpo_lora", tmp_path / f"nproc{nproc}", nproc, f"loss={loss}", "save_merged=false",
              "save_every_steps=null", "optimizer.lr=1e-3")
    assert_same_run(tmp_path / "nproc2", tmp_path / "nproc1", "adapter/adapter_model.safetensors")


def test_qlora_dpo_two_processes_match_one_with_the_same_nf4_groups(tmp_path, monkeypatch):
    """QLoRA-DPO (NF4 base, the reference = that base with the adapters off) under FSDP2 on gloo. As
    in test_distributed.py's QLoRA test, the tiny model's NF4 double-quantization groups are halved
    with 2 ranks (so they split over them); the 1-process run quantizes with the same groups (in this
    process, quantize_base patched), and then losses, rewards, grad norms and adapters match (1e-5)."""
    import kubetune.trainer.quant as quant
    from kubetune.trainer.config import resolve_config
    from kubetune.trainer.recipes.dpo import recipe_main

    extra = ["model.quantize_base=nf4", "save_merged=false", "save_every_steps=null", "optimizer.lr=1e-3"]
    train("tiny_dpo_lora", tmp_path / "nproc2", 2, *extra)
    quantize = quant.quantize_base
    monkeypatch.setattr(quant, "quantize_base", lambda model, shards=1: quantize(model, shards=2))
    recipe_main(resolve_config("dpo", "tiny_dpo_lora", run_overrides(tmp_path / "nproc1", 1, *extra)))
    assert_same_run(tmp_path / "nproc2", tmp_path / "nproc1", "adapter/adapter_model.safetensors")
    # the policy moved away from its reference (else equal losses would prove little)
    assert logged(tmp_path / "nproc2")[(STEPS, "loss")] != pytest.approx(0.6931471805599453, abs=1e-3)
