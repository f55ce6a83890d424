"""Records -> token samples: `{"input_ids": [...], "labels": [...]}` with labels aligned to the
inputs (the loss shifts them) and -100 where a token is not trained on.

- alpaca: {instruction, input?, output}; the prompt is masked unless train_on_input.
- chat: {messages: [{role, content}, ...]}; only assistant turns are trained on unless train_on_input.
- text: {<text_field>: "..."}; every token is trained on; long documents become several samples.
- preference: {prompt, chosen, rejected} text or chat (for DPO); one pair sample per record
  (`kubetune.trainer.data.preference`).

The first label of every sample is -100: nothing predicts a sample's first token, and in a
packed sequence this keeps the loss from crossing document boundaries.
Torch-free; the tokenizer is anything with the `kubetune.trainer.tokenizers` interface.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Protocol

from kubetune.trainer.data.sources import DatasetError, SourceRecord

log = logging.getLogger("kubetune.data")
IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CHAT_ROLES = ("system", "user", "assistant")


class TokenizerLike(Protocol):
    eos_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def tokenize_messages(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]: ...


def format_alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt a model trained on alpaca records expects (eval and generate use it too)."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def tokenize_records(
    records: Iterable[SourceRecord],
    tokenizer: TokenizerLike,
    format: str,
    max_seq_len: int,
    train_on_input: bool = False,
    text_field: str = "text",
) -> list[dict[str, list[int]]]:
    """Tokenize, mask, truncate. Samples left with nothing to train on (a prompt longer than
    max_seq_len) are dropped: they would add zero to the loss and cost a forward pass."""
    samples: list[dict[str, list[int]]] = []
    dropped = 0
    for record in records:
        if format == "alpaca":
            new = [alpaca_sample(record, tokenizer, train_on_input)]
        elif format == "chat":
            new = [chat_sample(record, tokenizer, train_on_input)]
        elif format == "text":
            new = text_samples(record, tokenizer, max_seq_len, text_field)
        elif format == "preference":
            from kubetune.trainer.data.preference import preference_sample  # it builds on this module

            pair = preference_sample(record, tokenizer, max_seq_len)
            if pair is None:
                dropped += 1
            else:
                samples.append(pair)
            continue
        else:
            raise DatasetError(f"dataset.format '{format}': expected one of alpaca, chat, text, preference")
        for sample in new:
            sample = truncate(sample, max_seq_len)
            if any(label != IGNORE_INDEX for label in sample["labels"]):
                samples.append(sample)
            else:
                dropped += 1
    if dropped:
        log.warning(
            "%d of %d samples dropped: their prompt fills all of max_seq_len=%d, leaving nothing to train on; "
            "raise max_seq_len to keep them", dropped, dropped + len(samples), max_seq_len,
        )
    return samples


def alpaca_sample(record: SourceRecord, tokenizer: TokenizerLike, train_on_input: bool) -> dict[str, list[int]]:
    instruction = _text_field(record, "instruction", hint="alpaca records need instruction, output and optional input")
    output = _text_field(record, "output", hint="alpaca records need instruction, output and optional input")
    input_text = _text_field(record, "input", required=False)
    prompt = tokenizer.encode(format_alpaca_prompt(instruction, input_text), add_bos=True, add_eos=False)
    response = tokenizer.encode(output, add_bos=False, add_eos=True)
    return _prompt_response(prompt, response, train_on_input)


def chat_sample(record: SourceRecord, tokenizer: TokenizerLike, train_on_input: bool) -> dict[str, list[int]]:
    messages = validate_messages(record.data.get("messages"), record.where)
    ids, loss_mask = tokenizer.tokenize_messages(messages)
    labels = list(ids) if train_on_input else [t if keep else IGNORE_INDEX for t, keep in zip(ids, loss_mask)]
    return _first_label_ignored({"input_ids": list(ids), "labels": labels})


def text_samples(record: SourceRecord, tokenizer: TokenizerLike, max_seq_len: int, text_field: str) -> list[dict]:
    """A document longer than max_seq_len becomes several samples (continued pretraining keeps all of it)."""
    text = _text_field(record, text_field, hint=f"text records need '{text_field}' (dataset.text_field)")
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    chunks = [ids[start:start + max_seq_len] for start in range(0, len(ids), max_seq_len)]
    return [_first_label_ignored({"input_ids": chunk, "labels": list(chunk)}) for chunk in chunks if len(chunk) > 1]


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: field '{field}' must be an object with role and content")
        if message.get("role") not in CHAT_ROLES:
            raise DatasetError(f"{where}: field '{field}.role' is {message.get('role')!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DatasetError(f"{where}: field '{field}.content' must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: field 'messages' has no assistant turn, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def truncate(sample: dict[str, list[int]], max_seq_len: int) -> dict[str, list[int]]:
    return {key: value[:max_seq_len] for key, value in sample.items()}


def _prompt_response(prompt: list[int], response: list[int], train_on_input: bool) -> dict[str, list[int]]:
    prompt_labels = list(prompt) if train_on_input else [IGNORE_INDEX] * len(prompt)
    return _first_label_ignored({"input_ids": prompt + response, "labels": prompt_labels + list(response)})


def _first_label_ignored(sample: dict[str, list[int]]) -> dict[str, list[int]]:
    if sample["labels"]:
        sample["labels"][0] = IGNORE_INDEX
    return sample


def _text_field(record: SourceRecord, name: str, required: bool = True, hint: str = "") -> str:
    value = record.data.get(name)
    if value is None:
        if not required:
            return ""
        raise DatasetError(f"{record.where}: field '{name}' is missing" + (f" ({hint})" if hint else ""))
    if not isinstance(value, str):
        raise DatasetError(f"{record.where}: field '{name}' must be a string, got {type(value).__name__}")
    return value
