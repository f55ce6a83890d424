"""The lm-eval adapter runs a local custom lm-eval task end to end and agrees with our task.

Nothing is downloaded: the lm-eval task is a YAML over a local JSONL file (datasets' `json`
builder), and HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set.
"""
from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from kubetune.trainer.eval.runner import RunSettings, evaluate_multiple_choice  # noqa: E402
from kubetune.trainer.eval.tasks import load_task  # noqa: E402

QUESTIONS = [
    {"question": "What sound does a cow make?", "choices": ["moo", "woof", "meow", "quack"], "answer": 0},
    {"question": "What color is the sky?", "choices": ["green", "blue", "red", "white"], "answer": 1},
    {"question": "What is the opposite of hot?", "choices": ["big", "slow", "cold", "wet"], "answer": 2},
    {"question": "What does a dog say?", "choices": ["baa", "oink", "hoot", "woof"], "answer": 3},
    {"question": "What color is grass?", "choices": ["green", "purple"], "answer": 0},
    {"question": "Give the opposite of up.", "choices": ["closed", "down", "late"], "answer": 1},
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    # datasets reads its cache dir at import: point the live config at a temp folder too.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


@pytest.fixture
def local_lm_eval_task(tmp_path):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks_dir = tmp_path / "lm_eval_tasks"
    tasks_dir.mkdir()
    (tasks_dir / "kt_facts.yaml").write_text(TASK_YAML.format(name="kt_facts", data=data))
    return data, tasks_dir


@pytest.fixture(scope="module")
def tiny():
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.tokenizers import load_tokenizer

    return load_pretrained("builtin://tiny"), load_tokenizer("builtin://tiny")


def test_adapter_equals_builtin_multiple_choice(offline, local_lm_eval_task, tiny):
    from kubetune.trainer.eval.lm_eval_adapter import KubetuneLM, convert_results, task_manager_for

    data, tasks_dir = local_lm_eval_task
    model, tokenizer = tiny
    ours = evaluate_multiple_choice(
        model, tokenizer, load_task("kt_facts", "multiple_choice", str(data), {"context_field": "question"}), RunSettings(batch_size=5)
    )
    output = lm_eval.simple_evaluate(
        model=KubetuneLM(model, tokenizer, batch_size=7),
        tasks=["kt_facts"],
        num_fewshot=0,
        task_manager=task_manager_for(["kt_facts"], str(tasks_dir)),
        log_samples=True,
    )
    # Per question, the log-likelihood of every choice (lm-eval asked for them request by request).
    theirs = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in output["samples"]["kt_facts"]}
    for doc_id, detail in enumerate(ours.samples):
        assert theirs[doc_id] == pytest.approx(detail["loglikelihoods"], abs=1e-5)
    converted = convert_results(output)["kt_facts"]
    assert converted["n"] == ours.n == len(QUESTIONS)
    for metric in ("acc", "acc_norm"):
        assert converted["metrics"][metric]["value"] == pytest.approx(ours.metrics[metric].value, abs=1e-12)
        assert converted["metrics"][metric]["stderr"] == pytest.approx(ours.metrics[metric].stderr, abs=1e-12)


def test_rolling_loglikelihood_equals_our_perplexity_scoring(tiny):
    from lm_eval.api.instance import Instance

    from kubetune.trainer.eval.lm_eval_adapter import KubetuneLM
    from kubetune.trainer.eval.scoring import score_rolling

    model, tokenizer = tiny
    texts = ["The sky is blue because of the way light scatters.", "I put them on the table. " * 6]
    lm = KubetuneLM(model, tokenizer, batch_size=4, max_length=16)  # the second text spans several windows
    requests = [Instance("loglikelihood_rolling", {}, (t,), idx=0) for t in texts]
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    expected = score_rolling(model, [tokenizer.encode(t, add_bos=False) for t in texts], prefix, max_len=16)
    assert lm.loglikelihood_rolling(requests) == pytest.approx([total for total, _ in expected], abs=1e-5)


def test_recipe_runs_lm_eval_tasks_by_name(offline, local_lm_eval_task, tmp_path):
    from kubetune.trainer.config import resolve_config
    from kubetune.trainer.recipes.eval import recipe_main

    data, tasks_dir = local_lm_eval_task
    cfg = resolve_config(
        "eval",
        {
            "model": {"path": "builtin://tiny"},
            "tasks": ["kt_facts", {"name": "facts", "type": "multiple_choice", "path": str(data), "options": {"context_field": "question"}}],
            "lm_eval_include_path": str(tasks_dir),
            "output_dir": str(tmp_path / "out"),
            "device": "cpu",
        },
    )
    summary = recipe_main(cfg)
    results = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]
    assert results["kt_facts"]["metrics"]["acc"] == results["facts"]["metrics"]["acc"]
    assert summary["metrics"]["kt_facts/acc_norm"] == results["facts"]["metrics"]["acc_norm"]["value"]


def test_unknown_lm_eval_task_is_a_clear_error(offline, local_lm_eval_task, tmp_path):
    from lm_eval.tasks import TaskManager

    from kubetune.errors import KubetuneError
    from kubetune.trainer.eval.lm_eval_adapter import check_task_names, task_manager_for

    _, tasks_dir = local_lm_eval_task
    # Only the local index: lm-eval's full index of built-in tasks takes minutes on a shared CPU.
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    with pytest.raises(KubetuneError, match="unknown lm-eval task 'kt_fact'.*did you mean kt_facts"):
        check_task_names(["kt_fact"], manager)
    with pytest.raises(KubetuneError, match="lm_eval_include_path: .* is not a folder"):
        task_manager_for(["kt_facts"], str(tmp_path / "missing"))


def test_generate_until_equals_transformers_greedy_cut_at_stop(tiny):
    transformers = pytest.importorskip("transformers")
    import torch
    from lm_eval.api.instance import Instance

    from kubetune.trainer.builtin import resolve_model_path
    from kubetune.trainer.eval.lm_eval_adapter import KubetuneLM

    model, tokenizer = tiny
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin://tiny")).eval()
    prompts = ["What sound does a cow make?", "The old man"]
    settings = {"until": ["e"], "max_gen_toks": 8, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, dict(settings)), idx=0) for p in prompts]
    outputs = KubetuneLM(model, tokenizer, batch_size=2).generate_until(requests)
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tokenizer.pad_id)[0, ids.shape[1]:]
        assert output == tokenizer.decode(new.tolist()).split("e")[0]
