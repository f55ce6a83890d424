"""The dpo recipe shares the other training recipes' run life (resume.py, trackers.py,
early_stopping.py): a run with other DPO settings in the same output_dir is refused naming the keys,
a fresh run does not land on another run's files, matching settings resume (and run.json says which
run), the experiment trackers get the same losses and rewards as metrics.jsonl, and early stopping
on the held-out DPO loss stops the run and keeps the best checkpoint."""
from __future__ import annotations

import pytest

from kubetune.trainer.config import resolve_config
from kubetune.trainer.recipes.dpo import recipe_main
from kubetune.trainer.training.metrics import read_metrics
from kubetune.trainer.training.resume import ResumeError, RunRecord

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["progress_bar=false", "batch_size=4", "eval_max_batches=1", "eval_every_steps=null", "log_every_steps=1",
        "max_seq_len=160", "lr_scheduler.warmup_steps=0"]


def train(output_dir, *overrides, config="tiny_dpo"):
    return recipe_main(resolve_config("dpo", config, [*FAST, f"output_dir={output_dir}", *overrides]))


def test_dpo_resumes_only_its_own_run_and_refuses_other_settings_naming_them(tmp_path):
    out = tmp_path / "run"
    train(out, "max_steps=2", "save_every_steps=2", config="tiny_dpo_lora", *["save_merged=false"])
    record = RunRecord.read(out / "run.json")
    assert record is not None and record.settings["beta"] == 0.1 and record.settings["loss"] == "dpo"
    assert RunRecord.read(out / "checkpoints" / "step_2" / "run.json").run_id == record.run_id

    for override, shown in [("beta=0.2", "beta: 0.1 -> 0.2"), ("loss=ipo", 'loss: "dpo" -> "ipo"'),
                            ("lora.rank=4", "lora.rank: 8 -> 4")]:
        with pytest.raises(ResumeError, match="whose settings differ") as refused:
            train(out, "max_steps=3", "save_merged=false", override, config="tiny_dpo_lora")
        assert shown in str(refused.value) and "overwrite_output_dir: true" in str(refused.value)
    with pytest.raises(ResumeError, match="a fresh run there would mix with it"):
        train(out, "max_steps=3", "save_merged=false", "resume=never", config="tiny_dpo_lora")

    summary = train(out, "max_steps=3", "save_merged=false", config="tiny_dpo_lora")  # same settings: continues
    assert summary["steps"] == 3
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m] == [1, 2, 3]
    assert RunRecord.read(out / "run.json").run_id == record.run_id

    train(out, "max_steps=1", "beta=0.2", "resume=never", "overwrite_output_dir=true", "save_merged=false",
          config="tiny_dpo_lora")
    assert RunRecord.read(out / "run.json").run_id != record.run_id
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m] == [1]


def test_trackers_get_the_dpo_losses_and_rewards_of_metrics_jsonl(tmp_path):
    from test_trackers import tensorboard_scalars

    out = tmp_path / "run"
    train(out, "max_steps=2", "eval_every_steps=2", "save_every_steps=null", "loggers=[tensorboard]")
    records = read_metrics(out / "metrics.jsonl")
    scalars = tensorboard_scalars(out / "tensorboard")
    for key, tag in [("loss", "train/loss"), ("rewards/accuracy", "train/rewards/accuracy"),
                     ("rewards/margin", "train/rewards/margin"), ("eval_loss", "eval/loss"),
                     ("eval_rewards/accuracy", "eval/rewards/accuracy"), ("eval_rewards/chosen", "eval/rewards/chosen")]:
        logged = {r["step"]: r[key] for r in records if key in r}
        assert logged and scalars[tag] == pytest.approx(logged), key
    assert sorted(scalars["eval/loss"]) == [0, 2]


def test_early_stopping_on_the_held_out_dpo_loss_keeps_the_best_checkpoint(tmp_path, caplog):
    caplog.set_level("INFO", logger="kubetune")
    out = tmp_path / "run"
    # A min_delta no later eval can beat: the first eval (step 1) is the best, two evals later the run stops.
    summary = train(out, "max_steps=20", "eval_every_steps=1", "save_every_steps=null", "keep_last_checkpoints=1",
                    "early_stopping.patience=2", "early_stopping.min_delta=100")
    assert summary["steps"] == 3
    assert "early stopping at step 3: eval loss did not improve by 100" in caplog.text
    assert str(out / "checkpoints" / "step_1") in caplog.text
    assert (out / "checkpoints" / "step_1" / "training_state.pt").is_file()  # kept despite keep_last_checkpoints=1
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m] == [0, 1, 2, 3]
    assert (out / "model" / "model.safetensors").is_file()  # the run still ends with its final model
