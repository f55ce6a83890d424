"""Records -> token samples: `{"input_ids": [...], "labels": [...]}` with labels aligned to the
inputs (the loss shifts them) and -100 where a token is not trained on.

- alpaca: {instruction, input?, output}; the prompt (the Stanford Alpaca template, or
  dataset.prompt_template) is masked unless train_on_input.
- chat: {messages: [{role, content}, ...]} or ShareGPT {conversations: [{from, value}, ...]};
  roles system, user, assistant and tool; assistant `tool_calls` and a record's `tools` reach the
  chat template. Only assistant turns are trained on unless train_on_input.
- prompt_completion (TRL): {prompt, completion}: two strings (tokenized as they are), or two
  message lists (rendered with the chat template); only the completion is trained on.
- text: {<text_field>: "..."}; every token is trained on; long documents become several samples.
- preference: {prompt, chosen, rejected} text or chat (for DPO); one pair sample per record
  (`kubetune.trainer.data.preference`).

`columns` renames the fields each format reads ({"instruction": "question"} reads the
instruction from the record's "question").

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
CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "tool": "tool", "function_response": "tool", "observation": "tool",
}


class TokenizerLike(Protocol):
    eos_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def tokenize_messages(self, messages: list[dict[str, Any]], tools: Any = None) -> tuple[list[int], list[bool]]: ...


def format_alpaca_prompt(instruction: str, input: str = "", template: str | None = None) -> str:
    """The prompt a model trained on alpaca records expects (eval and generate use it too);
    `template` is dataset.prompt_template ({instruction}, optional {input})."""
    if template is not None:
        return template.format(instruction=instruction, input=input)
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
    columns: dict[str, str] | None = None,
    prompt_template: str | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenize, mask, truncate. Samples left with nothing to train on (a prompt longer than
    max_seq_len) are dropped: they would add zero to the loss and cost a forward pass.
    `columns` maps a format's field names to the record's keys (dataset.columns)."""
    samples: list[dict[str, list[int]]] = []
    dropped = 0
    fields = dict(columns or {})
    if format == "text":
        fields.setdefault("text", text_field)
    for record in records:
        if fields:
            record = renamed(record, fields)
        if format == "alpaca":
            new = [alpaca_sample(record, tokenizer, train_on_input, prompt_template)]
        elif format == "chat":
            new = [chat_sample(record, tokenizer, train_on_input)]
        elif format == "prompt_completion":
            new = [prompt_completion_sample(record, tokenizer, train_on_input)]
        elif format == "text":
            new = text_samples(record, tokenizer, max_seq_len, "text")
        elif format == "preference":
            from kubetune.trainer.data.preference import preference_sample  # it builds on this module

            pair = preference_sample(record, tokenizer, max_seq_len)
            if pair is None:
                dropped += 1
            else:
                samples.append(pair)
            continue
        else:
            raise DatasetError(
                f"dataset.format '{format}': expected one of alpaca, chat, prompt_completion, text, preference"
            )
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


def renamed(record: SourceRecord, fields: dict[str, str]) -> SourceRecord:
    """The record with each mapped column also under the format's field name (errors name the column)."""
    data = dict(record.data)
    for field, column in fields.items():
        if column != field:
            data.pop(field, None)
            if column in record.data:
                data[field] = record.data[column]
    aliases = {f: c for f, c in fields.items() if c != f}
    return SourceRecord(data, record.where, aliases) if aliases else record


def alpaca_sample(
    record: SourceRecord, tokenizer: TokenizerLike, train_on_input: bool, prompt_template: str | None = None
) -> dict[str, list[int]]:
    hint = "alpaca records need instruction, output and optional input (dataset.columns renames them)"
    instruction = _text_field(record, "instruction", hint=hint)
    output = _text_field(record, "output", hint=hint)
    input_text = _text_field(record, "input", required=False)
    prompt = tokenizer.encode(format_alpaca_prompt(instruction, input_text, prompt_template), add_bos=True, add_eos=False)
    response = tokenizer.encode(output, add_bos=False, add_eos=True)
    return _prompt_response(prompt, response, train_on_input)


def chat_sample(record: SourceRecord, tokenizer: TokenizerLike, train_on_input: bool) -> dict[str, list[int]]:
    """`messages`, or ShareGPT `conversations` when the record has no `messages` (and no mapping says otherwise)."""
    name = "messages"
    if "messages" not in record.data and "conversations" in record.data and "messages" not in record.aliases:
        name = "conversations"
    messages = validate_messages(record.data.get(name), record.where, field=record.column(name))
    return _messages_sample(messages, record.data.get("tools"), tokenizer, train_on_input)


