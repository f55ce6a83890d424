"""A training run's life in its output_dir: resume that never surprises (matching resume, mismatch
refused naming the keys, a fresh run refused in an occupied folder unless overwrite_output_dir,
pruning that keeps the current run, max_steps raised on resume keeping the schedule), max_steps
over epochs, the console's start/resume/end lines, early stopping, and the trackers fed by a real run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kubetune.trainer.config import resolve_config
from kubetune.trainer.training.checkpointing import CheckpointManager
from kubetune.trainer.training.metrics import read_metrics
from kubetune.trainer.training.resume import ResumeError, RunRecord

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The tiny model on 32 records, 8 per batch: 4 batches an epoch, a step in well under a second.
FAST = ["progress_bar=false", "device=cpu", "dataset.max_samples=32", "batch_size=8", "max_seq_len=160",
        "dataset.eval_fraction=0", "dataset.packed=false",
        "eval_every_steps=null", "log_every_steps=1", "lr_scheduler.warmup_steps=0", "lr_scheduler.name=linear", "lr_scheduler.min_lr_ratio=0",
        "optimizer.lr=1e-3", "epochs=1"]


def train(output_dir, *overrides, recipe="full_finetune", config="tiny_full"):
    from importlib import import_module

    cfg = resolve_config(recipe, config, [*FAST, f"output_dir={output_dir}", *overrides])
    return import_module(f"kubetune.trainer.recipes.{recipe}").recipe_main(cfg)


def steps_and_lrs(output_dir):
    return [(m["step"], m["lr"]) for m in read_metrics(output_dir / "metrics.jsonl") if "loss" in m]


def test_max_steps_overrides_epochs_and_raising_it_on_resume_keeps_the_schedule(tmp_path, caplog):
    caplog.set_level("INFO", logger="kubetune")
    out = tmp_path / "run"
    train(out, "max_steps=6", "save_every_steps=3")  # 6 steps > one epoch of 4: epochs repeat
    assert [s for s, _ in steps_and_lrs(out)] == [1, 2, 3, 4, 5, 6]
    assert "planned 6 optimizer steps (max_steps; 1.5 epochs of 4 steps)" in caplog.text
    first = steps_and_lrs(out)
    record = RunRecord.read(out / "run.json")
    assert record.schedule_steps == 6 and RunRecord.read(out / "checkpoints" / "step_6" / "run.json") == record

    caplog.clear()
    summary = train(out, "max_steps=9", "save_every_steps=3")
    assert summary["steps"] == 9
    assert f"resuming run {record.run_id} from {out / 'checkpoints' / 'step_6'} at step 6" in caplog.text
    assert "keeps the 6-step learning-rate schedule it started with" in caplog.text
    resumed = steps_and_lrs(out)
    assert resumed[:6] == first and [s for s, _ in resumed] == list(range(1, 10))  # metrics.jsonl: each step once
    assert all(lr == pytest.approx(0.0) for _, lr in resumed[6:])  # the linear schedule ended at step 6

    train(out, "max_steps=12", "save_every_steps=3", "lr_scheduler.on_resume=replan")
    replanned = steps_and_lrs(out)[9:]
    assert replanned[0][1] == pytest.approx(1e-3 * (1 - 9 / 12))  # stretched over 12 steps


def test_a_run_with_other_settings_is_refused_naming_the_keys_and_the_ways_out(tmp_path):
    out = tmp_path / "run"
    train(out, "max_steps=2", "save_every_steps=2")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ResumeError) as info:
        train(out, "max_steps=4", "optimizer.lr=1e-5", "dataset.max_samples=16")
    message = str(info.value)
    assert "dataset.max_samples: 32 -> 16" in message and "optimizer.lr: 0.001 -> 1e-05" in message
    assert "resume: never and a new or emptied output_dir" in message and "overwrite_output_dir: true" in message
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched


def test_a_fresh_run_into_an_occupied_folder_needs_overwrite_output_dir(tmp_path):
    out = tmp_path / "run"
    train(out, "max_steps=2", "save_every_steps=1")
    old = RunRecord.read(out / "run.json")
    with pytest.raises(ResumeError, match=r"holds run .*checkpoints/ \(step_1, step_2\), model.*overwrite_output_dir: true"):
        train(out, "max_steps=2", "resume=never")
    train(out, "max_steps=3", "resume=never", "overwrite_output_dir=true", "optimizer.lr=2e-3")
    new = RunRecord.read(out / "run.json")
    assert new.run_id != old.run_id
    # The old run's checkpoints are gone; the new run's final one carries the new run's record.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3"]
    assert RunRecord.read(out / "checkpoints" / "step_3" / "run.json").run_id == new.run_id
    assert [s for s, _ in steps_and_lrs(out)] == [1, 2, 3]  # and its metrics lines


def test_pruning_keeps_the_current_runs_newest_checkpoints(tmp_path):
    import torch  # noqa: F401  (the manager saves torch state)

    old, new = RunRecord("old", "h1", {}, 80), RunRecord("new", "h2", {}, 40)
    write = lambda folder: folder.mkdir()  # noqa: E731
    legacy = CheckpointManager(tmp_path, keep_last=2, run=old)
    for step in (60, 80):
        legacy.save(step, write, {"step": step})
    current = CheckpointManager(tmp_path, keep_last=2, run=new)
    for step in (10, 20, 30):
        current.save(step, write, {"step": step})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_20", "step_30", "step_60", "step_80"]  # the new run's step_10 pruned, not its newest
    assert current.latest_of("new").name == "step_30" and current.latest_of("old").name == "step_80"


def test_early_stopping_stops_and_keeps_the_best_checkpoint(tmp_path, caplog):
    caplog.set_level("INFO", logger="kubetune")
    out = tmp_path / "run"
    # min_delta no later eval can beat: the first eval is the best, two evals later the run stops.
    summary = train(out, "max_steps=20", "eval_every_steps=1", "dataset.eval_fraction=0.25", "keep_last_checkpoints=1",
                    "early_stopping.patience=2", "early_stopping.min_delta=100")
    assert summary["steps"] == 3
    assert "early stopping at step 3: eval loss did not improve by 100" in caplog.text
    assert f"best eval loss" in caplog.text and str(out / "checkpoints" / "step_1") in caplog.text
    assert (out / "checkpoints" / "step_1" / "training_state.pt").is_file()  # kept despite keep_last_checkpoints=1
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m] == [0, 1, 2, 3]


def test_early_stopping_needs_held_out_data_and_periodic_evals():
    from kubetune.trainer.config import ConfigError

    base = {"model": {"path": "builtin://tiny"}, "dataset": {"source": "d.jsonl"}, "early_stopping": {"patience": 2}}
    with pytest.raises(ConfigError, match="early_stopping needs eval_every_steps"):
        resolve_config("full_finetune", base)
    with pytest.raises(ConfigError, match="early_stopping needs held-out data"):
        resolve_config("full_finetune", {**base, "eval_every_steps": 5})


def test_the_console_shows_the_plan_the_resume_point_and_the_end(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "kubetune.cli", "run", "lora_finetune", "--config", "tiny_lora", *FAST,
               f"output_dir={out}", "max_steps=2", "save_every_steps=2", "save_merged=false"]
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    assert "starting a new run in" in first.stderr and "planned 2 optimizer steps" in first.stderr
    assert "global batch 8 (8 x 1 accumulation x 1 process)" in first.stderr
    assert "step 1/2 loss=" in first.stderr and "step 2/2 loss=" in first.stderr  # plain lines, no progress bar
    assert f"done: 2 steps" in first.stderr and f"output {out / 'adapter'}" in first.stderr
    second = subprocess.run([*command, "max_steps=3"], capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr
    assert f"from {out / 'checkpoints' / 'step_2'} at step 2" in second.stderr
    refused = subprocess.run([*command, "lora.rank=4"], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "lora.rank: 8 -> 4" in refused.stderr and "Traceback" not in refused.stderr


def test_trackers_carry_the_same_losses_as_metrics_jsonl(tmp_path, monkeypatch):
    from test_trackers import mlflow_run, tensorboard_scalars, wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "run"
    train(out, "max_steps=4", "eval_every_steps=2", "dataset.eval_fraction=0.25", "loggers=[tensorboard,mlflow,wandb]",
          recipe="lora_finetune", config="tiny_lora")
    records = read_metrics(out / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and sorted(evals) == [0, 2, 4]

    scalars = tensorboard_scalars(out / "tensorboard")
    assert scalars["train/loss"] == pytest.approx(losses) and scalars["eval/loss"] == pytest.approx(evals)
    run, history = mlflow_run(out / "mlruns")
    assert history["train/loss"] == pytest.approx(losses) and history["eval/loss"] == pytest.approx(evals)
    assert run.data.params["lora.rank"] == "8" and run.info.status == "FINISHED"
    logged: dict[int, dict] = {}
    for record in wandb_records(out):
        if record.HasField("history"):
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            logged.setdefault(items["_step"], {}).update(items)
    assert {s: v["train/loss"] for s, v in logged.items() if "train/loss" in v} == pytest.approx(losses)
    assert {s: v["eval/loss"] for s, v in logged.items() if "eval/loss" in v} == pytest.approx(evals)
