"""The dpo recipe under torchrun on the CPU (2 gloo processes, FSDP2), proved as test_distributed.py
proves full_finetune and lora_finetune:

- 2 processes with batch_size 2 and 1 process with batch_size 4 (the same global batch of pairs,
  2 micro-batches a step) give the same per-step losses, rewards, held-out metrics and final
  weights (fp32, max abs diff <= 1e-5), for full DPO (its frozen reference sharded too) and for
  LoRA-DPO (the reference = the sharded base with its adapters off);
- a 2-process full-DPO run SIGKILLed after its step-2 checkpoint and resumed with 2 processes
  ends as the 1-process run (1e-5) and, slow, exactly as an uninterrupted 2-process run (1e-6);
  resumed with 1 process instead (resume: auto), it ends as the 1-process run too (1e-5);
- QLoRA-DPO (NF4 base): 2 processes = 1 process quantized with the same NF4 groups (1e-5), and the
  2-process checkpoint resumed with 1 process keeps that NF4 base and continues as that run;
- slow: a checkpoint resumed at the other world size continues as the uninterrupted run there
  (LoRA-DPO 2 -> 1 and 1 -> 2, full DPO 1 -> 2); a QLoRA-DPO checkpoint whose NF4 groups cannot
  split over 2 ranks is refused at 2 naming the fix; the 2 = 1 parity for loss: ipo and loss: simpo.
To keep CI short the fast tests launch 8 runs and one in this process: full DPO at 1 process, at 2
(killed, resumed with 2 and with 1), LoRA-DPO at 1 and at 2, QLoRA-DPO at 2, at 1 (in this process)
and resumed at 1.
"""
from __future__ import annotations

import shutil
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


def train(config: str, output_dir: Path, nproc: int, *overrides: str) -> str:
    process = start(config, output_dir, nproc, *overrides)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-4000:]
    return out


def logged(output_dir: Path) -> dict[tuple[int, str], float]:
    """Every loss, reward, margin, accuracy and gradient norm of metrics.jsonl, train and eval, by
    (step, key). The gradient norm is what catches a wrong normalisation (e.g. by the pairs of one rank
    instead of the global step): AdamW's update is nearly blind to a constant factor on the gradient."""
    return {(r["step"], key): value for r in read_metrics(output_dir / "metrics.jsonl")
            for key, value in r.items() if key.startswith(("loss", "rewards/", "eval_", "grad_norm"))}


def assert_same_run(got_dir: Path, want_dir: Path, weights: str, tolerance: float = TOL, after_step: int = -1) -> None:
    """Every logged number (of the steps after `after_step`: a run resumed into another folder logs
    only those) and the final weights agree within `tolerance`."""
    got, want = ({k: v for k, v in logged(folder).items() if k[0] > after_step} for folder in (got_dir, want_dir))
    assert sorted(got) == sorted(want) and len(want) > 15
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= tolerance, (worst, got, want)
    ours, theirs = load_file(got_dir / weights), load_file(want_dir / weights)
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= tolerance


