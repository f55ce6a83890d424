"""Tokenizers (sentencepiece tokenizer.model, HF tokenizer.json) and chat templates. Torch-free."""
from kubetune.trainer.tokenizers.chat_templates import BUILTIN_TEMPLATES
from kubetune.trainer.tokenizers.tokenizer import Tokenizer, TokenizerError, check_vocab_matches, load_tokenizer

__all__ = ["BUILTIN_TEMPLATES", "Tokenizer", "TokenizerError", "check_vocab_matches", "load_tokenizer"]
