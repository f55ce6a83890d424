"""Preference pairs (what the dpo recipe trains on): records -> chosen/rejected token samples.

Record shapes (TRL's, so the same files work with both):
- text:   {"prompt": str, "chosen": str, "rejected": str}; prompt encoded with BOS, each response
          with EOS after it.
- chat:   {"prompt": [messages] | str, "chosen": [assistant messages] | str, "rejected": ...};
          rendered with the tokenizer's chat template (a str prompt is one user turn, a str
          response one assistant turn); or
          {"chosen": [whole conversation], "rejected": [whole conversation]}: the messages the two
          share are the prompt (UltraFeedback-style records with a "prompt" key work too).
A sample is {chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels}; labels are -100
on every prompt token (and on chat markup before the reply), so only responses are scored.

Too long: a prompt + response longer than max_seq_len keeps its first max_seq_len tokens (TRL's
default `truncation_mode="keep_start"`); a pair where either response keeps no token at all (the
prompt fills max_seq_len) is dropped, and the count is logged. Torch-free.
"""
from __future__ import annotations

import random
from typing import Any, Optional

from kubetune.trainer.data.formats import IGNORE_INDEX, TokenizerLike, format_alpaca_prompt, validate_messages
from kubetune.trainer.data.sources import DatasetError, SourceRecord

SIDES = ("chosen", "rejected")
HINT = "preference records need prompt, chosen and rejected (or chosen and rejected conversations)"


def preference_sample(record: SourceRecord, tokenizer: TokenizerLike, max_seq_len: int) -> Optional[dict[str, list[int]]]:
    """One record -> a pair sample, or None when truncation left a response with no token."""
    data, where = record.data, record.where
    for side in SIDES:
        if data.get(side) is None:
            raise DatasetError(f"{where}: field '{side}' is missing ({HINT})")
    if data["chosen"] == data["rejected"]:
        raise DatasetError(
            f"{where}: fields 'chosen' and 'rejected' are identical, so there is no preference to learn; "
            "fix or remove the record"
        )
    if all(isinstance(data.get(k), str) for k in ("prompt", *SIDES)):
        pairs = _text_pairs(data, tokenizer)
    else:
        pairs = _chat_pairs(data, where, tokenizer)
    sample: dict[str, list[int]] = {}
    for side, (ids, labels) in zip(SIDES, pairs):
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        labels[0] = IGNORE_INDEX  # nothing predicts a row's first token
        if all(label == IGNORE_INDEX for label in labels):
            return None
        sample[f"{side}_input_ids"], sample[f"{side}_labels"] = ids, labels
    return sample


def _text_pairs(data: dict[str, Any], tokenizer: TokenizerLike) -> list[tuple[list[int], list[int]]]:
    prompt = tokenizer.encode(data["prompt"], add_bos=True, add_eos=False)
    pairs = []
    for side in SIDES:
        response = tokenizer.encode(data[side], add_bos=False, add_eos=True)
        pairs.append((prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return pairs


def _chat_pairs(data: dict[str, Any], where: str, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    prompt, replies = split_conversations(data, where)
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    pairs = []
    for side, reply in zip(SIDES, replies):
        ids, mask = tokenizer.tokenize_messages(prompt + reply)
        if list(ids[: len(prompt_ids)]) != list(prompt_ids):
            raise DatasetError(
                f"{where}: the chat template renders the prompt differently once a reply follows, so the "
                "reply cannot be located; use a template that renders conversations incrementally"
            )
        labels = [t if keep and i >= len(prompt_ids) else IGNORE_INDEX for i, (t, keep) in enumerate(zip(ids, mask))]
        pairs.append((list(ids), labels))
    return pairs


def split_conversations(data: dict[str, Any], where: str) -> tuple[list[dict], list[list[dict]]]:
    """(prompt messages, [chosen reply messages, rejected reply messages]) of a chat record."""
    as_lists = {side: _as_messages(data[side], "assistant", where, side) for side in SIDES}
    shared = 0
    chosen, rejected = as_lists["chosen"], as_lists["rejected"]
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    if not prompt:
        if data.get("prompt") is None:
            raise DatasetError(f"{where}: field 'prompt' is missing ({HINT})")
        prompt = _as_messages(data["prompt"], "user", where, "prompt")
    prompt = validate_messages(prompt + [{"role": "assistant", "content": ""}], where)[:-1]
    replies = []
    for side in SIDES:
        reply = as_lists[side][shared:]
        if not reply or any(m.get("role") != "assistant" for m in reply):
            raise DatasetError(f"{where}: field '{side}' must end with the assistant's reply (role: assistant)")
        replies.append(validate_messages(reply, where))
    return prompt, replies


def _as_messages(value: Any, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        for i, message in enumerate(value):
            if not isinstance(message, dict):  # else the role checks below fail with an AttributeError
                raise DatasetError(f"{where}: field '{field}[{i}]' must be a {{role, content}} message, "
                                   f"got {type(message).__name__}")
        return list(value)
    raise DatasetError(f"{where}: field '{field}' must be a string or a list of {{role, content}} messages, "
                       f"got {type(value).__name__}")


def preference_records(seed: int = 0) -> list[dict[str, str]]:
    """`builtin://tiny_preference`: every fact of the synthetic task in every phrasing, as an alpaca
    prompt with the right answer chosen and a wrong answer of the same kind (drawn with `seed`)
    rejected. 36 facts x 4 phrasings = 144 records, shuffled with `seed`."""
    from kubetune.trainer.data.synthetic import FACTS, PHRASINGS, question

    rng = random.Random(seed)
    records = []
    for fact in FACTS:
        wrong = sorted({f.answer for f in FACTS if f.relation == fact.relation and f.answer != fact.answer})
        for phrasing in range(len(PHRASINGS[fact.relation])):
            records.append({
                "prompt": format_alpaca_prompt(question(fact, phrasing)),
                "chosen": fact.answer,
                "rejected": rng.choice(wrong),
            })
    rng.shuffle(records)
    return records
