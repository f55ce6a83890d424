"""Local eval task files and the scoring math (torch-free parts), checked against lm-eval's own formulas."""
from __future__ import annotations

import json
import math

import pytest

from kubetune.errors import KubetuneError
from kubetune.trainer.eval import metrics as M
from kubetune.trainer.eval.tasks import TaskError, fewshot_indices, load_task, mc_prompt, resolve_options


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


MC = [
    {"context": "What sound does a cow make?", "choices": ["moo", "woof", "meow"], "answer": 0},
    {"context": "What color is the sky?", "choices": ["green", "blue"], "answer": "blue"},
    {"context": "Opposite of hot?", "choices": ["cold", "warm", "tepid"], "answer": 0},
]


def test_multiple_choice_file_loads_with_answer_as_index_or_text(tmp_path):
    task = load_task("mc", "multiple_choice", str(write_jsonl(tmp_path / "mc.jsonl", MC)), {})
    assert [s.answer for s in task.samples] == [0, 1, 0]
    assert task.samples[1].choices == ("green", "blue")
    assert len(load_task("mc", "multiple_choice", str(tmp_path / "mc.jsonl"), {}, limit=2).samples) == 2


def test_renamed_fields_and_alpaca_prompt(tmp_path):
    from kubetune.trainer.data.formats import format_alpaca_prompt

    records = [{"question": "Q?", "options": ["a", "b"], "label": 1}]
    options = {"context_field": "question", "choices_field": "options", "answer_field": "label", "prompt_format": "alpaca"}
    task = load_task("mc", "multiple_choice", str(write_jsonl(tmp_path / "mc.jsonl", records)), options)
    assert task.samples[0].context == format_alpaca_prompt("Q?")
    assert task.samples[0].answer == 1


@pytest.mark.parametrize(
    "task_type, record, field",
    [
        ("multiple_choice", {"choices": ["a", "b"], "answer": 0}, "context"),
        ("multiple_choice", {"context": "c", "answer": 0}, "choices"),
        ("multiple_choice", {"context": "c", "choices": ["a", "b"]}, "answer"),
        ("perplexity", {"txt": "hello"}, "text"),
        ("generate", {"prompt": "p"}, "answer"),
        ("generate", {"answer": "a"}, "prompt"),
    ],
)
def test_missing_field_names_file_line_and_field(tmp_path, task_type, record, field):
    good = {"multiple_choice": MC[0], "perplexity": {"text": "x"}, "generate": {"prompt": "p", "answer": "a"}}[task_type]
    path = write_jsonl(tmp_path / "task.jsonl", [good, "", record])
    with pytest.raises(TaskError) as err:
        load_task("t", task_type, str(path), {})
    assert f"{path}:3" in str(err.value) and f"'{field}'" in str(err.value)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "JSON object"),
        ('{"context": "c", "choices": ["a"], "answer": 0}', "at least 2"),
        ('{"context": "c", "choices": ["a", "b"], "answer": 2}', "outside 0..1"),
        ('{"context": "c", "choices": ["a", "b"], "answer": "z"}', "not one of the choices"),
        ('{"context": 3, "choices": ["a", "b"], "answer": 0}', "must be a str"),
    ],
)
def test_bad_records_are_errors_with_the_line(tmp_path, line, expected):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(MC[0]) + "\n" + line + "\n")
    with pytest.raises(TaskError, match=expected) as err:
        load_task("t", "multiple_choice", str(path), {})
    assert f"{path}:2" in str(err.value)
    assert isinstance(err.value, KubetuneError)


def test_missing_or_empty_file_and_bad_options(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        load_task("t", "perplexity", str(tmp_path / "nope.jsonl"), {})
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskError, match="no records"):
        load_task("t", "perplexity", str(tmp_path / "empty.jsonl"), {})
    with pytest.raises(TaskError, match="unknown option.*valid options"):
        resolve_options("t", "multiple_choice", {"delimiter": " "})
    with pytest.raises(TaskError, match="options.match"):
        resolve_options("t", "generate", {"match": "fuzzy"})
    with pytest.raises(TaskError, match="options.regex is not set"):
        resolve_options("t", "generate", {"match": "regex"})


def test_fewshot_examples_are_fixed_by_seed_and_never_the_sample_itself():
    for index in range(10):
        picks = fewshot_indices(10, index, 3, seed=7)
        assert index not in picks and len(set(picks)) == 3
        assert picks == fewshot_indices(10, index, 3, seed=7)  # same seed, same prompt
    assert any(fewshot_indices(10, i, 3, seed=7) != fewshot_indices(10, i, 3, seed=8) for i in range(10))
    with pytest.raises(TaskError, match="num_fewshot"):
        fewshot_indices(3, 0, 3, seed=0)


