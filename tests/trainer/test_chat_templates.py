"""Chat templates render the same token ids as transformers' apply_chat_template (Llama 2,
Llama 3, ChatML/Qwen2), and tokenize_messages puts exactly the assistant turns in the loss."""
import pytest
from transformers import AutoTokenizer

from kubetune.trainer.tokenizers import BUILTIN_TEMPLATES, load_tokenizer
from kubetune.trainer.tokenizers.chat_templates import CHATML_TEMPLATE, LLAMA2_TEMPLATE, LLAMA3_TEMPLATE

CONVERSATION = [
    {"role": "system", "content": "You are terse.  Answer in one line."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris — a city on the Seine."},
    {"role": "user", "content": "  And of   Germany?\n"},
    {"role": "assistant", "content": "Berlin 🚀"},
]
NO_SYSTEM = CONVERSATION[1:]


def reference_ids(tokenizer, messages, add_generation_prompt, template=None):
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, chat_template=template)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# (tokenizer folder, tokenizer.chat_template for ours, template transformers should use: None = the tokenizer's own)
CASES = {
    "llama2_sp": ("llama2_sp", "llama2", LLAMA2_TEMPLATE),  # ships no template: the config names the built-in one
    "llama3": ("llama3", None, None),
    "qwen2": ("qwen2", None, None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("messages", [CONVERSATION, NO_SYSTEM, NO_SYSTEM[:1]], ids=["system", "no_system", "one_turn"])
def test_chat_ids_equal_transformers(tokenizer_dirs, case, messages):
    folder, name, template = CASES[case]
    ours = load_tokenizer(tokenizer_dirs[folder], chat_template=name)
    reference = AutoTokenizer.from_pretrained(tokenizer_dirs[folder])
    for add_generation_prompt in (False, True):
        assert ours.apply_chat_template(messages, add_generation_prompt) == reference_ids(
            reference, messages, add_generation_prompt, template
        ), add_generation_prompt


def test_builtin_tiny_chatml_equals_transformers(tiny_model_dir):
    ours = load_tokenizer(tiny_model_dir)
    reference = AutoTokenizer.from_pretrained(tiny_model_dir)
    for add_generation_prompt in (False, True):
        assert ours.apply_chat_template(CONVERSATION, add_generation_prompt) == reference_ids(reference, CONVERSATION, add_generation_prompt)


@pytest.mark.parametrize("folder, name, expected", [
    ("llama2_sp", "llama2", LLAMA2_TEMPLATE), ("llama3", "llama3", LLAMA3_TEMPLATE), ("qwen2", "chatml", CHATML_TEMPLATE),
])
def test_without_a_template_chat_is_an_error_naming_the_matching_builtin(tokenizer_dirs, tmp_path, folder, name, expected):
    import json
    import shutil

    from kubetune.trainer.tokenizers import TokenizerError

    copy = shutil.copytree(tokenizer_dirs[folder], tmp_path / folder)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(copy)
    assert ours.chat_template is None  # no silent guess
    with pytest.raises(TokenizerError, match=f"has no chat template.*set tokenizer.chat_template.*'{name}' matches"):
        ours.apply_chat_template(NO_SYSTEM, True)
    named = load_tokenizer(copy, chat_template=name)
    assert named.chat_template == expected
    reference = AutoTokenizer.from_pretrained(copy)
    assert named.apply_chat_template(NO_SYSTEM, True) == reference_ids(reference, NO_SYSTEM, True, BUILTIN_TEMPLATES[name])


def test_a_jinja_file_overrides_the_tokenizers_template(tokenizer_dirs, tmp_path):
    from kubetune.trainer.tokenizers import TokenizerError

    (tmp_path / "t.jinja").write_text(CHATML_TEMPLATE)
    ours = load_tokenizer(tokenizer_dirs["qwen2"], chat_template=str(tmp_path / "t.jinja"))  # qwen2 ships its own
    assert ours.chat_template == CHATML_TEMPLATE != load_tokenizer(tokenizer_dirs["qwen2"]).chat_template
    reference = AutoTokenizer.from_pretrained(tokenizer_dirs["qwen2"])
    assert ours.apply_chat_template(NO_SYSTEM, True) == reference_ids(reference, NO_SYSTEM, True, CHATML_TEMPLATE)
    with pytest.raises(TokenizerError, match="tokenizer.chat_template .*missing.jinja: no such file"):
        load_tokenizer(tokenizer_dirs["qwen2"], chat_template=str(tmp_path / "missing.jinja"))
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(TokenizerError, match="not a valid Jinja template"):
        load_tokenizer(tokenizer_dirs["qwen2"], chat_template=str(tmp_path / "bad.jinja"))


def masked_runs(ids, mask):
    runs, current = [], []
    for token, keep in zip(ids, mask):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("folder, end_of_turn", [("qwen2", "<|im_end|>\n"), ("llama3", "<|eot_id|>")])
def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer_dirs, folder, end_of_turn):
    ours = load_tokenizer(tokenizer_dirs[folder])
    ids, mask = ours.tokenize_messages(CONVERSATION)
    assert ids == ours.apply_chat_template(CONVERSATION)
    runs = [ours.decode(run, skip_special_tokens=False) for run in masked_runs(ids, mask)]
    answers = [m["content"].strip() if folder == "llama3" else m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert runs == [answer + end_of_turn for answer in answers]


def test_loss_mask_llama2_sentencepiece(tokenizer_dirs):
    ours = load_tokenizer(tokenizer_dirs["llama2_sp"], chat_template="llama2")
    ids, mask = ours.tokenize_messages(NO_SYSTEM)
    assert ids == ours.apply_chat_template(NO_SYSTEM)
    runs = masked_runs(ids, mask)
    answers = [m["content"] for m in NO_SYSTEM if m["role"] == "assistant"]
    assert [ours.decode(run).strip() for run in runs] == answers
    assert all(run[-1] == ours.eos_id for run in runs)  # the model learns to stop


def test_conversation_without_assistant_has_empty_mask(tokenizer_dirs):
    ids, mask = load_tokenizer(tokenizer_dirs["qwen2"]).tokenize_messages(NO_SYSTEM[:1])
    assert ids and not any(mask)


def test_template_errors_name_the_tokenizer(tokenizer_dirs):
    from kubetune.trainer.tokenizers import TokenizerError

    ours = load_tokenizer(tokenizer_dirs["llama2_sp"], chat_template="llama2")
    with pytest.raises(TokenizerError, match="roles must alternate") as info:
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert str(tokenizer_dirs["llama2_sp"]) in str(info.value)
