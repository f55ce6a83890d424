"""A tiny synthetic instruction task: a fixed set of facts asked in several phrasings.

A ~100k-parameter model learns it in well under a minute on a CPU, so tests, the demo and the
eval examples can show real learning without downloading anything. The same facts come as
alpaca-format training records and as multiple-choice records (question, choices, answer index).
Everything is deterministic given the seed. `examples/data/tiny_instruct.jsonl` is
`alpaca_records()` written out (a test checks they match).
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    relation: str  # "sound", "color" or "opposite": the choices of a question come from one relation
    subject: str
    answer: str


_SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
    "owl": "hoot", "lion": "roar", "horse": "neigh", "frog": "ribbit", "bee": "buzz", "snake": "hiss",
}
_COLORS = {
    "sky": "blue", "grass": "green", "snow": "white", "banana": "yellow", "coal": "black", "blood": "red",
    "orange": "orange", "lavender": "purple", "chocolate": "brown", "flamingo": "pink", "cloud": "grey",
    "lemon": "yellow",
}
_OPPOSITES = {
    "hot": "cold", "up": "down", "big": "small", "day": "night", "fast": "slow", "open": "closed",
    "wet": "dry", "early": "late", "full": "empty", "light": "dark", "loud": "quiet", "old": "new",
}

FACTS: tuple[Fact, ...] = tuple(
    [Fact("sound", s, a) for s, a in _SOUNDS.items()]
    + [Fact("color", s, a) for s, a in _COLORS.items()]
    + [Fact("opposite", s, a) for s, a in _OPPOSITES.items()]
)

# Several phrasings per relation; {s} is the subject. The first is the canonical question.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "sound": (
        "What sound does a {s} make?",
        "What does a {s} say?",
        "Which noise does a {s} make?",
        "A {s} says what?",
    ),
    "color": (
        "What color is {s}?",
        "What is the color of {s}?",
        "Which color does {s} have?",
        "{s} has what color?",
    ),
    "opposite": (
        "What is the opposite of {s}?",
        "Give the opposite of {s}.",
        "Which word means the opposite of {s}?",
        "The opposite of {s} is what?",
    ),
}

# Records that carry the question in alpaca's `input` field instead of the instruction.
INPUT_INSTRUCTIONS: tuple[str, ...] = ("Answer the question in one word.", "Reply with a single word.")


def question(fact: Fact, phrasing: int = 0) -> str:
    return PHRASINGS[fact.relation][phrasing].format(s=fact.subject)


def alpaca_records(seed: int = 0) -> list[dict[str, str]]:
    """Every fact in every phrasing (in `instruction`, and in `input` under a fixed instruction),
    shuffled with `seed`: 36 facts x 6 = 216 records of {instruction, input, output}."""
    records = []
    for fact in FACTS:
        for phrasing in range(len(PHRASINGS[fact.relation])):
            records.append({"instruction": question(fact, phrasing), "input": "", "output": fact.answer})
        for i, instruction in enumerate(INPUT_INSTRUCTIONS):
            records.append({"instruction": instruction, "input": question(fact, i), "output": fact.answer})
    random.Random(seed).shuffle(records)
    return records


def multiple_choice_records(seed: int = 0, num_choices: int = 4) -> list[dict]:
    """One question per fact: {question, choices, answer} where `answer` indexes `choices`.

    Distractors are other answers of the same relation (so the task needs the fact, not the
    topic); the phrasing, distractors and the answer's position are drawn with `seed`."""
    rng = random.Random(seed)
    records = []
    for fact in FACTS:
        pool = sorted({f.answer for f in FACTS if f.relation == fact.relation and f.answer != fact.answer})
        choices = rng.sample(pool, num_choices - 1)
        answer = rng.randrange(num_choices)
        choices.insert(answer, fact.answer)
        phrasing = rng.randrange(len(PHRASINGS[fact.relation]))
        records.append({"question": question(fact, phrasing), "choices": choices, "answer": answer})
    return records
