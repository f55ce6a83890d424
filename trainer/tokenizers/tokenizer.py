"""Tokenizers from a model folder: Hugging Face `tokenizer.json` (the `tokenizers` library) or a
sentencepiece `tokenizer.model`, giving the same ids as `transformers.AutoTokenizer` on the same
files, plus chat templates and assistant-only loss masks. Torch-free."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from kubetune.errors import KubetuneError
from kubetune.trainer.tokenizers import chat_templates

# End-of-turn tokens of the supported families: generation stops at any of them.
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>", "<|eom_id|>")


class TokenizerError(KubetuneError):
    """A tokenizer that cannot be loaded, or that does not fit the model."""


Message = dict[str, Any]


class Tokenizer:
    """One interface over both backends; see docs/architecture.md (Tokenizer)."""

    def __init__(self, backend: "_Backend", config: dict[str, Any], path: Path, generation_eos: Sequence[int] = ()):
        self.backend = backend
        self.path = path
        self.special_tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_id = self._id_of(self.special_tokens["bos_token"])
        self.eos_id = self._id_of(self.special_tokens["eos_token"])
        pad_id = self._id_of(self.special_tokens["pad_token"])
        # Padding needs some id; it never reaches the loss or attention.
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)
        # Whether encode(add_bos=True) prepends BOS: as the tokenizer's own files say.
        self.adds_bos = self.bos_id is not None and config.get("add_bos_token", backend.adds_bos_by_default)
        # None when the tokenizer ships none: chat data then needs tokenizer.chat_template (no silent guess).
        self.chat_template: Optional[str] = _chat_template(config, path)
        stops = [self.eos_id, *generation_eos, *(self._id_of(t) for t in _END_OF_TURN_TOKENS)]
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (its largest id + 1)."""
        return self.backend.vocab_size

    def _id_of(self, token: Optional[str]) -> Optional[int]:
        return self.backend.token_to_id(token) if token else None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids; with add_bos, BOS is prepended when this tokenizer uses one (as AutoTokenizer does)."""
        ids = self.backend.encode(text)[0]
        if add_bos and self.adds_bos:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens)

    def set_chat_template(self, template: str) -> None:
        """`tokenizer.chat_template` from a config: a built-in name (llama2, llama3, chatml) or a Jinja file."""
        self.chat_template = resolve_chat_template(template)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = False, tools: Any = None) -> str:
        if self.chat_template is None:
            suggestion = chat_templates.builtin_name_for(self.backend.vocab_tokens())
            raise TokenizerError(
                f"{self.path}: this tokenizer has no chat template, so chat data cannot be rendered; set "
                f"tokenizer.chat_template to a built-in template ({', '.join(chat_templates.BUILTIN_TEMPLATES)}; "
                f"'{suggestion}' matches this tokenizer's special tokens) or to a .jinja file"
            )
        tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        try:
            return chat_templates.render(self.chat_template, messages, add_generation_prompt, tools=tools, **tokens)
        except Exception as err:  # jinja raises TemplateError, but templates index messages freely
            raise TokenizerError(f"{self.path}: chat template failed on these messages: {err}") from None

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = False, tools: Any = None) -> list[int]:
        """Ids of the rendered conversation (the template adds BOS and end-of-turn tokens itself)."""
        return self.backend.encode(self.render_chat(messages, add_generation_prompt, tools))[0]

    def tokenize_messages(self, messages: list[Message], tools: Any = None) -> tuple[list[int], list[bool]]:
        """(ids, loss_mask): the mask is True on what the assistant says, i.e. the text that follows
        the generation prompt up to and including its end-of-turn token. `tools` (a list of tool
        schemas) reaches templates that render them."""
        text = self.render_chat(messages, tools=tools)
        spans = []
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render_chat(messages[:k], add_generation_prompt=True, tools=tools) if k else ""
            after = self.render_chat(messages[: k + 1], tools=tools)
            if not text.startswith(after) or not after.startswith(before):
                raise TokenizerError(
                    f"{self.path}: the chat template does not render conversations incrementally, so assistant "
                    "turns cannot be located for the loss mask; use a template whose output for the first k "
                    "messages is a prefix of the output for all of them"
                )
            spans.append((len(before), len(after)))
        ids, starts = self.backend.encode(text)
        mask = [any(begin <= start < end for begin, end in spans) for start in starts]
        return ids, mask


def _token_text(value: Any) -> Optional[str]:
    """Special tokens appear as strings or as AddedToken dicts ({"content": ...}) in tokenizer_config.json."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def resolve_chat_template(template: str) -> str:
    """A built-in template by name, or the text of a Jinja template file."""
    if template in chat_templates.BUILTIN_TEMPLATES:
        return chat_templates.BUILTIN_TEMPLATES[template]
    file = Path(template).expanduser()
    if not file.is_file():
        raise TokenizerError(
            f"tokenizer.chat_template {template}: no such file; name a built-in template "
            f"({', '.join(chat_templates.BUILTIN_TEMPLATES)}) or a readable .jinja file"
        )
    text = file.read_text(encoding="utf-8")
    try:
        chat_templates.compile_template(text)
    except Exception as err:  # jinja's TemplateSyntaxError
        raise TokenizerError(f"tokenizer.chat_template {template}: not a valid Jinja template ({err})") from None
    return text


