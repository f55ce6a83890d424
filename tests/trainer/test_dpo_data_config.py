"""The dpo recipe's config (torch-free, as the operator validates it) and its preference data:
record shapes, prompt masking, truncation, bad records, the synthetic task and pair batches."""
import logging

import pytest

from kubetune.trainer.config import ConfigError, load_config, resolve_config
from kubetune.trainer.config.catalog import list_builtin_configs
from kubetune.trainer.data import DatasetError, tokenize_records
from kubetune.trainer.data.collate import collate
from kubetune.trainer.data.formats import IGNORE_INDEX
from kubetune.trainer.data.preference import preference_records
from kubetune.trainer.data.sources import SourceRecord, load_records

DPO_CONFIGS = ["tiny_dpo", "tiny_dpo_lora", "llama3_1_8b_lora_dpo", "llama3_1_8b_qlora_dpo"]


@pytest.mark.parametrize("name", DPO_CONFIGS)
def test_builtin_dpo_configs_validate_and_name_their_recipe(name):
    assert load_config(name)["recipe"] == "dpo"
    cfg = resolve_config("dpo", name)
    assert (cfg.lora is not None) == ("lora" in name)
    assert (cfg.model.quantize_base == "nf4") == ("qlora" in name)
    assert cfg.dataset.format == "preference" and cfg.beta > 0
    assert name in list_builtin_configs()["dpo"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss=kto", "loss: expected one of 'dpo', 'ipo', 'simpo', got 'kto'"),
        ("beta=0", "beta: Input should be greater than 0"),
        ("beta=-0.1", "beta: Input should be greater than 0"),
        ("label_smoothing=0.5", "label_smoothing: Input should be less than 0.5"),
        ("model.quantize_base=nf4", "model.quantize_base: a quantized base cannot be trained in full"),
        ("dataset.format=alpaca", "dataset.format: the dpo recipe trains on preference pairs"),
        ("save_merged=true", "save_merged: only for LoRA-DPO"),
    ],
)
def test_bad_dpo_settings_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        resolve_config("dpo", "tiny_dpo", [override])
    assert message in str(err.value)