def test_fewshot_prompt_puts_solved_examples_first(tmp_path):
    task = load_task("mc", "multiple_choice", str(write_jsonl(tmp_path / "mc.jsonl", MC)), {})
    prompt = mc_prompt(task.samples, 0, 2, seed=1, options=task.options)
    solved = [task.samples[i] for i in fewshot_indices(3, 0, 2, seed=1)]
    expected = "".join(f"{s.context} {s.choices[s.answer]}\n\n" for s in solved) + task.samples[0].context
    assert prompt == expected


def test_limit_scores_the_first_samples_but_draws_examples_from_the_whole_file(tmp_path):
    task = load_task("mc", "multiple_choice", str(write_jsonl(tmp_path / "mc.jsonl", MC)), {}, limit=1)
    assert len(task.samples) == 1 and len(task.pool) == len(MC)
    prompt = mc_prompt(task.pool, 0, 2, seed=1, options=task.options)  # 2 examples although limit=1
    assert prompt.count("\n\n") == 2 and prompt.endswith(MC[0]["context"])


# ---- metrics against lm-eval's definitions ----
lm_metrics = pytest.importorskip("lm_eval.api.metrics")


def test_acc_and_acc_norm_follow_lm_eval():
    np = pytest.importorskip("numpy")
    cases = [([-4.0, -6.0, -5.0], ["a", "a much longer choice", "mid"]), ([-1.0, -1.0], ["x", "y"]), ([-9.0, -3.0], ["long answer", "b"])]
    for lls, choices in cases:
        pred, pred_norm = M.choice_predictions(lls, choices)
        assert pred == int(np.argmax(lls))
        assert pred_norm == int(np.argmax(np.array(lls) / np.array([float(len(c)) for c in choices])))


def test_stderr_and_perplexities_equal_lm_eval_formulas():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    metric = M.mean_with_stderr(values)
    assert metric.value == pytest.approx(lm_metrics.mean(values), abs=1e-12)
    assert metric.stderr == pytest.approx(lm_metrics.mean_stderr(values), abs=1e-12)
    assert M.mean_with_stderr([1.0]).stderr is None

    docs = [(-12.5, "hello big world"), (-30.25, "naïve text  with\nwhitespace")]
    nll = -sum(ll for ll, _ in docs)
    words = sum(M.count_words(t) for _, t in docs)
    nbytes = sum(M.count_bytes(t) for _, t in docs)
    result = M.perplexity_metrics(nll, 11, words, nbytes)
    assert result["word_perplexity"].value == pytest.approx(lm_metrics.weighted_perplexity([(ll, M.count_words(t)) for ll, t in docs]))
    assert result["byte_perplexity"].value == pytest.approx(lm_metrics.weighted_perplexity([(ll, M.count_bytes(t)) for ll, t in docs]))
    assert result["bits_per_byte"].value == pytest.approx(lm_metrics.bits_per_byte([(ll, M.count_bytes(t)) for ll, t in docs]))
    assert result["perplexity"].value == pytest.approx(math.exp(nll / 11))


def test_generation_matching():
    exact = resolve_options("g", "generate", {})
    assert M.generation_correct(" moo ", ["moo"], exact)
    assert not M.generation_correct("moo moo", ["moo"], exact)
    assert M.generation_correct("MOO", ["moo"], resolve_options("g", "generate", {"ignore_case": True}))
    contains = resolve_options("g", "generate", {"match": "contains"})
    assert M.generation_correct("a cow says moo.", ["woof", "moo"], contains)
    regex = resolve_options("g", "generate", {"match": "regex", "regex": r"answer is (\d+)"})
    assert M.generation_correct("so the answer is 42.", ["42"], regex)
    assert not M.generation_correct("so the answer is 41.", ["42"], regex)
    assert not M.generation_correct("no number", ["42"], regex)
    assert M.cut_at_stop("moo\n\nQuestion: next", ["\n\n", "Question:"]) == "moo"


def test_rolling_windows_equal_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    from kubetune.trainer.eval.scoring import rolling_windows

    for n_tokens in (0, 1, 3, 4, 5, 9, 17):
        tokens = list(range(100, 100 + n_tokens))
        expected = [
            utils.make_disjoint_window(w)
            for w in utils.get_rolling_token_windows(token_list=tokens, prefix_token=7, max_seq_len=4, context_len=1)
        ]
        assert rolling_windows(tokens, 7, 4) == [(list(a), list(b)) for a, b in expected]