def _chat_template(config: dict[str, Any], path: Path) -> Optional[str]:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    if (path / "chat_template.jinja").is_file():  # transformers 5 saves it beside tokenizer_config.json
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


class _Backend:
    adds_bos_by_default = False
    vocab_size: int

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, start character of each token), no BOS/EOS added."""
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def vocab_tokens(self) -> set[str]:
        raise NotImplementedError


class _HFTokenizerJson(_Backend):
    """tokenizer.json through the `tokenizers` library: the same engine AutoTokenizer runs."""

    def __init__(self, file: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tokenizer = HFTokenizer.from_file(str(file))
        except Exception as err:
            raise TokenizerError(f"{file}: not a readable tokenizer.json ({err})") from None
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._vocab = set(vocab)
        # The post-processor (e.g. Llama 3's TemplateProcessing) decides whether BOS is added.
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        full = self.tokenizer.encode("a", add_special_tokens=True).ids
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
        self.adds_bos_by_default = bool(starts and starts[0] > 0)

    def encode(self, text):
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [start for start, _ in encoding.offsets]

    def decode(self, ids, skip_special_tokens):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.tokenizer.token_to_id(token)

    def vocab_tokens(self):
        return self._vocab


class _SentencePiece(_Backend):
    """tokenizer.model, tokenized as transformers' converted Llama tokenizer does it.

    transformers splits the text at special tokens and gives only the first piece of text the
    sentencepiece "dummy prefix" space (with `legacy: true`, every piece), and never doubles a
    space the text already starts with. We reproduce that with a copy of the model whose own
    dummy prefix is switched off.
    """

    adds_bos_by_default = True  # LlamaTokenizer's add_bos_token default

    def __init__(self, file: Path, config: dict[str, Any]):
        import sentencepiece as spm

        try:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(file.read_bytes())
        except Exception as err:
            raise TokenizerError(f"{file}: not a readable sentencepiece model ({err})") from None
        self.dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        proto.normalizer_spec.add_dummy_prefix = False
        # transformers' Llama tokenizer never applies the model's own normalizer: no NFKC, no
        # collapsing of repeated spaces, only " " -> "▁". sentencepiece's defaults (`nmt_nfkc`,
        # `remove_extra_whitespaces`, as `spm_train` writes them) would turn "\n" into "▁" and "a  b"
        # into "a b"; switching the rule off gives transformers' ids on such models too.
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.precompiled_charsmap = b""
        proto.normalizer_spec.remove_extra_whitespaces = False
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.legacy = bool(config.get("legacy", False))
        self.vocab_size = self.sp.get_piece_size()
        self._vocab = {self.sp.id_to_piece(i) for i in range(self.vocab_size)}
        self.special = {
            self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        for token in (_token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")):
            if token and self.sp.piece_to_id(token) != self.sp.unk_id():
                self.special[token] = self.sp.piece_to_id(token)
        self._decoder = _llama_decoder(self.dummy_prefix)
        names = sorted(self.special, key=len, reverse=True)  # longest first, like the tokenizers library
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None

    def encode(self, text):
        ids: list[int] = []
        starts: list[int] = []
        pieces = self._split.split(text) if self._split else [text]
        offset = 0
        for index, piece in enumerate(pieces):
            if piece in self.special and index % 2 == 1:
                ids.append(self.special[piece])
                starts.append(offset)
            elif piece:
                first = offset == 0
                prefix = self.dummy_prefix and (self.legacy or first) and not piece.startswith(" ")
                self._encode_text((" " if prefix else "") + piece, offset - (1 if prefix else 0), ids, starts)
            offset += len(piece)
        return ids, starts

    def _encode_text(self, text: str, offset: int, ids: list[int], starts: list[int]) -> None:
        encoded = self.sp.encode(text, return_type="proto")
        # sentencepiece reports byte offsets; map them to character offsets.
        char_at_byte = []
        for position, char in enumerate(text):
            char_at_byte.extend([position] * len(char.encode("utf-8")))
        char_at_byte.append(len(text))
        for piece in encoded.pieces:
            ids.append(piece.id)
            starts.append(max(offset + char_at_byte[min(piece.begin, len(char_at_byte) - 1)], 0))

    def decode(self, ids, skip_special_tokens):
        special_ids = set(self.special.values())
        pieces = [self.sp.id_to_piece(i) for i in ids if not (skip_special_tokens and i in special_ids)]
        return self._decoder.decode(pieces)

    def token_to_id(self, token):
        if token in self.special:
            return self.special[token]
        token_id = self.sp.piece_to_id(token)
        return None if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id) else token_id

    def vocab_tokens(self):
        return self._vocab


def _llama_decoder(strip_dummy_prefix: bool):
    """The decoder transformers builds for sentencepiece Llama tokenizers: ▁ -> space, <0xNN> -> bytes,
    then one leading space (the dummy prefix) removed."""
    from tokenizers import decoders

    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def load_tokenizer(path: str | os.PathLike, chat_template: Optional[str] = None) -> Tokenizer:
    """The tokenizer in a model or tokenizer folder (`tokenizer.json` preferred, else `tokenizer.model`);
    `chat_template` (a built-in name or a .jinja file) replaces the tokenizer's own template."""
    tokenizer = _load_tokenizer(path)
    if chat_template is not None:
        tokenizer.set_chat_template(chat_template)
    return tokenizer


