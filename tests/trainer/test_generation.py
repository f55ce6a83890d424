"""Generation: greedy equals transformers generate(do_sample=False) token for token (also for a
left-padded batch), KV-cache logits equal a full recompute (<= 1e-5), sampling filters equal
transformers' warpers, seeds reproduce, stop ids stop; and the CLI prints only the text."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from kubetune.trainer.checkpoint import load_pretrained
from kubetune.trainer.generation import filter_logits, generate
from kubetune.trainer.models import KVCache

ATOL = 1e-5
PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [8, 64], [120, 1, 2, 3]]


def hf_greedy(reference, prompts, max_new_tokens, stop_ids, pad_id=0):
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(stop_ids) or None, pad_token_id=pad_id)
    rows = []
    for row in out[:, longest:].tolist():
        for end, token in enumerate(row):  # cut after the first stop id, as ours does
            if token in stop_ids:
                row = row[: end + 1]
                break
        rows.append(row)
    return rows


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral"])
def test_greedy_equals_transformers_for_a_padded_batch(hf_checkpoint, family):
    folder = hf_checkpoint(family)
    ours = load_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    ours_out = generate(ours, PROMPTS, max_new_tokens=28)
    assert all(len(row) == 28 for row in ours_out)  # 35 tokens: past the rope threshold and sliding window
    assert ours_out == hf_greedy(reference, PROMPTS, 28, stop_ids=())
    assert generate(ours, PROMPTS[1:2], max_new_tokens=28) == ours_out[1:2]  # batching does not change a row


def test_greedy_equals_transformers_with_stop_ids(tiny_model_dir):
    ours = load_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    free = generate(ours, PROMPTS, max_new_tokens=12)
    stop = free[0][4]  # a token the first row produces: it must end there
    stopped = generate(ours, PROMPTS, max_new_tokens=12, stop_ids=[stop])
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    assert stopped == hf_greedy(reference, PROMPTS, 12, stop_ids=[stop])


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_kv_cache_logits_equal_full_recompute(hf_checkpoint, family):
    model = load_pretrained(hf_checkpoint(family))
    ids = torch.randint(0, 128, (2, 36), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache(model.args, batch_size=2, max_len=36)
        steps = [model(ids[:, :10], attention_mask=mask[:, :10], kv_cache=cache)]
        for t in range(10, 36, 3):  # chunks of 3, then single tokens
            steps.append(model(ids[:, t : t + 3], attention_mask=mask[:, t : t + 3], kv_cache=cache))
    incremental = torch.cat(steps, dim=1)
    keep = mask.bool()
    assert (incremental[keep] - full[keep]).abs().max().item() <= ATOL


@pytest.mark.parametrize("top_k, top_p", [(None, 0.9), (5, 1.0), (10, 0.5), (None, 0.01)])
def test_filters_equal_transformers_warpers(top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    want = logits.clone()
    if top_k is not None:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    got = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(tiny_model_dir):
    model = load_pretrained(tiny_model_dir)
    sample = lambda seed: generate(model, PROMPTS, 16, temperature=1.0, seed=seed)  # noqa: E731
    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    greedy = generate(model, PROMPTS, 16)
    assert generate(model, PROMPTS, 16, temperature=0.7, top_k=1, seed=5) == greedy


def test_empty_prompt_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="at least one token"):
        generate(load_pretrained(tiny_model_dir), [[]], 4)


def test_cli_prints_only_the_generated_text(tiny_model_dir):
    from kubetune.trainer.tokenizers import load_tokenizer

    prompt = "Hello there"
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", "generate", "--config", "tiny_generate", f"prompt={prompt}", "max_new_tokens=8"],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer(tiny_model_dir)
    expected = tokenizer.decode(generate(load_pretrained(tiny_model_dir), [tokenizer.encode(prompt)], 8, stop_ids=tokenizer.stop_ids)[0])
    assert result.stdout == expected + "\n"
    assert "new tokens" in result.stderr  # logs went to stderr


def test_cli_reports_bad_model_path_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", "generate", "--config", "tiny_generate", f"model.path={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "no config.json" in last_line and "Traceback" not in result.stderr


def test_recipe_rejects_a_tokenizer_that_does_not_fit_the_model(hf_checkpoint, tiny_model_dir):
    from kubetune.trainer.config import resolve_config
    from kubetune.trainer.recipes.generate import recipe_main
    from kubetune.trainer.tokenizers import TokenizerError

    small_model = hf_checkpoint("llama")  # vocab_size 128; the tiny tokenizer has 1024 ids
    cfg = resolve_config("generate", {"model": {"path": str(small_model)}, "tokenizer": {"path": str(tiny_model_dir)}, "prompt": "hi"})
    with pytest.raises(TokenizerError, match="vocab_size=128") as info:
        recipe_main(cfg)
    assert str(tiny_model_dir) in str(info.value)


def test_recipe_with_adapter_equals_peft_greedy(tiny_model_dir, tmp_path, capsys):
    """cfg.adapter goes through kubetune.trainer.peft.load_adapter; the text equals transformers +
    peft greedy decoding with the same adapter folder."""
    from lora_fixtures import randomize_adapters
    from peft import PeftModel
    from transformers import AutoTokenizer

    from kubetune.trainer.config import resolve_config
    from kubetune.trainer.config.lora import LoRASection
    from kubetune.trainer.peft import apply_lora, save_adapter
    from kubetune.trainer.recipes.generate import recipe_main
    from kubetune.trainer.tokenizers import load_tokenizer

    model = load_pretrained(tiny_model_dir)
    apply_lora(model, LoRASection(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(model, scale=0.5)
    adapter = save_adapter(model, tmp_path / "adapter", str(tiny_model_dir))

    prompt = "The capital of France"
    cfg = resolve_config("generate", {"model": {"path": "builtin://tiny"}, "adapter": str(adapter), "prompt": prompt,
                                      "max_new_tokens": 10, "device": "cpu"})
    summary = recipe_main(cfg)
    assert capsys.readouterr().out == summary["text"] + "\n"

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    ids = torch.tensor([tokenizer(prompt).input_ids])
    out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=list(load_tokenizer(tiny_model_dir).stop_ids), pad_token_id=tokenizer.pad_token_id)
    assert summary["text"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    base_text = tokenizer.decode(generate(load_pretrained(tiny_model_dir), [ids[0].tolist()], 10)[0], skip_special_tokens=True)
    assert summary["text"] != base_text  # the adapter really changed the model
