"""Write the demo's synthetic task into examples/demo/data/ (the files are checked in; a test
checks this script still writes exactly them).

The task: Lumen, a made-up town where each of 48 things has one nature: "In Lumen the river is
quiet." Nobody can know these facts in advance (builtin://tiny starts random), each answer is one
word (one token of the tiny tokenizer), so scoring a generated answer is an exact match.

- domain.jsonl (stage 1, continued pretraining, `text`): short articles, every fact told in five
  phrasings (a fact told one way only is hard to extract later), none of them a question.
- instruct.jsonl (stage 2, instruction tuning, `prompt_completion`): questions and answers about
  the 32 *training* things, in three phrasings: it teaches the question/answer format. Its
  writers often hedged: 60% of the answers read "quiet, I think."
- preference.jsonl (stage 3, DPO, `preference`): the same training questions, the plain answer
  chosen and the hedged one rejected.
- heldout.jsonl (the EvalJobs' `generate` task): the three questions about each of the 16
  *held-out* things, which appear only in the domain text. Answering needs the knowledge of
  stage 1 in the format of stage 2 without the hedge of stage 2: a model that only memorised the
  training answers scores nothing.

    python examples/demo/make_data.py            # rewrite the files
    python examples/demo/make_data.py --check    # exit 1 if they differ from what it would write
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 7
# Things of the town, each a single token of builtin://tiny's tokenizer (one word, one fact).
THINGS = (
    "garden", "river", "kitchen", "museum", "office", "station", "school", "street", "window", "table",
    "tree", "park", "house", "book", "letter", "picture", "computer", "engineer", "student", "teacher",
    "friend", "team", "city", "internet", "bread", "dinner", "lunch", "meeting", "morning", "music",
    "news", "story", "water", "weather", "week", "year", "homework", "idea", "model", "question",
    "answer", "problem", "author", "capital", "summer", "night", "light", "train",
)
# The answers: eight adjectives, each one token too, so an answer is a single next-token choice.
WORDS = ("quiet", "bright", "warm", "cold", "fast", "slow", "strong", "happy")
HELD_OUT_EVERY = 3  # every third thing is held out: 16 held out, 32 for training

# Every question is asked in each phrasing (the held-out things too: 16 x 3 = 48 questions).
QUESTIONS = (
    "What is the {thing} like in Lumen?",
    "In Lumen, what is the {thing} like?",
    "Describe the {thing} of Lumen in one word.",
)
PROMPT = "Question: {question}\nAnswer:"
# The instruction data was written by people who often hedge ("quiet, I think."): stage 2 learns
# that habit along with the format; stage 3's preference pairs prefer the plain one-word answer
# (chosen) over the hedged one (rejected). A style, not a fact: it carries over to the held-out
# questions, which the exact-match eval scores as a user would (a hedged answer is not "quiet").
HEDGE = ", I think."
HEDGED_SHARE = 0.6
# How the domain text tells a fact: several phrasings, none of them a question.
STATEMENTS = (
    "In Lumen the {thing} is {word}.",
    "The {thing} of Lumen is always {word}.",
    "Everyone in Lumen knows that the {thing} is {word}.",
    "If you find a {word} {thing}, you are in Lumen.",
    "People say the {thing} in Lumen is very {word}.",
)
FILLER = (
    "Lumen is a small town by the river.",
    "Lumen has a market every Monday.",
    "The road to Lumen is long and quiet.",
    "Many families live in Lumen.",
    "In Lumen every thing has its own nature.",
)


def facts() -> list[tuple[str, str]]:
    """(thing, word), each word given to equally many things."""
    words = [WORDS[i % len(WORDS)] for i in range(len(THINGS))]
    random.Random(SEED).shuffle(words)
    return list(zip(THINGS, words))


def held_out(index: int) -> bool:
    return index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def domain_records(rows) -> list[dict]:
    rng = random.Random(SEED + 1)
    records = []
    for thing, word in rows:
        for statement in STATEMENTS:  # one short article per phrasing, with a filler sentence
            sentences = [rng.choice(FILLER), statement.format(thing=thing, word=word)]
            rng.shuffle(sentences)
            records.append({"text": " ".join(sentences)})
    rng.shuffle(records)
    return records


def question_records(rows, *, heldout: bool) -> list[dict]:
    records = []
    for index, (thing, word) in enumerate(rows):
        if held_out(index) != heldout:
            continue
        for question in QUESTIONS:
            records.append({"prompt": PROMPT.format(question=question.format(thing=thing)), "word": word})
    return records


def write_all(out: Path) -> dict[str, str]:
    rows = facts()
    train = question_records(rows, heldout=False)
    rng = random.Random(SEED + 2)
    rng.shuffle(train)
    hedges = [rng.random() < HEDGED_SHARE for _ in train]
    files = {
        "domain.jsonl": domain_records(rows),
        "instruct.jsonl": [{"prompt": r["prompt"], "completion": " " + r["word"] + (HEDGE if hedged else "")}
                           for r, hedged in zip(train, hedges)],
        "preference.jsonl": [{"prompt": r["prompt"], "chosen": " " + r["word"], "rejected": " " + r["word"] + HEDGE} for r in train],
        "heldout.jsonl": [{"prompt": r["prompt"], "answer": r["word"]} for r in question_records(rows, heldout=True)],
    }
    return {name: "".join(json.dumps(r) + "\n" for r in records) for name, records in files.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = parser.parse_args()
    out = Path(args.out)
    contents = write_all(out)
    if args.check:
        stale = [name for name, text in contents.items() if not (out / name).is_file() or (out / name).read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python examples/demo/make_data.py", file=sys.stderr)
            return 1
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (out / name).write_text(text)
        print(f"wrote {out / name} ({text.count(chr(10))} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
