"""The dpo recipe end to end on builtin://tiny: the first step's loss when the policy is its own
reference, what a run writes (PEFT adapter, merged or full model, metrics, termination log,
Prometheus gauges), and that bad input fails with a clear error."""
from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch

from kubetune.trainer.config import resolve_config
from kubetune.trainer.recipes.dpo import recipe_main
from kubetune.trainer.training.metrics import GAUGES, PREFERENCE_GAUGES, PrometheusExporter, read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["progress_bar=false", "batch_size=4", "eval_max_batches=1", "eval_every_steps=null", "log_every_steps=1",
        "save_every_steps=null", "resume=never"]


def run(tmp_path, name, *overrides, config="tiny_dpo"):
    cfg = resolve_config("dpo", config, [*FAST, f"output_dir={tmp_path / name}", *overrides])
    return recipe_main(cfg)


@pytest.mark.parametrize("config", ["tiny_dpo", "tiny_dpo_lora"])
def test_first_step_dpo_loss_is_ln2_when_the_policy_is_its_reference(tmp_path, config):
    """Full: the reference is a copy of the starting policy; LoRA: adapters start at zero (B = 0), so
    policy and reference (adapters off) agree, every log-ratio is 0 and each pair's loss is ln 2."""
    run(tmp_path, "run", "max_steps=2", config=config)
    first = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("step") == 1 and "loss" in r)
    assert abs(first["loss"] - math.log(2)) <= 1e-6, first
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margin"] == 0.0
    assert first["rewards/accuracy"] == 0.0  # ties are not wins
    held_out = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("step") == 0)
    assert abs(held_out["eval_loss"] - math.log(2)) <= 1e-6


def test_the_first_step_is_not_ln2_when_the_loss_differs(tmp_path):
    """SimPO has no reference: its first loss is not the ln 2 of a zero margin (the check above can fail)."""
    run(tmp_path, "run", "max_steps=1", "loss=simpo", "beta=2.0")
    first = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("step") == 1)
    assert abs(first["loss"] - math.log(2)) > 1e-3


def test_lora_dpo_writes_a_peft_adapter_merged_model_and_termination_log(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.checkpoint import load_pretrained, resolve_model_dir
    from kubetune.trainer.peft import load_adapter

    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    summary = run(tmp_path, "run", "max_steps=4", "save_merged=true", "optimizer.lr=5e-2", config="tiny_dpo_lora")
    out = tmp_path / "run"
    assert summary["adapter"] == str(out / "adapter") and summary["checkpoint"] == str(out / "model")
    written = json.loads(log.read_text())
    assert written["steps"] == 4 and 0.0 <= written["rewardAccuracy"] <= 1.0 and "rewardMargin" in written
    train = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:
        assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= record.keys()

    base_dir = resolve_model_dir("builtin://tiny")
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_adapter(load_pretrained(base_dir), out / "adapter")(ids)
        theirs = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out / "adapter"
        ).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()(ids).logits
        base = load_pretrained(base_dir)(ids)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (merged - ours).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-4  # the adapter moved


def test_full_dpo_writes_the_model_and_a_later_stage_can_start_from_the_run_folder(tmp_path):
    from kubetune.trainer.checkpoint import load_pretrained

    run(tmp_path, "first", "max_steps=2", "optimizer.lr=1e-2")
    trained = load_pretrained(tmp_path / "first" / "model")
    # model.path = the previous run's output folder: its model/ is the new policy and reference.
    run(tmp_path, "second", "max_steps=1", f"model.path={tmp_path / 'first'}")
    first = next(r for r in read_metrics(tmp_path / "second" / "metrics.jsonl") if r.get("step") == 1)
    assert abs(first["loss"] - math.log(2)) <= 1e-6  # its reference is the trained model
    base = load_pretrained("builtin://tiny")
    differs = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), base.parameters()))
    assert differs > 1e-4


def test_prometheus_serves_the_reward_gauges():
    exporter = PrometheusExporter(port=0, extra_gauges=PREFERENCE_GAUGES)
    try:
        exporter.update(step=3, reward_accuracy=0.75, reward_margin=0.5)
        body = urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=10).read().decode()
    finally:
        exporter.close()
    for name, _ in {**GAUGES, **PREFERENCE_GAUGES}.values():
        assert f"# TYPE {name} gauge" in body
    assert "kubetune_train_reward_accuracy 0.75" in body and "kubetune_train_reward_margin 0.5" in body


def test_bad_preference_data_fails_naming_the_record(tmp_path):
    from kubetune.trainer.data import DatasetError

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"}) + "\n"
                    + json.dumps({"prompt": "Q?", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(DatasetError, match=r"pairs.jsonl record 2 \(line 2\): fields 'chosen' and 'rejected' are identical"):
        run(tmp_path, "run", "max_steps=1", f"dataset.source={data}")


def test_lora_dpo_from_a_previous_lora_run_merges_its_adapter_into_the_base_once(tmp_path):
    """Pipeline: instruction LoRA -> LoRA-DPO with model.path = the LoRA run's output folder (adapter only)."""
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.peft import load_adapter
    from kubetune.trainer.recipes.lora_finetune import recipe_main as lora_main

    lora_main(resolve_config("lora_finetune", "tiny_lora", [
        "progress_bar=false", "max_steps=3", "batch_size=4", "eval_every_steps=null", "save_every_steps=null",
        "save_merged=false", "optimizer.lr=5e-2", "resume=never", f"output_dir={tmp_path / 'sft'}"]))
    assert not (tmp_path / "sft" / "model").exists()
    summary = run(tmp_path, "dpo", "max_steps=2", f"model.path={tmp_path / 'sft'}", config="tiny_dpo_lora")
    base = tmp_path / "dpo" / "base"
    first = next(r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if r.get("step") == 1)
    assert abs(first["loss"] - math.log(2)) <= 1e-6  # the reference is base + the SFT adapter
    config = json.loads((tmp_path / "dpo" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and summary["adapter"] == str(tmp_path / "dpo" / "adapter")
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sft = load_adapter(load_pretrained("builtin://tiny"), tmp_path / "sft" / "adapter")(ids)
        merged = load_pretrained(base)(ids)
    assert (sft - merged).abs().max().item() <= 1e-5
