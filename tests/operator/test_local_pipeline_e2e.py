"""End to end on this machine: one folder with a FineTuneJob (tiny model), an EvalJob of it with a
baseline, and a ModelDeployment of it gated by that EvalJob, applied with `kubetune apply -f
FOLDER --detach`; the fine-tuned model beats its baseline, an `openai` client is answered by the
fine-tuned model, `kubetune get` lists all three, and `kubetune delete` stops the server."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml

from ophelpers import REPO

pytestmark = pytest.mark.timeout(600)


def write_folder(folder: Path, data: Path) -> None:
    finetune = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "facts"},
        "spec": {"recipe": "full_finetune", "model": {"source": "builtin://tiny"},
                 "dataset": {"source": str(data), "format": "text"},
                 # As tests/trainer/test_eval_recipe.py: 60 steps on "question answer" lines move the
                 # multiple-choice facts from chance to well above it in ~20 s on a CPU.
                 "config": {"max_steps": 60, "epochs": 100, "batch_size": 32, "max_seq_len": 32,
                            "optimizer": {"lr": 1.0e-2}, "lr_scheduler": {"name": "constant", "warmup_steps": 5},
                            "dataset": {"eval_fraction": 0}, "save_every_steps": None, "eval_every_steps": None, "device": "cpu"},
                 "resources": {"gpusPerNode": 0}},
    }
    evaljob = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": "facts-eval"},
        "spec": {"fineTuneJob": {"name": "facts"}, "baseline": True, "resources": {"gpusPerNode": 0},
                 "tasks": [{"name": "facts", "type": "multiple_choice", "source": "builtin://tiny_instruct_mc",
                            "options": {"context_field": "question"}}],
                 "config": {"device": "cpu", "batch_size": 36, "max_seq_len": 64}},
    }
    deployment = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "facts-bot"},
        "spec": {"fineTuneJob": {"name": "facts"}, "resources": {"gpusPerNode": 0}, "maxConcurrency": 2,
                 "promotion": {"evalJob": "facts-eval", "metric": "facts/acc", "min": 0.5}},
    }
    # Named so that sorted order is the reverse of the dependency order: apply must sort them.
    (folder / "a-serve.yaml").write_text(yaml.safe_dump(deployment))
    (folder / "b-eval.yaml").write_text(yaml.safe_dump(evaljob))
    (folder / "c-train.yaml").write_text(yaml.safe_dump(finetune))


def kubetune(*args: str, runs: Path, timeout: float = 500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args, "--runs-dir", str(runs)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def greedy(model_dir: str, prompt: str, max_new_tokens: int) -> str:
    """What that model itself generates greedily (the reference for the server's answer)."""
    from kubetune.trainer.builtin import resolve_model_path
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.generation import generate
    from kubetune.trainer.tokenizers import load_tokenizer

    path = resolve_model_path(model_dir) if model_dir.startswith("builtin://") else Path(model_dir)
    model, tokenizer = load_pretrained(path).eval(), load_tokenizer(path)
    ids = generate(model, [tokenizer.encode(prompt)], max_new_tokens, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)[0]
    return tokenizer.decode(ids)


def test_a_folder_is_a_pipeline_finetune_eval_deploy(tmp_path):
    from kubetune.trainer.data.synthetic import alpaca_records

    records = alpaca_records()
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"text": f"{r['input'] or r['instruction']} {r['output']}"}) + "\n" for r in records))
    folder = tmp_path / "pipeline"
    folder.mkdir()
    write_folder(folder, data)
    runs = tmp_path / "runs"

    applied = kubetune("apply", "-f", str(folder), "--detach", "--no-progress", runs=runs)
    logs = "".join(p.read_text()[-2000:] for p in runs.glob("*/*.log")) if runs.exists() else ""
    assert applied.returncode == 0, applied.stdout + applied.stderr + logs
    lines = applied.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [
        "finetunejob.kubetune.dev/facts", "evaljob.kubetune.dev/facts-eval", "modeldeployment.kubetune.dev/facts-bot"]
    try:
        evj = yaml.safe_load((runs / "facts-eval" / "status.yaml").read_text())["status"]
        assert evj["phase"] == "Succeeded" and evj["model"] == "finetunejob/facts"
        tuned, base = evj["result"]["metrics"]["facts/acc"], evj["result"]["baseline"]["facts/acc"]
        assert tuned >= 0.5 and tuned > base and evj["result"]["delta"]["facts/acc"] == pytest.approx(tuned - base)
        assert "vs baseline" in evj["result"]["mainMetric"]

        mdep = yaml.safe_load((runs / "facts-bot" / "status.yaml").read_text())["status"]
        assert mdep["phase"] == "Ready" and mdep["ready"] == "1/1" and mdep["servedModels"] == ["facts-bot"]
        promoted = next(c for c in mdep["conditions"] if c["type"] == "Promoted")
        assert promoted["status"] == "True" and f"facts/acc = {tuned:g}" in promoted["message"]
        assert mdep["url"] in applied.stdout

        question = next(r for r in records if r["input"])["input"]
        client = openai.OpenAI(base_url=mdep["url"], api_key="unused", max_retries=0, timeout=60)
        answer = client.completions.create(model="facts-bot", prompt=question, max_tokens=6, temperature=0)
        ftj = yaml.safe_load((runs / "facts" / "status.yaml").read_text())["status"]
        assert answer.model == "facts-bot"
        assert answer.choices[0].text == greedy(ftj["result"]["checkpoint"], question, 6)  # the fine-tuned model's words
        assert answer.choices[0].text != greedy("builtin://tiny", question, 6)  # not the base model's

        listed = kubetune("get", "all", runs=runs).stdout
        assert "facts-eval" in listed and "finetunejob/facts" in listed and mdep["url"] in listed
        assert "MAIN METRIC" in listed and "READY" in listed
    finally:
        deleted = kubetune("delete", "-f", str(folder), runs=runs)
    assert deleted.returncode == 0, deleted.stderr
    assert "modeldeployment.kubetune.dev/facts-bot deleted" in deleted.stdout
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{mdep['pid']}").exists():
        time.sleep(0.2)
    assert not Path(f"/proc/{mdep['pid']}").exists(), "the server still runs after kubetune delete"
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=mdep["url"], api_key="unused", max_retries=0, timeout=5).models.list()
    assert (runs / "facts" / "output").is_dir()  # delete keeps outputs
