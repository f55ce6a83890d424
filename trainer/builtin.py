"""`builtin://tiny`: a tiny random Llama model and a real byte-level BPE tokenizer, made on first use.

Nothing is downloaded: the tokenizer is trained with the `tokenizers` library on English text
generated here, the weights come from a fixed seed, so every machine builds the same folder.
The folder lands in `$KUBETUNE_CACHE_DIR` (default `~/.cache/kubetune`) under `builtin/`; it is
built in a temporary folder and renamed into place, so processes racing to create it are safe.
Both kubetune and transformers' AutoTokenizer / AutoModelForCausalLM load it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path

from kubetune.errors import KubetuneError

BUILTIN_VERSION = "v1"  # bump when the recipe below changes, so stale caches are not reused
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
BUILTIN_MODELS = {"tiny": TINY_CONFIG}


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE_DIR") or Path.home() / ".cache" / "kubetune")


def resolve_model_path(path: str) -> Path:
    """`builtin://tiny` -> the local folder holding it (created on first use)."""
    name = path.removeprefix("builtin://")
    if name not in BUILTIN_MODELS:
        raise KubetuneError(f"model path {path!r}: unknown built-in model; available: builtin://{', builtin://'.join(BUILTIN_MODELS)}")
    folder = cache_dir() / "builtin" / f"{name}-{BUILTIN_VERSION}"
    if not (folder / "config.json").is_file():
        _create_atomically(name, folder)
    return folder


def _create_atomically(name: str, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build_model_dir(name, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_model_dir(name: str, folder: Path) -> None:
    """Write the built-in model `name` into the new folder `folder`."""
    import torch

    from kubetune.trainer.checkpoint.hf import write_model_dir
    from kubetune.trainer.models.llama import LlamaForCausalLM, ModelArgs

    tokenizer_dir = folder.parent / f"{folder.name}.tok"
    try:
        tokenizer_dir.mkdir(parents=True)
        ids = write_tokenizer(tokenizer_dir, vocab_size=BUILTIN_MODELS[name]["vocab_size"])
        config = {**BUILTIN_MODELS[name], "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
        args = ModelArgs.from_hf_config(config, source=f"builtin://{name}")
        args.generation_config = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}
        # Leave the global RNG alone: the process that happens to build this on first use must draw
        # the same numbers afterwards (LoRA init) as one that found it built; under torchrun one rank
        # builds it and the others wait, and their adapters must start equal.
        with torch.random.fork_rng(devices=[]):
            model = LlamaForCausalLM(args)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
        write_model_dir(model, folder, tokenizer_dir)
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)


def write_tokenizer(folder: Path, vocab_size: int) -> dict[str, int]:
    """Train a byte-level BPE with ChatML special tokens; write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(english_corpus(), trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": TINY_CONFIG["max_position_embeddings"],
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}


_SUBJECTS = "the model|a student|my friend|the team|our teacher|the city|this book|the old man|a small dog|the river|people|children|the engineer|she|he|they|we|you|I|the computer|the weather|a new idea".split("|")
_VERBS = "is|was|will be|has been|looks|seems|became|stays|feels|sounds".split("|")
_ADJECTIVES = "good|new|first|last|long|great|little|own|other|old|right|big|high|different|small|large|next|early|young|important|few|public|bad|same|able|happy|quiet|bright|simple|clear|warm|cold|fast|slow|strong|careful|beautiful|ready".split("|")
_ACTIONS = "reads a book|writes a letter|learns something new|walks to the park|makes dinner|answers the question|trains the model|fixes the bug|opens the window|plays music|tells a story|asks for help|finds the answer|builds a house|runs every morning|drinks some water|sends an email|thinks about the future|cleans the kitchen|visits the museum|explains the problem|counts to ten|paints a picture|watches the news|buys fresh bread".split("|")
_TIMES = "today|yesterday|tomorrow|every day|in the morning|at night|last week|next year|on Monday|in the summer|after lunch|before the meeting|right now|once again|sometimes|usually|often|never".split("|")
_PLACES = "at home|in the office|at school|in the garden|near the station|by the sea|in the kitchen|on the table|under the tree|across the street|in London|in New York|in the world|on the internet".split("|")
_CONNECTORS = "because|although|when|while|and|but|so|if|after|before|until|since".split("|")
_QUESTIONS = "What is the capital of France?|How are you today?|Why is the sky blue?|Where did you put the keys?|Who wrote this story?|Can you help me with my homework?|What time is it?|How many people live here?|Which one do you like more?|Could you explain that again?".split("|")
_ANSWERS = "The capital of France is Paris.|I am fine, thank you.|The sky is blue because of the way light scatters.|I put them on the table.|It was written by a famous author.|Of course, I would be happy to help.|It is half past three.|About two million people live here.|I like the first one more.|Sure, let me explain it step by step.".split("|")


def english_corpus(sentences: int = 4000, seed: int = 0) -> list[str]:
    """Varied English sentences, questions, answers and numbers, the same on every machine."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        kind = rng.random()
        if kind < 0.35:
            line = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADJECTIVES)} {rng.choice(_TIMES)}."
        elif kind < 0.7:
            line = f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)} {rng.choice(_CONNECTORS)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADJECTIVES)}."
        elif kind < 0.85:
            pick = rng.randrange(len(_QUESTIONS))
            line = f"{_QUESTIONS[pick]} {_ANSWERS[pick]}"
        else:
            line = f"In {rng.randint(1900, 2030)}, {rng.randint(2, 999)} of {rng.choice(_SUBJECTS)} said: \"{rng.choice(_ANSWERS)}\" ({rng.randint(1, 100)}%)"
        lines.append(line[0].upper() + line[1:])
    return lines
