"""`kubetune run eval` end to end on builtin://tiny: each task type against a transformers
reference, base + adapter, NF4 base, results files and bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from kubetune.errors import KubetuneError
from kubetune.trainer.config import resolve_config

transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

FACTS = [
    {"question": "What sound does a cow make?", "choices": ["moo", "woof", "meow"], "answer": 0},
    {"question": "What color is the sky?", "choices": ["green", "blue", "white"], "answer": 1},
    {"question": "What is the opposite of hot?", "choices": ["cold", "slow"], "answer": 0},
    {"question": "What does a dog say?", "choices": ["baa", "woof"], "answer": 1},
]
TEXTS = ["The sky is blue because of the way light scatters.", "I am fine, thank you. " * 12]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def eval_config(tmp_path, tasks, **overrides):
    return resolve_config(
        "eval",
        {"model": {"path": "builtin://tiny"}, "tasks": tasks, "output_dir": str(tmp_path / "out"), "device": "cpu", **overrides},
    )


def run_eval(cfg):
    from kubetune.trainer.recipes.eval import recipe_main

    return recipe_main(cfg)


@pytest.fixture(scope="module")
def hf_tiny():
    from kubetune.trainer.builtin import resolve_model_path

    return transformers.AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin://tiny")).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from kubetune.trainer.tokenizers import load_tokenizer

    return load_tokenizer("builtin://tiny")


def hf_sum_logprob(hf_model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(ids).logits.float(), -1)[0, len(context) - 1 : -1]
    return logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()


def test_multiple_choice_and_perplexity_equal_transformers(tmp_path, hf_tiny, tokenizer, capsys):
    mc = write_jsonl(tmp_path / "mc.jsonl", FACTS)
    ppl = write_jsonl(tmp_path / "ppl.jsonl", [{"text": t} for t in TEXTS])
    cfg = eval_config(
        tmp_path,
        [
            {"name": "facts", "type": "multiple_choice", "path": mc, "options": {"context_field": "question"}},
            {"name": "text", "type": "perplexity", "path": ppl},
        ],
        batch_size=3,
    )
    summary = run_eval(cfg)

    # Multiple choice: each choice's log-likelihood, and acc from them.
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples_facts.jsonl").read_text().splitlines()]
    correct = []
    for record, sample in zip(FACTS, samples):
        context = tokenizer.encode(record["question"])
        expected = []
        for choice in record["choices"]:
            whole = tokenizer.encode(record["question"] + " " + choice)
            expected.append(hf_sum_logprob(hf_tiny, context, whole[len(context):]))
        assert sample["loglikelihoods"] == pytest.approx(expected, abs=TOLERANCE)
        correct.append(float(max(range(len(expected)), key=expected.__getitem__) == record["answer"]))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"]["facts"]["metrics"]["acc"]["value"] == pytest.approx(sum(correct) / len(correct))
    assert results["tasks"]["facts"]["n"] == len(FACTS)

    # Perplexity: every token predicted once, first one after the prefix token (the tiny model has no BOS).
    nll, tokens = 0.0, 0
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    for text in TEXTS:
        ids = tokenizer.encode(text, add_bos=False)
        nll -= hf_sum_logprob(hf_tiny, [prefix], ids)
        tokens += len(ids)
    metrics = results["tasks"]["text"]["metrics"]
    assert metrics["perplexity"]["value"] == pytest.approx(math.exp(nll / tokens), rel=TOLERANCE)
    assert metrics["bits_per_byte"]["value"] == pytest.approx(nll / sum(len(t.encode()) for t in TEXTS) / math.log(2), rel=TOLERANCE)
    assert metrics["perplexity"]["stderr"] is None

    table = capsys.readouterr().out
    assert "| facts" in table and "acc_norm" in table and "word_perplexity" in table
    assert summary["mainMetric"].startswith("facts/acc=")


def test_generate_task_scores_greedy_generations(tmp_path, hf_tiny, tokenizer):
    prompts = ["What sound does a cow make?", "What color is the sky?", "Opposite of up:"]
    # The reference: transformers' greedy continuation, cut at the task's stop string.
    references = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = hf_tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_id)
        references.append(tokenizer.decode(out[0, ids.shape[1]:].tolist()).split("\n\n")[0])
    # Two samples expect what the model generates, one expects something else: exact_match = 2/3.
    records = [{"prompt": prompts[0], "answer": references[0]}, {"prompt": prompts[1], "answer": ["nope", references[1]]},
               {"prompt": prompts[2], "answer": references[2] + " and more"}]
    options = {"max_new_tokens": 6, "strip": False}
    cfg = eval_config(tmp_path, [{"name": "gen", "type": "generate", "path": write_jsonl(tmp_path / "g.jsonl", records), "options": options}])
    summary = run_eval(cfg)
    assert summary["tasks"]["gen"]["metrics"]["exact_match"]["value"] == pytest.approx(2 / 3)
    generated = [json.loads(line)["generated"] for line in (tmp_path / "out" / "samples_gen.jsonl").read_text().splitlines()]
    assert generated == references


def test_adapter_is_applied_and_equals_the_merged_model(tmp_path):
    from kubetune.trainer.builtin import resolve_model_path
    from kubetune.trainer.checkpoint import save_pretrained
    from kubetune.trainer.peft import merge_adapter

    model = random_adapter(tmp_path / "adapter")

    save_pretrained(merge_adapter(model), tmp_path / "merged", tokenizer_dir=resolve_model_path("builtin://tiny"))

    mc = write_jsonl(tmp_path / "mc.jsonl", FACTS)
    tasks = [{"name": "facts", "type": "multiple_choice", "path": mc, "options": {"context_field": "question"}}]
    lls = {}
    for name, overrides in {
        "base": {},
        "adapter": {"adapter": str(tmp_path / "adapter")},
        "merged": {"model": {"path": str(tmp_path / "merged")}},
    }.items():
        cfg = eval_config(tmp_path / name, tasks, **overrides)
        run_eval(cfg)
        lls[name] = [json.loads(x)["loglikelihoods"] for x in (tmp_path / name / "out" / "samples_facts.jsonl").read_text().splitlines()]
    flat = lambda rows: [v for row in rows for v in row]  # noqa: E731
    assert flat(lls["adapter"]) == pytest.approx(flat(lls["merged"]), abs=TOLERANCE)
    assert flat(lls["adapter"]) != pytest.approx(flat(lls["base"]), abs=1e-3)


def random_adapter(folder, seed: int = 0):
    """A tiny_lora-shaped adapter for builtin://tiny with random (non-zero) weights."""
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.peft import apply_lora, save_adapter

    model = apply_lora(load_pretrained("builtin://tiny"), resolve_config("lora_finetune", "tiny_lora").lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    save_adapter(model, folder, "builtin://tiny")
    return model


@pytest.mark.parametrize("with_adapter", [False, True], ids=["nf4", "nf4+adapter"])
def test_nf4_base_scores_like_the_dequantized_model(tmp_path, with_adapter):
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.peft import load_adapter
    from kubetune.trainer.quant import dequantize, quantize_base

    mc = write_jsonl(tmp_path / "mc.jsonl", FACTS)
    tasks = [{"name": "facts", "type": "multiple_choice", "path": mc, "options": {"context_field": "question"}}]
    adapter = str(tmp_path / "adapter") if with_adapter else None
    if adapter:
        random_adapter(adapter)
    run_eval(eval_config(tmp_path, tasks, model={"path": "builtin://tiny", "quantize_base": "nf4"}, adapter=adapter))
    ours = [json.loads(x)["loglikelihoods"] for x in (tmp_path / "out" / "samples_facts.jsonl").read_text().splitlines()]

    # Reference: the same NF4 round trip, written back as plain float weights (+ the same adapter).
    from kubetune.trainer.eval.runner import RunSettings, evaluate_multiple_choice
    from kubetune.trainer.eval.tasks import load_task
    from kubetune.trainer.tokenizers import load_tokenizer

    plain = load_pretrained("builtin://tiny")
    quantized = quantize_base(load_pretrained("builtin://tiny"))
    with torch.no_grad():
        for (name, param), (_, q) in zip(plain.named_parameters(), quantized.named_parameters()):
            param.copy_(dequantize(q))  # plain tensors pass through
    if adapter:
        plain = load_adapter(plain, adapter)
    reference = evaluate_multiple_choice(
        plain, load_tokenizer("builtin://tiny"), load_task("facts", "multiple_choice", mc, {"context_field": "question"}), RunSettings()
    )
    assert [v for row in ours for v in row] == pytest.approx([d for s in reference.samples for d in s["loglikelihoods"]], abs=TOLERANCE)


# ---- bad input ----------------------------------------------------------------------------------


def test_cli_reports_a_task_file_error_without_a_traceback(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps(FACTS[0]) + "\n" + json.dumps({"question": "Q?", "answer": 0}) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", "eval", "--config", "tiny_eval", f"output_dir={tmp_path / 'out'}",
         f"tasks=[{{name: mc, type: multiple_choice, path: {bad}, options: {{context_field: question}}}}]"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"error: {bad}:2: field 'choices' is missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_adapter_for_another_base_is_a_clear_error(tmp_path, hf_checkpoint):
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.peft import apply_lora, save_adapter

    lora = resolve_config("lora_finetune", "tiny_lora").lora
    other = apply_lora(load_pretrained(hf_checkpoint("llama")), lora)  # different layer shapes
    save_adapter(other, tmp_path / "adapter", "some/other-model")
    tasks = [{"name": "facts", "type": "multiple_choice", "path": write_jsonl(tmp_path / "mc.jsonl", FACTS), "options": {"context_field": "question"}}]
    with pytest.raises(KubetuneError, match="adapter"):
        run_eval(eval_config(tmp_path, tasks, adapter=str(tmp_path / "adapter")))


def test_config_errors_name_the_task():
    with pytest.raises(KubetuneError, match="tasks.0.type"):
        resolve_config("eval", {"model": {"path": "builtin://tiny"}, "tasks": [{"name": "x", "type": "mc", "path": "x.jsonl"}]})
    with pytest.raises(KubetuneError, match="task 'x': unknown option"):
        resolve_config("eval", {"model": {"path": "m"}, "tasks": [{"name": "x", "type": "generate", "path": "p", "options": {"mtch": "exact"}}]})
    with pytest.raises(KubetuneError, match="appears twice"):
        resolve_config("eval", {"model": {"path": "m"}, "tasks": ["hellaswag", "hellaswag"]})
    with pytest.raises(KubetuneError, match="not a built-in perplexity source"):
        from kubetune.trainer.eval.tasks import load_task

        load_task("x", "perplexity", "builtin://tiny_instruct_mc", {})


# ---- the demo's claim: fine-tuning moves the synthetic task from chance to clearly above -------

SYNTHETIC_MC = {"name": "facts", "type": "multiple_choice", "path": "builtin://tiny_instruct_mc", "options": {"context_field": "question"}}


@pytest.fixture(scope="module")
def finetuned_tiny(tmp_path_factory):
    """builtin://tiny after 60 full_finetune steps on the synthetic facts, as "question answer" text
    (short sequences: ~20 s on a CPU where the alpaca-prompt version needs ~250 steps)."""
    from kubetune.trainer.data.synthetic import alpaca_records
    from kubetune.trainer.recipes.full_finetune import recipe_main as full_finetune

    tmp = tmp_path_factory.mktemp("finetuned")
    data = tmp / "facts.jsonl"
    data.write_text("".join(json.dumps({"text": f"{r['input'] or r['instruction']} {r['output']}"}) + "\n" for r in alpaca_records()))
    cfg = resolve_config("full_finetune", "tiny_full", [
        f"output_dir={tmp / 'run'}", f"dataset.source={data}", "dataset.format=text", "dataset.eval_fraction=0",
        "max_seq_len=32", "batch_size=32", "max_steps=60", "epochs=100", "optimizer.lr=1e-2",
        "lr_scheduler.name=constant", "lr_scheduler.warmup_steps=5", "save_every_steps=null", "eval_every_steps=null",
        "progress_bar=false", "resume=never",
    ])
    full_finetune(cfg)
    return tmp / "run" / "model"


def test_base_model_is_near_chance_and_finetuned_model_clearly_higher(tmp_path, finetuned_tiny):
    chance = 0.25  # 4 choices per question
    base = run_eval(eval_config(tmp_path / "base", [SYNTHETIC_MC]))["tasks"]["facts"]["metrics"]["acc"]
    tuned = run_eval(eval_config(tmp_path / "tuned", [SYNTHETIC_MC], model={"path": str(finetuned_tiny)}))["tasks"]["facts"]["metrics"]["acc"]
    # 36 questions: chance +- 3 standard errors of a binomial mean is about 0.25 +- 0.22.
    assert abs(base["value"] - chance) < 3 * math.sqrt(chance * (1 - chance) / 36)
    assert tuned["value"] >= 0.7 and tuned["value"] - base["value"] > 3 * tuned["stderr"]