def prompt_completion_sample(record: SourceRecord, tokenizer: TokenizerLike, train_on_input: bool) -> dict[str, list[int]]:
    """TRL's prompt-completion records: strings are tokenized as they are (no template), message
    lists go through the chat template with the completion's turns as the trained part."""
    prompt, completion = record.data.get("prompt"), record.data.get("completion")
    hint = "prompt_completion records need prompt and completion, both strings or both message lists"
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DatasetError(f"{record.where}: fields '{record.column('prompt')}' and "
                               f"'{record.column('completion')}' must both be strings or both message lists ({hint})")
        prompt_messages = validate_messages(prompt, record.where, field=record.column("prompt"), need_assistant=False)
        completion_messages = validate_messages(completion, record.where, field=record.column("completion"))
        messages = prompt_messages + completion_messages
        ids, loss_mask = _tokenize_messages(tokenizer, messages, record.data.get("tools"))
        # Only assistant turns of the completion train, never an assistant turn in the prompt.
        prompt_ids, _ = _tokenize_messages(tokenizer, prompt_messages, record.data.get("tools"))
        keep = [k and i >= len(prompt_ids) for i, k in enumerate(loss_mask)]
        labels = list(ids) if train_on_input else [t if k else IGNORE_INDEX for t, k in zip(ids, keep)]
        return _first_label_ignored({"input_ids": list(ids), "labels": labels})
    prompt_ids = tokenizer.encode(_text_field(record, "prompt", hint=hint), add_bos=True, add_eos=False)
    completion_ids = tokenizer.encode(_text_field(record, "completion", hint=hint), add_bos=False, add_eos=True)
    return _prompt_response(prompt_ids, completion_ids, train_on_input)


def _tokenize_messages(tokenizer: TokenizerLike, messages: list[dict[str, Any]], tools: Any) -> tuple[list[int], list[bool]]:
    """The record's `tools` (tool schemas) reach the chat template only when there are some."""
    return tokenizer.tokenize_messages(messages, tools=tools) if tools else tokenizer.tokenize_messages(messages)


def _messages_sample(messages: list[dict[str, Any]], tools: Any, tokenizer: TokenizerLike, train_on_input: bool) -> dict:
    ids, loss_mask = _tokenize_messages(tokenizer, messages, tools)
    labels = list(ids) if train_on_input else [t if keep else IGNORE_INDEX for t, keep in zip(ids, loss_mask)]
    return _first_label_ignored({"input_ids": list(ids), "labels": labels})


def text_samples(record: SourceRecord, tokenizer: TokenizerLike, max_seq_len: int, text_field: str) -> list[dict]:
    """A document longer than max_seq_len becomes several samples (continued pretraining keeps all of it)."""
    text = _text_field(record, text_field, hint="text records need a text field (dataset.columns.text renames it)")
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    chunks = [ids[start:start + max_seq_len] for start in range(0, len(ids), max_seq_len)]
    return [_first_label_ignored({"input_ids": chunk, "labels": list(chunk)}) for chunk in chunks if len(chunk) > 1]


def validate_messages(
    messages: Any, where: str, field: str = "messages", need_assistant: bool = True
) -> list[dict[str, Any]]:
    """Checked messages in the shape chat templates take: {role, content} plus, where present,
    `tool_calls` (assistant), `tool_call_id` and `name` (tool). ShareGPT {from, value} turns are
    converted (human -> user, gpt -> assistant, function_response/observation -> tool)."""
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} objects")
    checked = []
    for i, message in enumerate(messages):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: field '{name}' must be an object with role and content")
        if "role" not in message and "from" in message:  # ShareGPT
            speaker = message.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise DatasetError(
                    f"{where}: field '{name}.from' is {speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}"
                )
            message = {"role": SHAREGPT_ROLES[speaker], "content": message.get("value")}
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise DatasetError(f"{where}: field '{name}.role' is {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and (role != "assistant" or not isinstance(tool_calls, list)):
            raise DatasetError(f"{where}: field '{name}.tool_calls' must be a list, on an assistant message")
        if not isinstance(content, str) and not (content is None and tool_calls):
            raise DatasetError(f"{where}: field '{name}.content' must be a string")
        out: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
        for key in ("tool_calls", "tool_call_id", "name"):
            if message.get(key) is not None:
                out[key] = message[key]
        checked.append(out)
    if need_assistant and not any(m["role"] == "assistant" for m in checked):
        raise DatasetError(f"{where}: field '{field}' has no assistant turn, so nothing to train on")
    return checked


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
    column = record.column(name)
    if value is None:
        if not required:
            return ""
        raise DatasetError(f"{record.where}: field '{column}' is missing" + (f" ({hint})" if hint else ""))
    if not isinstance(value, str):
        raise DatasetError(f"{record.where}: field '{column}' must be a string, got {type(value).__name__}")
    return value
