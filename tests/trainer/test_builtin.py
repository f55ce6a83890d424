"""builtin://tiny: made on first use, the same bytes every time, safe when processes race,
and loadable by transformers as well as by kubetune."""
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.trainer.builtin import build_model_dir, resolve_model_path
from kubetune.trainer.checkpoint import load_pretrained


def test_builtin_tiny_lives_in_the_cache_dir(tiny_model_dir, kubetune_cache_dir):
    assert tiny_model_dir.is_relative_to(kubetune_cache_dir)
    assert resolve_model_path("builtin://tiny") == tiny_model_dir


def test_building_twice_gives_identical_files(tmp_path, tiny_model_dir):
    build_model_dir("tiny", tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_processes_racing_to_create_it_all_succeed(tmp_path):
    code = "from kubetune.trainer.builtin import resolve_model_path; print(resolve_model_path('builtin://tiny'))"
    env = {"KUBETUNE_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [proc.communicate(timeout=180) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == ["tiny-v1"]  # no temp folders left


def test_transformers_loads_model_and_tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.").input_ids])
    with torch.no_grad():
        diff = (load_pretrained(tiny_model_dir)(ids) - reference(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_tokenizer_compresses_english_and_round_trips(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Yesterday my friend wrote a long letter to the team because the weather was cold in London."
    ids = tokenizer(text).input_ids
    assert len(text) / len(ids) > 2.5  # whole words and sub-words, not single bytes
    assert tokenizer.decode(ids) == text
    unusual = "Zürich 🚀 naïve\ttabs  and   spaces"
    assert tokenizer.decode(tokenizer(unusual).input_ids) == unusual  # byte-level: nothing is unknown


def test_chatml_special_tokens_are_single_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer(token).input_ids) == 1
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
