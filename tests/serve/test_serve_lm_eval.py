"""lm-evaluation-harness's `local-completions` model (OpenAI completions over HTTP: echo + logprobs)
pointed at `kubetune serve` gives the same log-likelihoods and metrics as lm-eval on the model in
process (`kubetune run eval`'s adapter). A local task over a JSONL file; nothing is downloaded."""
import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "What sound does a cow make?", "choices": ["moo", "woof", "meow", "quack"], "answer": 0},
    {"question": "What color is the sky?", "choices": ["green", "blue", "red", "white"], "answer": 1},
    {"question": "What is the opposite of hot?", "choices": ["big", "slow", "cold", "wet"], "answer": 2},
    {"question": "Give the opposite of up.", "choices": ["closed", "down", "late"], "answer": 1},
]
TASK_YAML = """task: kt_serve_facts
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
"""


def test_lm_eval_local_completions_against_the_server_equals_lm_eval_in_process(api, tiny_dir, tmp_path, monkeypatch):
    import datasets

    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.eval.lm_eval_adapter import KubetuneLM, task_manager_for
    from kubetune.trainer.tokenizers import load_tokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "kt_serve_facts.yaml").write_text(TASK_YAML.format(data=data))

    def run(model, **kwargs):
        output = lm_eval.simple_evaluate(
            model=model, tasks=["kt_serve_facts"], num_fewshot=0, log_samples=True,
            task_manager=task_manager_for(["kt_serve_facts"], str(tmp_path / "tasks")), **kwargs,
        )
        samples = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in output["samples"]["kt_serve_facts"]}
        return samples, output["results"]["kt_serve_facts"]["acc,none"]

    local = KubetuneLM(load_pretrained(str(tiny_dir)), load_tokenizer(str(tiny_dir)), batch_size=4)
    expected, expected_acc = run(local)
    served, served_acc = run(
        "local-completions",
        model_args=f"base_url={api['url']}/v1/completions,model=tiny,tokenizer={tiny_dir},tokenizer_backend=huggingface,num_concurrent=1,max_retries=1",
        batch_size=2,
    )
    assert set(served) == set(expected) == set(range(len(QUESTIONS)))
    for doc_id, loglikelihoods in expected.items():
        assert [ll[0] if isinstance(ll, (list, tuple)) else ll for ll in served[doc_id]] == pytest.approx(
            [ll[0] if isinstance(ll, (list, tuple)) else ll for ll in loglikelihoods], abs=1e-4
        )
    assert served_acc == expected_acc
