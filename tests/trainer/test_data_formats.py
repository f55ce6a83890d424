"""Flexible datasets: column mapping for every format, a custom alpaca prompt, ShareGPT
`conversations`, TRL prompt/completion, the tool role and tool_calls, `.txt` files, no silent
hold-out, and data meant for another recipe refused at config time."""
import json

import pytest
from test_data import TOK, records_of, write_jsonl

from kubetune.trainer.config import ConfigError, resolve_config
from kubetune.trainer.config.finetune import DatasetSection
from kubetune.trainer.data import DatasetError, format_alpaca_prompt, load_records, tokenize_records
from kubetune.trainer.data.dataset import build_datasets
from kubetune.trainer.data.formats import IGNORE_INDEX


def tokenize(records, fmt, **kwargs):
    return tokenize_records(records_of(records), TOK, fmt, 4096, **kwargs)


# --- column mapping -----------------------------------------------------------------------------

def test_columns_rename_alpaca_fields_to_the_same_tokens():
    plain = tokenize([{"instruction": "Q?", "input": "ctx", "output": "A"}], "alpaca")
    mapped = tokenize([{"question": "Q?", "context": "ctx", "answer": "A"}], "alpaca",
                      columns={"instruction": "question", "input": "context", "output": "answer"})
    assert mapped == plain
    prompt = TOK.encode(format_alpaca_prompt("Q?", "ctx"))
    assert mapped[0]["labels"] == [IGNORE_INDEX] * len(prompt) + TOK.encode("A", add_bos=False, add_eos=True)


def test_a_missing_mapped_column_is_named_by_the_users_name():
    with pytest.raises(DatasetError, match=r"test record 1: field 'answer' is missing"):
        tokenize([{"question": "Q?"}], "alpaca", columns={"instruction": "question", "output": "answer"})


@pytest.mark.parametrize("fmt, columns, record, plain", [
    ("chat", {"messages": "dialog"}, {"dialog": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    ("text", {"text": "body"}, {"body": "some text"}, {"text": "some text"}),
    ("prompt_completion", {"prompt": "q", "completion": "a"}, {"q": "2+2=", "a": "4"}, {"prompt": "2+2=", "completion": "4"}),
    ("preference", {"prompt": "q", "chosen": "good", "rejected": "bad"}, {"q": "p", "good": "y", "bad": "n"},
     {"prompt": "p", "chosen": "y", "rejected": "n"}),
])
def test_columns_work_for_every_format(fmt, columns, record, plain):
    assert tokenize([record], fmt, columns=columns) == tokenize([plain], fmt)


def test_config_refuses_columns_the_format_does_not_read():
    with pytest.raises(ValueError, match=r"dataset.columns: output is not a field of format chat; its fields are messages, tools"):
        DatasetSection(source="x.jsonl", format="chat", columns={"output": "answer"})


# --- prompt template ----------------------------------------------------------------------------

def test_custom_prompt_template_replaces_the_alpaca_prompt():
    template = "Question: {instruction}\nContext: {input}\nAnswer: "
    (sample,) = tokenize([{"instruction": "Q?", "input": "c", "output": "A"}], "alpaca", prompt_template=template)
    prompt = TOK.encode("Question: Q?\nContext: c\nAnswer: ")
    assert sample["input_ids"] == prompt + TOK.encode("A", add_bos=False, add_eos=True)
    assert sample["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)


@pytest.mark.parametrize("template, message", [
    ("Answer: ", r"uses \{nothing\}; it must use \{instruction\}"),
    ("{instruction} {question}", r"uses \{instruction, question\}"),
    ("{instruction", "not a valid format string"),
])
def test_bad_prompt_templates_are_refused_at_config_time(template, message):
    with pytest.raises(ValueError, match=message):
        DatasetSection(source="x.jsonl", prompt_template=template)
    with pytest.raises(ValueError, match="applies to format alpaca"):
        DatasetSection(source="x.jsonl", format="chat", prompt_template="{instruction}")


# --- chat shapes --------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
]


def test_sharegpt_conversations_equal_the_same_messages():
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                                  {"from": "gpt", "value": "hello"}]}
    assert tokenize([sharegpt], "chat") == tokenize([{"messages": MESSAGES}], "chat")
    with pytest.raises(DatasetError, match=r"field 'conversations\[0\].from' is 'robot'"):
        tokenize([{"conversations": [{"from": "robot", "value": "x"}]}], "chat")


def test_prompt_completion_strings_train_only_on_the_completion():
    (sample,) = tokenize([{"prompt": "2+2=", "completion": "4"}], "prompt_completion")
    prompt, completion = TOK.encode("2+2="), TOK.encode("4", add_bos=False, add_eos=True)
    assert sample["input_ids"] == prompt + completion
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + completion


