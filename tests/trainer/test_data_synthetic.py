"""The synthetic instruction task: deterministic, consistent between its alpaca and
multiple-choice forms, and shipped as examples/data/tiny_instruct.jsonl."""
import json
from pathlib import Path

from kubetune.trainer.data import load_records
from kubetune.trainer.data.synthetic import FACTS, PHRASINGS, alpaca_records, multiple_choice_records, question

REPO = Path(__file__).resolve().parents[2]


def test_shipped_example_file_is_the_generator_output():
    shipped = [json.loads(line) for line in (REPO / "examples/data/tiny_instruct.jsonl").read_text().splitlines()]
    assert shipped == alpaca_records(seed=0)
    assert [r.data for r in load_records("builtin://tiny_instruct")] == shipped


def test_alpaca_records_cover_every_fact_in_every_phrasing_and_are_seeded():
    records = alpaca_records(seed=0)
    answers = {f.subject: f.answer for f in FACTS}
    for fact in FACTS:
        for i in range(len(PHRASINGS[fact.relation])):
            assert {"instruction": question(fact, i), "input": "", "output": fact.answer} in records
    assert all(r["output"] in answers.values() for r in records)
    assert len(records) == len(FACTS) * 6 and 200 <= len(records) <= 400
    assert alpaca_records(seed=0) == records and alpaca_records(seed=1) != records
    assert sorted(map(json.dumps, alpaca_records(seed=1))) == sorted(map(json.dumps, records))


def test_multiple_choice_records_hold_the_right_answer_among_same_relation_distractors():
    records = multiple_choice_records(seed=0)
    assert len(records) == len(FACTS)
    for fact, record in zip(FACTS, records):
        assert record["question"] in [question(fact, i) for i in range(len(PHRASINGS[fact.relation]))]
        assert record["choices"][record["answer"]] == fact.answer
        assert len(set(record["choices"])) == len(record["choices"]) == 4
        same_relation = {f.answer for f in FACTS if f.relation == fact.relation}
        assert set(record["choices"]) <= same_relation
    assert multiple_choice_records(seed=0) == records and multiple_choice_records(seed=1) != records
    # The answer position is spread out, so always picking one slot does not pass.
    assert len({r["answer"] for r in records}) == 4