def _load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    folder = _local_path(path)
    if folder.is_file():  # a tokenizer file given directly
        folder, files = folder.parent, [folder]
    else:
        files = [folder / "tokenizer.json", folder / "tokenizer.model"]
    config = _read_json_if_exists(folder / "tokenizer_config.json")
    for key, value in _read_json_if_exists(folder / "special_tokens_map.json").items():
        config.setdefault(key, value)
    generation = _read_json_if_exists(folder / "generation_config.json").get("eos_token_id")
    generation_eos = generation if isinstance(generation, list) else [generation] if isinstance(generation, int) else []
    for file in files:
        if file.is_file() and file.name.endswith(".json"):
            return Tokenizer(_HFTokenizerJson(file), config, folder, generation_eos)
        if file.is_file() and file.name.endswith(".model"):
            return Tokenizer(_SentencePiece(file, config), config, folder, generation_eos)
    raise TokenizerError(
        f"{folder}: no tokenizer.json or tokenizer.model; point tokenizer.path at the folder holding the tokenizer"
    )


def _local_path(path: str | os.PathLike) -> Path:
    text = str(path)
    if text.startswith("builtin://"):
        from kubetune.trainer.builtin import resolve_model_path

        return resolve_model_path(text)
    from kubetune.trainer.hub import is_hub_id, resolve_hub_model

    if is_hub_id(text):
        return resolve_hub_model(text)
    if "://" in text:
        raise TokenizerError(f"tokenizer path {text!r}: expected a local folder, a Hub id (org/name) or builtin://tiny")
    folder = Path(text).expanduser()
    if not folder.exists():
        raise TokenizerError(f"tokenizer path {folder}: no such file or folder")
    return folder


def check_vocab_matches(tokenizer: Tokenizer, model_vocab_size: int, model_path: str | os.PathLike = "the model") -> None:
    """Every id the tokenizer can produce must have an embedding row; raise a clear error if not."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.path} produces ids up to {tokenizer.vocab_size - 1}, but {model_path} "
            f"has vocab_size={model_vocab_size} (config.json); use the tokenizer that belongs to this model "
            "(set tokenizer.path, or leave it empty to use the model folder's tokenizer)"
        )


def _read_json_if_exists(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}
