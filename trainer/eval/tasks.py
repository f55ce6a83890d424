"""Local evaluation tasks: JSONL files read into validated samples, and few-shot prompts.

Torch-free. One record per line; the fields each task type needs:

    perplexity       {"text": "..."}
    multiple_choice  {"context": "...", "choices": ["...", "..."], "answer": 1 | "the right choice"}
    generate         {"prompt": "...", "answer": "..." | ["...", "..."]}

Field names can be renamed per task with options (`text_field`, `context_field`,
`choices_field`, `answer_field`, `prompt_field`), so existing files need no conversion.
A record that lacks a field is an error naming the file, the line and the field.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from kubetune.errors import KubetuneError
from kubetune.trainer.data.formats import format_alpaca_prompt


class TaskError(KubetuneError):
    """A task definition or task file a user must fix; the message names file, line and field."""


# Options each task type understands, with their defaults. Unknown options are errors.
TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "perplexity": {"text_field": "text"},
    "multiple_choice": {
        "context_field": "context",
        "choices_field": "choices",
        "answer_field": "answer",
        # lm-eval's default: the continuation scored is target_delimiter + choice.
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        # plain | alpaca (the prompt the fine-tuning recipes train on) | chat (a user turn in the chat template)
        "prompt_format": "plain",
    },
    "generate": {
        "prompt_field": "prompt",
        "answer_field": "answer",
        "match": "exact",  # exact | regex | contains
        "regex": None,  # with match: regex, the answer is the first group (or the whole match)
        "ignore_case": False,
        "strip": True,
        "max_new_tokens": 32,
        "until": ["\n\n"],  # stop strings; the answer is cut at the first one
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": None,
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "prompt_format": "plain",
    },
}
MATCH_KINDS = ("exact", "regex", "contains")
PROMPT_FORMATS = ("plain", "alpaca", "chat")


@dataclass(frozen=True)
class PerplexitySample:
    text: str


@dataclass(frozen=True)
class MultipleChoiceSample:
    context: str
    choices: tuple[str, ...]
    answer: int  # index into choices


@dataclass(frozen=True)
class GenerateSample:
    prompt: str
    answers: tuple[str, ...]  # any of them counts as correct


Sample = Union[PerplexitySample, MultipleChoiceSample, GenerateSample]


@dataclass
class Task:
    name: str
    type: str
    path: str
    options: dict[str, Any]
    samples: list = field(default_factory=list)  # the samples scored (the first `limit`)
    pool: list = field(default_factory=list)  # every sample of the file: few-shot examples come from here


def resolve_options(task_name: str, task_type: str, options: dict[str, Any]) -> dict[str, Any]:
    """The task type's defaults overlaid with the user's options; unknown keys are errors."""
    defaults = TASK_OPTIONS[task_type]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TaskError(
            f"task '{task_name}': unknown option(s) {', '.join(unknown)} for type {task_type}; "
            f"valid options: {', '.join(sorted(defaults))}"
        )
    resolved = {**defaults, **options}
    if resolved.get("prompt_format", "plain") not in PROMPT_FORMATS:
        raise TaskError(
            f"task '{task_name}': options.prompt_format is {resolved['prompt_format']!r}; "
            f"use one of {', '.join(PROMPT_FORMATS)}"
        )
    if resolved.get("prompt_format") == "chat" and "target_delimiter" not in options and "target_delimiter" in resolved:
        resolved["target_delimiter"] = ""  # the answer starts the assistant turn, right after the template's header
    if task_type == "generate":
        if resolved["match"] not in MATCH_KINDS:
            raise TaskError(
                f"task '{task_name}': options.match is {resolved['match']!r}; use one of {', '.join(MATCH_KINDS)}"
            )
        if resolved["match"] == "regex" and not resolved["regex"]:
            raise TaskError(f"task '{task_name}': options.match is regex but options.regex is not set; add a pattern")
        if isinstance(resolved["until"], str):
            resolved["until"] = [resolved["until"]]
    return resolved


def format_prompt(text: str, options: dict[str, Any]) -> str:
    """The record's question as the model sees it: as-is, or in the alpaca prompt it was tuned on.
    (prompt_format chat wraps the whole prompt, few-shot examples included, in the tokenizer's chat
    template when it is encoded: eval.runner.model_prompt.)"""
    if options["prompt_format"] == "alpaca":
        return format_alpaca_prompt(text)
    return text


def _require(record: dict, key: str, where: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in record:
        raise TaskError(f"{where}: field '{key}' is missing; each record needs {what}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TaskError(f"{where}: field '{key}' must be a {names}, got {type(value).__name__}")
    return value


def parse_sample(task_type: str, record: Any, options: dict[str, Any], where: str) -> Sample:
    """One JSON record -> a validated sample. `where` is 'file:line' for error messages."""
    if not isinstance(record, dict):
        raise TaskError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    if task_type == "perplexity":
        key = options["text_field"]
        return PerplexitySample(_require(record, key, where, str, f"'{key}' (the text to score)"))
    if task_type == "multiple_choice":
        what = (
            f"'{options['context_field']}', '{options['choices_field']}' (a list of at least 2 strings) "
            f"and '{options['answer_field']}' (index or text of the right choice)"
        )
        context = _require(record, options["context_field"], where, str, what)
        choices = _require(record, options["choices_field"], where, list, what)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{where}: field '{options['choices_field']}' must be a list of at least 2 strings")
        answer = _require(record, options["answer_field"], where, (int, str), what)
        if isinstance(answer, str):
            if answer not in choices:
                raise TaskError(f"{where}: field '{options['answer_field']}' ({answer!r}) is not one of the choices")
            answer = choices.index(answer)
        elif not 0 <= answer < len(choices):
            raise TaskError(
                f"{where}: field '{options['answer_field']}' is {answer}, outside 0..{len(choices) - 1} "
                f"(an index into '{options['choices_field']}')"
            )
        return MultipleChoiceSample(format_prompt(context, options), tuple(choices), answer)
    if task_type == "generate":
        what = f"'{options['prompt_field']}' and '{options['answer_field']}' (a string or a list of strings)"
        prompt = _require(record, options["prompt_field"], where, str, what)
        answer = _require(record, options["answer_field"], where, (str, list), what)
        answers = [answer] if isinstance(answer, str) else answer
        if not answers or not all(isinstance(a, str) for a in answers):
            raise TaskError(f"{where}: field '{options['answer_field']}' must be a string or a non-empty list of strings")
        return GenerateSample(format_prompt(prompt, options), tuple(answers))
    raise TaskError(f"{where}: unknown task type {task_type!r}; use perplexity, multiple_choice or generate")


# Task data made on the spot (nothing to download): the synthetic facts the tiny demo trains on.
BUILTIN_TASK_DATA = {"builtin://tiny_instruct_mc": "multiple_choice"}


def _builtin_records(source: str, task_type: str) -> list[dict]:
    from kubetune.trainer.data.synthetic import multiple_choice_records

    if BUILTIN_TASK_DATA.get(source) != task_type:
        known = ", ".join(f"{k} ({v})" for k, v in BUILTIN_TASK_DATA.items())
        raise TaskError(f"task data {source!r} is not a built-in {task_type} source; built-in sources: {known}")
    return multiple_choice_records()


def load_samples(path: str | Path, task_type: str, options: dict[str, Any]) -> list:
    """Read and validate a JSONL task file (all of it: a bad record later on is still an error)."""
    if str(path).startswith("builtin://"):
        records = _builtin_records(str(path), task_type)
        return [parse_sample(task_type, r, options, f"{path} record {i}") for i, r in enumerate(records, start=1)]
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} not found; point the task's `path` at a local JSONL file")
    samples = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TaskError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{where}: not valid JSON ({err.msg}); one JSON object per line") from None
            samples.append(parse_sample(task_type, record, options, where))
    if not samples:
        raise TaskError(f"task file {path} has no records")
    return samples


def load_task(name: str, task_type: str, path: str, options: dict[str, Any], limit: Optional[int] = None) -> Task:
    resolved = resolve_options(name, task_type, options)
    everything = load_samples(path, task_type, resolved)
    # `limit` picks the samples scored; few-shot examples still come from the whole file, as in lm-eval.
    return Task(name, task_type, str(path), resolved, everything[:limit] if limit else everything, everything)


# ---- few-shot -----------------------------------------------------------------------------------


def fewshot_indices(n_samples: int, index: int, num_fewshot: int, seed: int) -> list[int]:
    """Which other samples serve as examples for sample `index`: fixed by (seed, index), never itself.

    Seeding per sample keeps a sample's prompt the same whatever `limit` or batch order is used.
    """
    if num_fewshot == 0:
        return []
    others = [i for i in range(n_samples) if i != index]
    if num_fewshot > len(others):
        raise TaskError(
            f"num_fewshot={num_fewshot} but the task has only {n_samples} samples; "
            f"lower num_fewshot to at most {len(others)}"
        )
    return random.Random(seed * 1_000_003 + index).sample(others, num_fewshot)


def mc_prompt(samples: list[MultipleChoiceSample], index: int, num_fewshot: int, seed: int, options: dict) -> str:
    """The context of sample `index`, preceded by solved examples like lm-eval formats them."""
    shots = [samples[i] for i in fewshot_indices(len(samples), index, num_fewshot, seed)]
    solved = [s.context + options["target_delimiter"] + s.choices[s.answer] for s in shots]
    return "".join(example + options["fewshot_delimiter"] for example in solved) + samples[index].context


def generate_prompt(samples: list[GenerateSample], index: int, num_fewshot: int, seed: int, options: dict) -> str:
    shots = [samples[i] for i in fewshot_indices(len(samples), index, num_fewshot, seed)]
    solved = [s.prompt + options["target_delimiter"] + s.answers[0] for s in shots]
    return "".join(example + options["fewshot_delimiter"] for example in solved) + samples[index].prompt