def test_conversational_prompt_completion_trains_only_on_the_completion_turns():
    record = {"prompt": MESSAGES[:2] + [{"role": "assistant", "content": "old"}, {"role": "user", "content": "again"}],
              "completion": [{"role": "assistant", "content": "new"}]}
    (sample,) = tokenize([record], "prompt_completion")
    ids, mask = TOK.tokenize_messages(record["prompt"] + record["completion"])
    trained = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]
    # Only the completion's assistant turn: the assistant turn inside the prompt is context.
    assert sample["input_ids"] == ids
    assert trained == TOK.encode("<assistant>new", add_bos=False, add_eos=True)
    with pytest.raises(DatasetError, match="both strings or both message lists"):
        tokenize([{"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}], "prompt_completion")


TOOL_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }}({{ c.function.arguments | tojson }})</call>"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tool_role_tool_calls_and_tools_reach_the_template(tiny_model_dir, tmp_path):
    from kubetune.trainer.tokenizers import load_tokenizer

    (tmp_path / "tools.jinja").write_text(TOOL_TEMPLATE)
    tokenizer = load_tokenizer(tiny_model_dir, chat_template=str(tmp_path / "tools.jinja"))
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    record = {
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "sunny", "tool_call_id": "1"},
            {"role": "assistant", "content": "It is sunny."},
        ],
    }
    (sample,) = tokenize_records(records_of([record]), tokenizer, "chat", 4096)
    text = tokenizer.decode(sample["input_ids"], skip_special_tokens=False)
    assert text.startswith('<tools>[{"type": "function"') and '<call>get_weather({"city": "Paris"})</call>' in text
    trained = tokenizer.decode([t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX],
                               skip_special_tokens=False)
    # Both assistant turns (the tool call and the answer) train; the tool's result and the user do not.
    assert trained == '<call>get_weather({"city": "Paris"})</call><|im_end|>\nIt is sunny.<|im_end|>\n'


def test_chat_data_with_a_tokenizer_without_template_says_how_to_set_one(tiny_model_dir, tmp_path):
    import shutil

    from kubetune.trainer.tokenizers import TokenizerError, load_tokenizer

    folder = shutil.copytree(tiny_model_dir, tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    with pytest.raises(TokenizerError, match=r"has no chat template.*set tokenizer.chat_template.*'chatml' matches"):
        tokenize_records(records_of([{"messages": MESSAGES}]), tokenizer, "chat", 4096)
    with_template = load_tokenizer(folder, chat_template="chatml")
    assert with_template.apply_chat_template(MESSAGES) == load_tokenizer(tiny_model_dir).apply_chat_template(MESSAGES)


# --- .txt files ---------------------------------------------------------------------------------

def test_txt_files_are_one_document_each_or_one_per_blank_line_block(tmp_path):
    (tmp_path / "a.txt").write_text("First para\nline two.\n\n\nSecond para.\n")
    (tmp_path / "b.txt").write_text("Another file.\n")
    whole = load_records(str(tmp_path / "a.txt"))
    assert [r.data["text"] for r in whole] == ["First para\nline two.\n\n\nSecond para.\n"]
    blocks = load_records(str(tmp_path / "a.txt"), txt_documents="blank_line")
    assert [r.data["text"] for r in blocks] == ["First para\nline two.", "Second para."]
    assert blocks[1].where.endswith("a.txt document 2 (line 5)")
    folder = load_records(str(tmp_path), "train", text_key="body")  # no train.* file: every .txt in the folder
    assert [r.data["body"] for r in folder] == [whole[0].data["text"], "Another file.\n"]


def test_txt_source_trains_as_text(tmp_path):
    (tmp_path / "corpus.txt").write_text("abc\n\ndefg\n")
    cfg = DatasetSection(source=str(tmp_path / "corpus.txt"), format="text", txt_documents="blank_line")
    splits = build_datasets(cfg, TOK, max_seq_len=64, seed=0)
    assert [s["input_ids"] for s in splits.train] == [TOK.encode("abc", add_eos=True), TOK.encode("defg", add_eos=True)]
    assert splits.eval is None  # eval_fraction defaults to 0: no silent hold-out


# --- the recipe a dataset belongs to -------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["lora_finetune", "full_finetune"])
def test_preference_data_in_an_sft_recipe_is_refused_naming_the_dpo_recipe(recipe):
    with pytest.raises(ConfigError, match=r"dataset.format: preference data trains with the dpo recipe"):
        resolve_config(recipe, {"model": {"path": "builtin://tiny"},
                                "dataset": {"source": "p.jsonl", "format": "preference"}})


def test_sft_formats_are_accepted():
    for fmt in ("alpaca", "chat", "prompt_completion", "text"):
        cfg = resolve_config("lora_finetune", {"model": {"path": "builtin://tiny"}, "dataset": {"source": "d", "format": fmt}})
        assert cfg.dataset.format == fmt and cfg.dataset.eval_fraction == 0.0