class ChatTokenizer:
    """One id per character (ids 3..), BOS=1, EOS=2; a ChatML-like template rendered incrementally."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, add_bos=True, add_eos=False):
        return ([self.bos_id] if add_bos else []) + [3 + ord(c) % 200 for c in text] + ([self.eos_id] if add_eos else [])

    def _render(self, messages, add_generation_prompt=False):
        text = "".join(f"[{m['role']}]{m['content']}|" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")

    def apply_chat_template(self, messages, add_generation_prompt=False):
        return self.encode(self._render(messages, add_generation_prompt), add_bos=False)

    def tokenize_messages(self, messages):
        ids, mask = [], []
        for message in messages:
            head, body = self.encode(f"[{message['role']}]", add_bos=False), self.encode(f"{message['content']}|", add_bos=False)
            ids += head + body
            mask += [False] * len(head) + [message["role"] == "assistant"] * len(body)
        return ids, mask


TOK = ChatTokenizer()


def pairs(records, max_seq_len=4096):
    return tokenize_records([SourceRecord(r, f"data.jsonl record {i}") for i, r in enumerate(records, 1)],
                            TOK, "preference", max_seq_len)


def scored(sample, side):
    return [t for t in sample[f"{side}_labels"] if t != IGNORE_INDEX]


def test_text_pairs_score_only_the_responses():
    (sample,) = pairs([{"prompt": "Q?", "chosen": "good", "rejected": "bad"}])
    prompt = TOK.encode("Q?")
    assert sample["chosen_input_ids"] == prompt + TOK.encode("good", add_bos=False, add_eos=True)
    assert scored(sample, "chosen") == TOK.encode("good", add_bos=False, add_eos=True)
    assert scored(sample, "rejected") == TOK.encode("bad", add_bos=False, add_eos=True)


@pytest.mark.parametrize("record", [
    {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"},
    {"prompt": "ignored when the conversations share it",
     "chosen": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
     "rejected": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}]},
    {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
     "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
])
def test_chat_pairs_render_the_template_and_score_only_the_last_reply(record):
    (sample,) = pairs([record])
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    for side, reply in (("chosen", "good"), ("rejected", "bad")):
        ids, _ = TOK.tokenize_messages(prompt + [{"role": "assistant", "content": reply}])
        assert sample[f"{side}_input_ids"] == ids
        assert scored(sample, side) == TOK.encode(f"{reply}|", add_bos=False)


def test_earlier_assistant_turns_of_the_prompt_are_not_scored():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Q?"}]
    (sample,) = pairs([{"prompt": history, "chosen": "yes", "rejected": "no"}])
    assert scored(sample, "chosen") == TOK.encode("yes|", add_bos=False)


@pytest.mark.parametrize("record,message", [
    ({"prompt": "Q?", "rejected": "bad"}, "data.jsonl record 1: field 'chosen' is missing"),
    ({"prompt": "Q?", "chosen": "good"}, "data.jsonl record 1: field 'rejected' is missing"),
    ({"chosen": "good", "rejected": "bad"}, "field 'prompt' is missing"),
    ({"prompt": "Q?", "chosen": "same", "rejected": "same"}, "fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "Q?", "chosen": [{"role": "user", "content": "x"}], "rejected": "bad"}, "field 'chosen' must end with the assistant"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "messages[0].role"),
    ({"prompt": "Q?", "chosen": [None], "rejected": "b"}, "field 'chosen[0]' must be a {role, content} message"),
])
def test_bad_preference_records_name_the_record_and_field(record, message):
    with pytest.raises(DatasetError) as err:
        pairs([record])
    assert message in str(err.value)


def test_long_pairs_keep_their_start_and_pairs_without_response_tokens_are_dropped(caplog):
    long_response = {"prompt": "Q?", "chosen": "g" * 50, "rejected": "b"}
    (sample,) = pairs([long_response], max_seq_len=20)
    assert len(sample["chosen_input_ids"]) == 20  # keep_start: the first 20 tokens
    assert sample["chosen_input_ids"] == (TOK.encode("Q?") + TOK.encode("g" * 50, add_bos=False))[:20]
    assert len(sample["rejected_input_ids"]) == len(TOK.encode("Q?")) + 2
    long_prompt = {"prompt": "x" * 30, "chosen": "good", "rejected": "bad"}
    with caplog.at_level(logging.WARNING):
        assert pairs([long_prompt, long_response], max_seq_len=20) == [sample]
    assert "1 of 2 samples dropped" in caplog.text


def test_pairs_collate_to_every_chosen_then_every_rejected_row():
    samples = pairs([{"prompt": "Q?", "chosen": "good", "rejected": "bad"}, {"prompt": "Q2?", "chosen": "yes!", "rejected": "no"}])
    batch = collate(samples, pad_id=0)
    rows = [samples[0]["chosen_input_ids"], samples[1]["chosen_input_ids"], samples[0]["rejected_input_ids"],
            samples[1]["rejected_input_ids"]]
    assert batch["input_ids"].shape == (4, max(len(r) for r in rows))
    for i, row in enumerate(rows):
        assert batch["input_ids"][i, :len(row)].tolist() == row
        assert batch["attention_mask"][i].sum().item() == len(row)
    assert batch["labels"][2, :len(rows[2])].tolist() == samples[0]["rejected_labels"]


def test_the_synthetic_preference_task_is_deterministic_and_chooses_the_right_answer():
    from kubetune.trainer.data.synthetic import FACTS

    records = preference_records()
    assert records == preference_records() and len(records) == 144
    answers = {f.answer for f in FACTS}
    for record in records:
        assert record["chosen"] != record["rejected"] and {record["chosen"], record["rejected"]} <= answers
        subject = next(f for f in FACTS if f.answer == record["chosen"] and f.subject in record["prompt"])
        assert record["rejected"] in {f.answer for f in FACTS if f.relation == subject.relation}
    assert [r.data for r in load_records("builtin://tiny_preference")] == records
