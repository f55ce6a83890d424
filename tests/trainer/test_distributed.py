"""Distributed training on the CPU: 2 gloo processes under torchrun (`kubetune run --nproc-per-node 2`).

- 2 processes with batch_size 2 and 1 process with batch_size 4 (the same global batch) give the
  same per-step losses and final weights (fp32, max abs diff <= 1e-5), for full_finetune and
  lora_finetune; the 2-process model loads in transformers, its adapter in peft.
- FSDP2 leaves each rank about 1/world_size of every sharded parameter; the gathered full state
  dict equals the unsharded model; the clipped gradient norm is the norm of one process.
- SIGKILL of the whole run, then resume with 2 processes (exact) and with 1 (same continuation);
  and 1 -> 2. SIGKILL of one rank: the launcher exits non-zero, names the rank, and no
  half-written checkpoint becomes the newest.
- eval / generate refuse to run with WORLD_SIZE > 1.
- QLoRA: 2 processes = 1 quantized with the same NF4 groups; slow: the 2-process checkpoint resumed
  with 1 keeps that NF4 base and continues as that run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from processes import descendants, kill_run  # noqa: F401 (test_dpo_distributed imports kill_run from here)

from kubetune.trainer.training.checkpointing import SHARDED_STATE, TRAINING_STATE, CheckpointManager
from kubetune.trainer.training.metrics import read_metrics

TOL = 1e-5
STEPS = 6
HERE = Path(__file__).parent
# Short runs on the first epoch of the synthetic task; the eval batch is the same samples
# whatever the split across ranks (eval_max_batches=1: the first global batch of 4).
COMMON = [
    f"max_steps={STEPS}", "gradient_accumulation_steps=2", "max_seq_len=96", "eval_every_steps=3",
    "eval_max_batches=1", "log_every_steps=1", "progress_bar=false", "device=cpu", "dtype=fp32",
    "lr_scheduler.warmup_steps=2", "distributed.timeout_seconds=60",
]


def env() -> dict[str, str]:
    # One thread per process: 2 processes on a small shared box.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(recipe: str, config: str, output_dir: Path, nproc: int, *overrides: str) -> list[str]:
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    # 2 processes x batch_size 2 = 1 process x batch_size 4: the same global batch.
    batch = f"batch_size={4 // nproc}"
    return [sys.executable, "-m", "kubetune", "run", *launch, recipe, "--config", config,
            f"output_dir={output_dir}", batch, *COMMON, *overrides]


def start(recipe, config, output_dir, nproc, *overrides) -> subprocess.Popen:
    return subprocess.Popen(command(recipe, config, output_dir, nproc, *overrides), env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def train(recipe, config, output_dir, nproc, *overrides) -> str:
    return finish(start(recipe, config, output_dir, nproc, *overrides))


def train_losses(output_dir: Path) -> dict[tuple[int, str], float]:
    return {(r["step"], "eval" if "eval_loss" in r else "train"): r.get("loss", r.get("eval_loss"))
            for r in read_metrics(output_dir / "metrics.jsonl")}


def assert_same_losses(got_dir: Path, want_dir: Path) -> None:
    got, want = train_losses(got_dir), train_losses(want_dir)
    assert sorted(got) == sorted(want)
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= TOL, (worst, got, want)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= TOL, worst


def model_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model" / "model.safetensors")


def adapter_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before {what}: {process.stdout.read()[-3000:]}"
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


def checkpoint_steps(output_dir: Path) -> list[int]:
    return [step for step, _ in CheckpointManager(output_dir).complete_checkpoints()]


# ---------------------------------------------------------------------------------- full parity

@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """The same full fine-tuning run with 1 process and with 2 (checkpoints every 2 steps)."""
    root = tmp_path_factory.mktemp("full")
    outputs = {}
    for nproc in (1, 2):
        outputs[nproc] = root / f"nproc{nproc}"
        train("full_finetune", "tiny_full", outputs[nproc], nproc, "save_every_steps=2", "keep_last_checkpoints=3")
    return outputs


def test_full_finetune_two_processes_match_one(full_runs):
    assert_same_losses(full_runs[2], full_runs[1])
    assert_same_tensors(model_weights(full_runs[2]), model_weights(full_runs[1]))
    summary_steps = max(r["step"] for r in read_metrics(full_runs[2] / "metrics.jsonl"))
    assert summary_steps == STEPS


def test_full_finetune_model_from_two_processes_loads_in_transformers(full_runs):
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.checkpoint import load_pretrained

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(full_runs[2] / "model", dtype=torch.float32).eval()(ids).logits
        ours = load_pretrained(full_runs[2] / "model")(ids)
    assert (theirs - ours).abs().max().item() <= TOL


def test_distributed_checkpoints_hold_every_ranks_shards_and_are_complete(full_runs):
    steps = checkpoint_steps(full_runs[2])
    assert steps == [2, 4, 6]  # every 2 steps and at the end
    folder = full_runs[2] / "checkpoints" / "step_6"
    assert (folder / TRAINING_STATE).is_file() and (folder / "model.safetensors").is_file()
    shards = sorted(p.name for p in (folder / SHARDED_STATE).iterdir())
    assert ".metadata" in shards and len([s for s in shards if s.endswith(".distcp")]) == 2, shards  # one per rank
    assert (folder / "rng_rank_1.pt").is_file()
    assert not list((full_runs[2] / "checkpoints").glob("*.tmp-*"))
    # checksums.json, written by rank 0 last, covers every rank's shards and RNG state
    from kubetune.trainer.training.checkpointing import CHECKSUMS, verify_checkpoint

    listed = json.loads((folder / CHECKSUMS).read_text())["files"]
    assert {f"{SHARDED_STATE}/{s}" for s in shards} | {"rng_rank_1.pt", TRAINING_STATE} <= set(listed)
    assert verify_checkpoint(folder) is None
    # only rank 0 wrote metrics.jsonl: one line per step and eval, no duplicates
    records = read_metrics(full_runs[2] / "metrics.jsonl")
    keys = [(r["step"], "eval_loss" in r) for r in records]
    assert len(keys) == len(set(keys))


def test_fsdp2_shards_each_parameter_across_ranks(tmp_path):
    report_path = tmp_path / "report.json"
    worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
              str(HERE / "distributed_worker.py"), str(report_path)]
    out = subprocess.run(worker, env=env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(report_path.read_text())
    for name, info in report["shards"].items():
        assert info["sharded"], name
        assert sum(info["local"]) == info["full"], name  # the shards partition the parameter
        rows, per_row = info["shape"][0], info["full"] // info["shape"][0]
        assert max(info["local"]) == -(-rows // 2) * per_row, name  # dim 0 split in two: about half each
    assert report["gathered_equal"] is True
    norms = report["grad_norm"]
    assert abs(norms["sharded"] - norms["single"]) <= 1e-5 * max(1.0, norms["single"]), norms


# ---------------------------------------------------------------------------------- LoRA parity

def test_lora_finetune_two_processes_match_one_and_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.checkpoint import resolve_model_dir

    extra = ["save_every_steps=null", "save_merged=false", "lora.use_dora=true"]
    for nproc in (1, 2):
        train("lora_finetune", "tiny_lora", tmp_path / f"nproc{nproc}", nproc, *extra)
    assert_same_losses(tmp_path / "nproc2", tmp_path / "nproc1")
    assert_same_tensors(adapter_weights(tmp_path / "nproc2"), adapter_weights(tmp_path / "nproc1"))

    base_dir = resolve_model_dir("builtin://tiny")
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                           tmp_path / "nproc2" / "adapter")
    assert model.peft_config["default"].use_dora is True


# ---------------------------------------------------------------------------------- kill + resume

def test_sigkill_of_a_two_process_run_resumes_with_two_and_with_one(tmp_path, full_runs):
    killed = tmp_path / "killed"
    process = start("full_finetune", "tiny_full", killed, 2, "save_every_steps=2", "keep_last_checkpoints=3")
    wait_for(lambda: 2 in checkpoint_steps(killed), process, what="the step-2 checkpoint")
    kill_run(process)
    assert not (killed / "model").exists()  # it really was cut short

    copy = tmp_path / "resumed_with_one"
    shutil.copytree(killed, copy)
    train("full_finetune", "tiny_full", killed, 2, "save_every_steps=2", "keep_last_checkpoints=3")
    assert_same_losses(killed, full_runs[2])  # exact: same world size
    assert_same_tensors(model_weights(killed), model_weights(full_runs[2]))

    train("full_finetune", "tiny_full", copy, 1, "save_every_steps=2", "keep_last_checkpoints=3")
    assert_same_losses(copy, full_runs[1])  # 2 -> 1: the same continuation
    assert_same_tensors(model_weights(copy), model_weights(full_runs[1]))


@pytest.mark.slow
def test_sigkill_of_a_one_process_run_resumes_with_two(tmp_path, full_runs):
    killed = tmp_path / "killed"
    process = start("full_finetune", "tiny_full", killed, 1, "save_every_steps=2", "keep_last_checkpoints=3")
    wait_for(lambda: 2 in checkpoint_steps(killed), process, what="the step-2 checkpoint")
    kill_run(process)
    train("full_finetune", "tiny_full", killed, 2, "save_every_steps=2", "keep_last_checkpoints=3")
    assert_same_losses(killed, full_runs[1])
    assert_same_tensors(model_weights(killed), model_weights(full_runs[1]))


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker process with RANK=rank among the launcher's descendants."""
    for pid in descendants(launcher_pid):
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def test_sigkill_of_one_rank_fails_the_run_quickly_naming_it(tmp_path):
    out_dir = tmp_path / "run"
    process = start("full_finetune", "tiny_full", out_dir, 2, "save_every_steps=1", "max_steps=200",
                    "distributed.timeout_seconds=20")
    wait_for(lambda: len(checkpoint_steps(out_dir)) >= 1, process, what="a first checkpoint")
    pid = rank_pid(process.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    out, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.monotonic() - killed_at < 60
    # torchrun's failure report names the rank and how it died
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", out), out[-3000:]
    latest = CheckpointManager(out_dir).latest()  # whatever is newest is complete
    assert latest is not None and (latest / SHARDED_STATE / ".metadata").is_file()
    assert (latest / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------- refusal

@pytest.mark.parametrize("recipe, config", [("eval", "tiny_eval"), ("generate", "tiny_generate")])
def test_one_process_recipes_refuse_world_size_above_one(recipe, config):
    out = subprocess.run([sys.executable, "-m", "kubetune", "run", recipe, "--config", config],
                         env={**env(), "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"recipe {recipe} runs in one process only" in out.stderr and "WORLD_SIZE=2" in out.stderr
    assert "without --nproc-per-node" in out.stderr or "no --nproc-per-node" in out.stderr


def test_nproc_per_node_refuses_a_one_process_recipe_before_launching():
    out = subprocess.run([sys.executable, "-m", "kubetune", "run", "--nproc-per-node", "2", "eval", "--config", "tiny_eval"],
                         env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "recipe eval runs in one process only" in out.stderr
    assert "launching" not in out.stderr


def test_run_help_documents_the_launcher():
    out = subprocess.run([sys.executable, "-m", "kubetune", "run", "--help"], capture_output=True, text=True, timeout=60)
    assert "--nproc-per-node" in out.stdout and "--nnodes" in out.stdout and "torch.distributed.run" in out.stdout


def test_launcher_argv_is_torchrun():
    from kubetune.cli import parse_args, torchrun_argv

    args = parse_args(["run", "--nproc-per-node", "2", "full_finetune", "--config", "c.yaml", "a=1"])
    argv = torchrun_argv(args)
    assert argv[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in argv and "--nproc-per-node=2" in argv
    assert argv[argv.index("kubetune.cli") - 1:] == ["-m", "kubetune.cli", "run", "full_finetune", "--config", "c.yaml", "a=1"]
    args = parse_args(["run", "--nnodes", "2", "--node-rank", "1", "--master-addr", "h0",
                                      "--nproc-per-node", "8", "lora_finetune"])
    argv = torchrun_argv(args)
    assert "--standalone" not in argv and {"--nnodes=2", "--node-rank=1", "--master-addr=h0"} <= set(argv)


@pytest.mark.slow
def test_sigterm_of_the_launcher_checkpoints_every_rank_at_one_step(tmp_path):
    out_dir = tmp_path / "run"
    process = start("full_finetune", "tiny_full", out_dir, 2, "save_every_steps=null", "max_steps=400")
    wait_for(lambda: (out_dir / "metrics.jsonl").is_file() and any("loss" in r for r in read_metrics(out_dir / "metrics.jsonl")),
             process, what="a first step")
    process.send_signal(signal.SIGTERM)  # what the kubelet sends the pod (torchrun forwards it)
    out, _ = process.communicate(timeout=120)
    assert process.returncode != 0  # torchrun reports the ranks' 143 as a failure
    steps = checkpoint_steps(out_dir)
    assert len(steps) == 1 and 0 < steps[0] < 400, out[-3000:]
    folder = out_dir / "checkpoints" / f"step_{steps[0]}"
    assert (folder / SHARDED_STATE / ".metadata").is_file() and (folder / "rng_rank_1.pt").is_file()
    assert f"SIGTERM: saved a checkpoint at step {steps[0]}" in out  # rank 0's report


QLORA = ["save_every_steps=3", "save_merged=false"]


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory):
    """QLoRA at 2 processes, and at 1 in this process quantized with the 2-rank NF4 groups."""
    import kubetune.trainer.quant as quant
    from kubetune.trainer.config import resolve_config
    from kubetune.trainer.recipes.lora_finetune import recipe_main

    root = tmp_path_factory.mktemp("qlora")
    train("lora_finetune", "tiny_qlora", root / "nproc2", 2, *QLORA)
    quantize = quant.quantize_base
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant, "quantize_base",
                      lambda model, shards=1, world_size=1: quantize(model, shards=2, world_size=world_size))
        recipe_main(resolve_config("lora_finetune", "tiny_qlora", [
            *command("lora_finetune", "tiny_qlora", root / "nproc1", 1, *QLORA)[7:]]))
    return {nproc: root / f"nproc{nproc}" for nproc in (1, 2)}


def test_qlora_under_fsdp2_matches_one_process_with_the_same_nf4_groups(qlora_runs):
    """NF4 under FSDP2 (torchao's NF4Tensor all-gather) on gloo. On the tiny model the 2-rank run
    halves the NF4 double-quantization groups so they split over the ranks; the one-process
    reference quantizes with the same groups, and then the runs match (1e-5). (Run first in a fresh
    session cache, this caught one rank building builtin://tiny and so drawing different LoRA inits.)"""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.checkpoint import resolve_model_dir

    assert_same_losses(qlora_runs[2], qlora_runs[1])
    assert_same_tensors(adapter_weights(qlora_runs[2]), adapter_weights(qlora_runs[1]))
    assert 3 in checkpoint_steps(qlora_runs[2])
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir("builtin://tiny"), dtype=torch.float32)
    peft.PeftModel.from_pretrained(base, qlora_runs[2] / "adapter")


@pytest.mark.slow
def test_qlora_checkpoint_of_two_processes_resumes_with_one_on_the_same_nf4_base(tmp_path, qlora_runs):
    """The step-3 checkpoint of the 2-process run resumed with 1 process keeps the NF4 layout the run
    started with (nf4_shards), so it continues as the 1-process run with the 2-rank groups (1e-5),
    as the dpo recipe does (test_dpo_distributed.py)."""
    resumed = tmp_path / "resumed_at_1"
    train("lora_finetune", "tiny_qlora", resumed, 1, *QLORA, f"resume={qlora_runs[2] / 'checkpoints' / 'step_3'}")
    got, want = train_losses(resumed), {k: v for k, v in train_losses(qlora_runs[1]).items() if k[0] > 3}
    assert sorted(got) == sorted(want) and len(want) >= 4
    assert max(abs(got[k] - want[k]) for k in want) <= TOL
    assert_same_tensors(adapter_weights(resumed), adapter_weights(qlora_runs[1]))