def kill_after_step_2_and_resume(config: str, output_dir: Path, copy_to: Path) -> None:
    """`copy_to`: a copy of the killed run's folder, to resume at another world size."""
    process = start(config, output_dir, 2)
    wait_for(lambda: 2 in checkpoint_steps(output_dir), process, what="the step-2 checkpoint")
    kill_run(process)  # SIGKILL of the launcher and both ranks
    assert not (output_dir / "model").exists()  # it really was cut short
    shutil.copytree(output_dir, copy_to)
    train(config, output_dir, 2)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Full DPO with 1 process, and with 2 killed after the step-2 checkpoint and resumed."""
    root = tmp_path_factory.mktemp("dpo_full")
    train("tiny_dpo", root / "nproc1", 1)
    kill_after_step_2_and_resume("tiny_dpo", root / "nproc2", copy_to=root / "killed_at_2")
    return {**{nproc: root / f"nproc{nproc}" for nproc in (1, 2)}, "killed_at_2": root / "killed_at_2"}


def test_full_dpo_two_processes_killed_and_resumed_match_one(full_runs):
    assert_same_run(full_runs[2], full_runs[1], "model/model.safetensors")
    # the policy moved away from the reference (else equal losses would prove little)
    assert logged(full_runs[2])[(STEPS, "loss")] != pytest.approx(0.6931471805599453, abs=1e-3)
    shards = list((full_runs[2] / "checkpoints" / "step_4" / SHARDED_STATE).glob("*.distcp"))
    assert len(shards) == 2  # one per rank


def test_full_dpo_killed_with_two_processes_resumes_with_one_as_the_one_process_run(full_runs):
    """resume: auto in the killed run's folder, now with 1 process (batch_size 4 = 2 x 2: the same
    global batch): it continues from the step-2 checkpoint (distcp/ resharded from 2 ranks to 1, the data
    position counted in global batches) and ends as the uninterrupted 1-process run."""
    out = train("tiny_dpo", full_runs["killed_at_2"], 1)
    assert "resuming run" in out and "step_2" in out
    assert "the checkpoint was taken with 2 process(es) x batch_size 2, this run has 1 x 4: the same global batch" in out
    assert_same_run(full_runs["killed_at_2"], full_runs[1], "model/model.safetensors")


def test_resume_with_another_global_batch_is_refused_saying_which_batch_size_continues_it(full_runs):
    """The same batch_size with 1 process instead of 2 halves the global batch: refused before any
    work (exit 2), naming the global batches and the batch_size that keeps it; the run is untouched."""
    before = sorted(p.name for p in (full_runs[2] / "checkpoints").iterdir())
    process = start("tiny_dpo", full_runs[2], 1, "batch_size=2")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 2, out[-3000:]
    assert "batch_size: 4 -> 2" in out
    assert "batch_size is compared as the global batch (batch_size x processes): the run has 4, this config 2 " in out
    assert "set batch_size: 4 to continue it with 1 process(es)" in out
    assert sorted(p.name for p in (full_runs[2] / "checkpoints").iterdir()) == before


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """LoRA-DPO with 1 process and with 2, a checkpoint every 2 steps."""
    root = tmp_path_factory.mktemp("dpo_lora")
    for nproc in (1, 2):
        train("tiny_dpo_lora", root / f"nproc{nproc}", nproc, "save_merged=false")
    return {nproc: root / f"nproc{nproc}" for nproc in (1, 2)}


def test_lora_dpo_two_processes_match_one(lora_runs):
    assert_same_run(lora_runs[2], lora_runs[1], "adapter/adapter_model.safetensors")


@pytest.mark.slow
def test_dpo_checkpoints_resume_at_the_other_world_size(tmp_path, lora_runs, full_runs):
    """LoRA-DPO 2 -> 1 and 1 -> 2, full DPO 1 -> 2: the step-2 checkpoint of one world size resumed
    (resume: <checkpoint>) with the other continues as the uninterrupted run at the new world size."""
    adapter, model = "adapter/adapter_model.safetensors", "model/model.safetensors"
    for config, runs, weights, old, new in [("tiny_dpo_lora", lora_runs, adapter, 2, 1),
                                            ("tiny_dpo_lora", lora_runs, adapter, 1, 2),
                                            ("tiny_dpo", full_runs, model, 1, 2)]:
        resumed = tmp_path / f"{config}_{old}_to_{new}"
        extra = ["save_merged=false"] if config == "tiny_dpo_lora" else []
        train(config, resumed, new, *extra, f"resume={runs[old] / 'checkpoints' / 'step_2'}")
        assert_same_run(resumed, runs[new], weights, after_step=2)


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

    adapter = "adapter/adapter_model.safetensors"
    extra = ["model.quantize_base=nf4", "save_merged=false", "optimizer.lr=1e-3"]
    train("tiny_dpo_lora", tmp_path / "nproc2", 2, *extra)
    quantize = quant.quantize_base
    with monkeypatch.context() as patch:
        patch.setattr(quant, "quantize_base",
                      lambda model, shards=1, world_size=1: quantize(model, shards=2, world_size=world_size))
        recipe_main(resolve_config("dpo", "tiny_dpo_lora", run_overrides(tmp_path / "nproc1", 1, *extra)))
    assert_same_run(tmp_path / "nproc2", tmp_path / "nproc1", adapter)
    # the policy moved away from its reference (else equal losses would prove little)
    assert logged(tmp_path / "nproc2")[(STEPS, "loss")] != pytest.approx(0.6931471805599453, abs=1e-3)

    # The 2-process step-2 checkpoint resumed with 1 process (no patch): it keeps the NF4 layout its
    # run started with (nf4_shards in the checkpoint), so it trains on the same base and continues as
    # the 1-process run with those groups. (Quantized again for 1 process, its losses differed by 3e-5.)
    resumed = tmp_path / "resumed_at_1"
    train("tiny_dpo_lora", resumed, 1, *extra, f"resume={tmp_path / 'nproc2' / 'checkpoints' / 'step_2'}")
    assert_same_run(resumed, tmp_path / "nproc1", adapter, after_step=2)


@pytest.mark.slow
def test_qlora_dpo_checkpoint_of_one_process_is_refused_at_two_naming_the_fix(tmp_path):
    """The tiny model's NF4 base quantized for 1 process has 1 double-quantization group per weight,
    which cannot split over 2 ranks: resuming at 2 is refused before training, naming the weight and
    the world sizes that work, and the checkpoint is left as it was."""
    extra = ["model.quantize_base=nf4", "save_merged=false", "max_steps=2"]
    train("tiny_dpo_lora", tmp_path / "run", 1, *extra)
    process = start("tiny_dpo_lora", tmp_path / "resumed", 2, *extra,
                    f"resume={tmp_path / 'run' / 'checkpoints' / 'step_2'}")
    out, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "error: model.quantize_base: this run's NF4 base was quantized for 1 process(es)" in out, out[-3000:]
    assert "cannot be split evenly over 2 processes" in out and "Resume this run with 1 process(es)" in out
    assert not list((tmp_path / "resumed").glob("checkpoints/step_*"))
