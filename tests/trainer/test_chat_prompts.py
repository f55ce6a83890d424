"""Chat templates beyond training data: eval tasks with `prompt_format: chat` and `generate` with a
system prompt and a file of prompts, both checked against transformers' apply_chat_template."""
from __future__ import annotations

import json

import pytest
import torch

from kubetune.trainer.config import resolve_config

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FACTS = [
    {"question": "What sound does a cow make?", "choices": ["moo", "woof"], "answer": 0},
    {"question": "What color is the sky?", "choices": ["green", "blue"], "answer": 1},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def chat_ids(hf_tokenizer, messages) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_multiple_choice_with_chat_prompts_scores_the_answer_after_the_assistant_header(tmp_path, hf_tokenizer, hf_model):
    from kubetune.trainer.recipes.eval import recipe_main

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    cfg = resolve_config("eval", {
        "model": {"path": "builtin://tiny"}, "output_dir": str(tmp_path / "out"), "device": "cpu",
        "tasks": [{"name": "facts", "type": "multiple_choice", "path": str(data),
                   "options": {"context_field": "question", "prompt_format": "chat"}}],
    })
    recipe_main(cfg)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples_facts.jsonl").read_text().splitlines()]
    for record, sample in zip(FACTS, samples):
        context = chat_ids(hf_tokenizer, [{"role": "user", "content": record["question"]}])
        expected = []
        for choice in record["choices"]:
            # target_delimiter defaults to "" with chat: the answer is the assistant turn's first text.
            continuation = hf_tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = torch.log_softmax(hf_model(ids).logits.float(), -1)[0, len(context) - 1:-1]
            expected.append(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item())
        assert sample["loglikelihoods"] == pytest.approx(expected, abs=1e-4)


def test_generate_with_a_system_prompt_and_a_prompts_file(tmp_path, tiny_model_dir, hf_tokenizer, hf_model, capsys):
    from kubetune.trainer.recipes.generate import recipe_main

    prompts = ["What sound does a cow make?", "Say hello."]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    cfg = resolve_config("generate", {"model": {"path": "builtin://tiny"}, "prompts_file": str(tmp_path / "prompts.txt"),
                                      "system_prompt": "Answer in one word.", "max_new_tokens": 5, "device": "cpu"})
    result = recipe_main(cfg)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    for prompt, line in zip(prompts, lines):
        ids = chat_ids(hf_tokenizer, [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": prompt}])
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                    pad_token_id=hf_tokenizer.pad_token_id, eos_token_id=hf_model.generation_config.eos_token_id)
        assert line["text"] == hf_tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert result["texts"] == [line["text"] for line in lines]


def test_generate_needs_exactly_one_prompt_source():
    from kubetune.trainer.config import ConfigError

    with pytest.raises(ConfigError, match="set exactly one of prompt"):
        resolve_config("generate", {"model": {"path": "builtin://tiny"}})
    with pytest.raises(ConfigError, match="set exactly one of prompt"):
        resolve_config("generate", {"model": {"path": "builtin://tiny"}, "prompt": "a", "prompts_file": "p.txt"})
