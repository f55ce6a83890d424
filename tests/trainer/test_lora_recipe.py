"""The lora_finetune recipe end to end on builtin://tiny: it learns, its adapter is a PEFT adapter
(transformers + peft give our logits), save_merged writes the merged model, resume is exact, QLoRA trains."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kubetune.trainer.config import resolve_config
from kubetune.trainer.recipes.lora_finetune import recipe_main

TOL = 1e-5
FAST = ["progress_bar=false", "batch_size=8", "max_seq_len=96", "eval_max_batches=2", "eval_every_steps=null", "log_every_steps=1"]


def run(tmp_path, name, *overrides, config="tiny_lora"):
    cfg = resolve_config("lora_finetune", config, [*FAST, f"output_dir={tmp_path / name}", *overrides])
    return recipe_main(cfg)


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_recipe_learns_and_writes_a_peft_adapter_and_merged_model(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.checkpoint import load_pretrained, resolve_model_dir
    from kubetune.trainer.peft import load_adapter

    summary = run(tmp_path, "run", "max_steps=12", "save_every_steps=null", "save_merged=true", "lora.use_dora=true")
    out = tmp_path / "run"
    evals = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert evals[-1] < evals[0] - 0.5, evals
    assert summary["adapter"] == str(out / "adapter") and summary["checkpoint"] == str(out / "model")
    assert summary["steps"] == 12 and summary["finalLoss"] is not None

    base_dir = resolve_model_dir("builtin://tiny")
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_adapter(load_pretrained(base_dir), out / "adapter")(ids)
        theirs = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out / "adapter"
        ).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()(ids).logits
        base = load_pretrained(base_dir)(ids)
    assert (ours - theirs).abs().max().item() <= TOL
    assert (merged - ours).abs().max().item() <= TOL
    assert (ours - base).abs().max().item() > 1e-2  # the adapter did learn something


def test_lora_recipe_resumes_exactly(tmp_path):
    run(tmp_path, "straight", "max_steps=6", "save_every_steps=3")
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")

    # A run "killed" after its step-3 checkpoint: only what existed then is left.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for leftover in ("adapter", "model", "checkpoints/step_6"):
        shutil.rmtree(tmp_path / "resumed" / leftover, ignore_errors=True)
    summary = run(tmp_path, "resumed", "max_steps=6", "save_every_steps=3")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert summary["steps"] == 6
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # only the adapter is optimized and checkpointed: no base weights in the checkpoint folder
    from torch.distributed.checkpoint import FileSystemReader

    folder = tmp_path / "resumed" / "checkpoints" / "step_6"
    saved = FileSystemReader(str(folder / "distcp")).read_metadata().state_dict_metadata
    weights = [k.removeprefix("model.") for k in saved if k.startswith("model.")]
    assert sorted("base_model.model." + k for k in weights) == sorted(straight)
    assert {k.split(".")[1] for k in saved if k.startswith("optimizer.")} == {"state", "param_groups"}
    assert len({k for k in saved if k.startswith("optimizer.state.") and k.endswith(".exp_avg")}) == len(straight)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "checksums.json", "distcp", "run.json", "training_state.pt",
    ]


def test_qlora_recipe_trains(tmp_path):
    run(tmp_path, "q", "max_steps=8", "save_every_steps=null", "save_merged=false", config="tiny_qlora")
    losses = [m["loss"] for m in metrics(tmp_path / "q") if "loss" in m]
    assert losses[-1] < losses[0] - 0.5, losses
    config = json.loads((tmp_path / "q" / "adapter" / "adapter_config.json").read_text())
    # builtin://tiny is recorded as its folder: PEFT's AutoPeftModelForCausalLM can load that base.
    from kubetune.trainer.builtin import resolve_model_path

    assert config["base_model_name_or_path"] == str(resolve_model_path("builtin://tiny"))
    assert not (tmp_path / "q" / "model").exists()
