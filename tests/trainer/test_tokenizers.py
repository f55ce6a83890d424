"""Our tokenizers give the same ids as transformers.AutoTokenizer on the same files (sentencepiece
tokenizer.model and tokenizer.json), decode back, and fail clearly on bad input."""
import pytest
from transformers import AutoTokenizer

from kubetune.trainer.tokenizers import TokenizerError, check_vocab_matches, load_tokenizer

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    " leading space",
    "trailing space ",
    "two  spaces,   three,\tone tab,\t\ttwo tabs",
    "lines\nand\n\nblank lines\n",
    "   ",
    "",
    "Zürich naïve café — “quotes” ‘x’",
    "日本語 русский Ελληνικά 🚀🔥 ∑ €",
    "numbers 1234567 and 3.14159",
    "don't I'm we've they're it's",
    "spaced punctuation . , ! ? do n't I 'm",
]
# sp_default_normalizer: a sentencepiece model with spm_train's default normalizer (nmt_nfkc,
# remove_extra_whitespaces), which transformers ignores: "\n" is a byte token, spaces are kept.
FAMILIES = ["llama2_sp", "llama2_sp_legacy", "llama3", "qwen2", "sp_default_normalizer"]
SPECIAL_TEXTS = {
    "llama2_sp": ["<s>hi</s> there", "a</s>b", "x <s> y", "<unk>"],
    "llama2_sp_legacy": ["<s>hi</s> there", "a\n<s>\nb", "x <s> y"],
    "llama3": ["<|begin_of_text|>hi<|eot_id|>", "a<|start_header_id|>user<|end_header_id|>\n\nb"],
    "qwen2": ["<|im_start|>user\nhi<|im_end|>\n", "x<|endoftext|>y"],
    "sp_default_normalizer": ["a\nb", "ﬁ ligature ① and full-width ＡＢＣ", "x\u3000y  z", "<s>hi</s> there"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_equal_autotokenizer(tokenizer_dirs, family):
    ours = load_tokenizer(tokenizer_dirs[family])
    reference = AutoTokenizer.from_pretrained(tokenizer_dirs[family])
    for text in TEXTS + SPECIAL_TEXTS[family]:
        assert ours.encode(text) == reference(text).input_ids, text
        assert ours.encode(text, add_bos=False) == reference(text, add_special_tokens=False).input_ids, text


def test_builtin_tiny_ids_equal_autotokenizer(tiny_model_dir):
    ours = load_tokenizer("builtin://tiny")
    reference = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == reference(text).input_ids, text


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_equals_autotokenizer(tokenizer_dirs, family):
    ours = load_tokenizer(tokenizer_dirs[family])
    reference = AutoTokenizer.from_pretrained(tokenizer_dirs[family])
    for text in TEXTS + SPECIAL_TEXTS[family]:
        ids = reference(text).input_ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), (text, skip)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_ids_and_vocab_size(tokenizer_dirs, family):
    ours = load_tokenizer(tokenizer_dirs[family])
    reference = AutoTokenizer.from_pretrained(tokenizer_dirs[family])
    assert ours.bos_id == reference.bos_token_id
    assert ours.eos_id == reference.eos_token_id
    assert ours.vocab_size == len(reference)
    assert ours.eos_id in ours.stop_ids


def test_add_eos_appends_eos(tokenizer_dirs):
    ours = load_tokenizer(tokenizer_dirs["llama3"])
    assert ours.encode("hi", add_eos=True) == ours.encode("hi") + [ours.eos_id]


def test_vocab_mismatch_is_a_clear_error(tokenizer_dirs):
    ours = load_tokenizer(tokenizer_dirs["qwen2"])
    check_vocab_matches(ours, ours.vocab_size)  # equal: fine
    check_vocab_matches(ours, ours.vocab_size + 64)  # padded embedding (as Qwen2 ships): fine
    with pytest.raises(TokenizerError, match=r"vocab_size=100 .*tokenizer\.path") as info:
        check_vocab_matches(ours, 100, "models/tiny")
    assert str(tokenizer_dirs["qwen2"]) in str(info.value) and "models/tiny" in str(info.value)


def test_missing_tokenizer_files_are_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no such file or folder"):
        load_tokenizer(tmp_path / "nope")


def test_corrupt_tokenizer_files_are_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a readable tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model: not a readable sentencepiece model"):
        load_tokenizer(tmp_path)


def test_tokenizers_do_not_import_torch(tokenizer_dirs):
    """The tokenizer package stays torch-free (docs/architecture.md), e.g. for light data tooling."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom kubetune.trainer.tokenizers import load_tokenizer\n"
        f"tokenizer = load_tokenizer({str(tokenizer_dirs['llama2_sp'])!r}, chat_template='llama2')\n"
        "tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
