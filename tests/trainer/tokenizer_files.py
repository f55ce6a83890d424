"""Tokenizer folders trained in the test session, shaped like the real families' files:
a Llama 2 style sentencepiece `tokenizer.model`, and Llama 3 / Qwen2 style `tokenizer.json`."""
import json
from pathlib import Path

from kubetune.trainer.builtin import english_corpus
from kubetune.trainer.tokenizers.chat_templates import LLAMA3_TEMPLATE

EXTRA_TEXT = [
    "Zürich, Köln and Ångström: naïve café résumé — “quotes” and ‘apostrophes’.",
    "日本語のテキストと中文文本。 Ελληνικά και русский текст.",
    "Emoji 🚀🔥👍 and symbols ∑ ∫ √ ≤ ≥ € £ ¥.",
    "Code: def f(x):\n    return x ** 2  # square\n\tindented\twith\ttabs",
    "Numbers 1234567890 3.14159 -42 1e-5 2024-06-01",
]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's own template (with its default system prompt).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def corpus():
    return english_corpus(1500) + EXTRA_TEXT * 3


def make_sentencepiece_dir(folder: Path, legacy: bool = False, default_normalizer: bool = False) -> Path:
    """Llama 2 style: BPE with byte fallback, dummy prefix, whitespace kept; <unk>=0 <s>=1 </s>=2.

    `default_normalizer=True` leaves the normalizer at spm_train's defaults (`nmt_nfkc`,
    `remove_extra_whitespaces`), as many community sentencepiece models ship it; Llama's own model
    uses the identity rule and keeps whitespace."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    normalizer = {} if default_normalizer else {
        "remove_extra_whitespaces": False, "allow_whitespace_only_pieces": True, "normalization_rule_name": "identity",
    }
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(folder / "tokenizer"), vocab_size=500, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, **normalizer,
    )
    (folder / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": legacy, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _train_byte_level_bpe(specials, pattern, normalizer=None):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if normalizer == "NFC":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def make_llama3_dir(folder: Path) -> Path:
    """Llama 3 style tokenizer.json: BOS added by a TemplateProcessing post-processor."""
    from tokenizers import processors

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_byte_level_bpe(LLAMA3_SPECIALS, LLAMA3_PATTERN)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "clean_up_tokenization_spaces": True, "chat_template": LLAMA3_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def make_qwen2_dir(folder: Path) -> Path:
    """Qwen2 style tokenizer.json: NFC, no BOS, ChatML special tokens, Qwen's chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_byte_level_bpe(QWEN2_SPECIALS, QWEN2_PATTERN, normalizer="NFC")
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "unk_token": None, "clean_up_tokenization_spaces": False, "chat_template": QWEN2_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
