"""The batched runner against transformers and peft: the same logits and the same greedy tokens while
sequences join and leave the batch at different positions, each row with its own adapter."""
import pytest
import torch
from serve_helpers import make_hf_model, make_peft_adapter

from kubetune.trainer.models.llama import ModelArgs
from kubetune.trainer.serve.adapters import load_lora_adapter
from kubetune.trainer.serve.runner import BatchedRunner, Prefill

ATOL = 1e-4  # float32 logits; batching only changes reduction order


def runner_for(model, adapters=(), max_slots=4, max_model_len=64):
    args = ModelArgs.from_hf_config(model.config.to_dict())
    return BatchedRunner(model, args, max_slots=max_slots, max_model_len=max_model_len, adapters=adapters)


def hf_greedy(model, prompt, new_tokens):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_continuous_batching_greedy_equals_transformers_generate(family):
    model = make_hf_model(family)
    runner = runner_for(model, max_slots=3)
    prompts = {"a": [1, 5, 9, 3], "b": [2, 7, 7, 7, 7, 8, 9, 11, 4, 6], "c": [3], "d": [4, 4, 2]}
    budget = {"a": 14, "b": 5, "c": 12, "d": 9}
    out = {}

    def join(name):
        out[name] = [int(runner.add(name, prompts[name]).argmax())]

    join("a")
    join("b")
    steps = 0
    while runner.seq_ids:
        logits = runner.step([out[name][-1] for name in runner.seq_ids])
        for name, row in zip(list(runner.seq_ids), logits):
            out[name].append(int(row.argmax()))
            if len(out[name]) == budget[name]:
                runner.remove(name)  # leaves mid-batch: the last row moves into its place
        steps += 1
        if steps == 2:
            join("c")  # joins while a and b are at other positions
        if steps == 6:
            join("d")  # takes the row b freed
    for name, prompt in prompts.items():
        assert out[name] == hf_greedy(model, prompt, budget[name]), name


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_prompts_prefilled_in_the_decode_steps_forward_give_transformers_greedy_tokens(family):
    """What the engine does: new prompts ride along in the running rows' decode forward (run)."""
    model = make_hf_model(family)
    runner = runner_for(model, max_slots=4)
    prompts = {"a": [1, 5, 9, 3], "b": [2, 7, 7, 7, 7, 8, 9, 11, 4, 6], "c": [3], "d": [4, 4, 2], "e": [9, 8, 7, 6, 5, 4, 3]}
    budget = {"a": 14, "b": 5, "c": 12, "d": 9, "e": 7}
    joins = {0: ["a"], 2: ["b", "c"], 5: ["d"], 7: ["e"]}  # step -> prompts joining in that step's forward
    out: dict[str, list[int]] = {}
    step = 0
    while runner.seq_ids or step in joins:
        running = list(runner.seq_ids)
        new = [Prefill(name, prompts[name]) for name in joins.get(step, [])]
        logits, results = runner.run([out[name][-1] for name in running] if running else None, new)
        for name, row in zip(running, logits if logits is not None else []):
            out[name].append(int(row.argmax()))
        for item, result in zip(new, results):
            out[item.seq_id] = [int(result.logits.argmax())]
        for name in running + [item.seq_id for item in new]:
            if len(out[name]) == budget[name]:
                runner.remove(name)
        step += 1
    for name, prompt in prompts.items():
        assert out[name] == hf_greedy(model, prompt, budget[name]), name


def test_prefill_and_decode_logits_equal_transformers_forward():
    model = make_hf_model("llama3")
    runner = runner_for(model)
    seqs = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [5, 4, 3]]
    firsts = [runner.add(i, seq) for i, seq in enumerate(seqs)]
    nexts = [20, 30]
    stepped = runner.step(nexts)
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            ref = model(torch.tensor([seq + [nexts[i]]])).logits[0]
            torch.testing.assert_close(firsts[i], ref[-2], atol=ATOL, rtol=0)
            torch.testing.assert_close(stepped[i], ref[-1], atol=ATOL, rtol=0)


def test_rows_with_different_adapters_in_one_batch_match_peft(tmp_path):
    base = make_hf_model("llama3")
    ref_a = make_peft_adapter(base, tmp_path / "a", seed=1, targets=["q_proj", "v_proj"])
    ref_b = make_peft_adapter(base, tmp_path / "b", seed=2, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=2, alpha=16.0)
    adapters = [load_lora_adapter("a", tmp_path / "a", base), load_lora_adapter("b", tmp_path / "b", base)]
    runner = runner_for(base, adapters=adapters)
    # rows: base, a, b, a -> the step groups rows per adapter (and a's rows are not contiguous)
    rows = [([1, 2, 3], 0, base), ([4, 5, 6, 7], 1, ref_a), ([8, 9], 2, ref_b), ([10, 11, 12, 13, 14], 1, ref_a)]
    # prefilled in one forward: prompts of 2-5 tokens (the padding is never computed) with per-token adapters
    firsts = runner.prefill([Prefill(i, prompt, adapter) for i, (prompt, adapter, _) in enumerate(rows)])
    nexts = [21, 22, 23, 24]
    stepped = runner.step(nexts)
    with torch.no_grad():
        for i, (prompt, _, reference) in enumerate(rows):
            ref = reference(input_ids=torch.tensor([prompt + [nexts[i]]])).logits[0]
            torch.testing.assert_close(firsts[i].logits, ref[-2], atol=ATOL, rtol=0)
            torch.testing.assert_close(stepped[i], ref[-1], atol=ATOL, rtol=0)
    # and the adapters really change the output (the comparison above is not vacuous)
    with torch.no_grad():
        plain = base(torch.tensor([rows[1][0] + [nexts[1]]])).logits[0, -1]
    assert (plain - stepped[1]).abs().max() > 1e-2


def test_dora_adapter_is_refused_with_a_hint(tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model

    from kubetune.errors import KubetuneError

    base = make_hf_model("llama3")
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(KubetuneError, match="use_dora.*kubetune merge"):
        load_lora_adapter("d", tmp_path / "dora", base)


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_bf16_runner_is_as_close_to_float32_as_transformers_bf16(family):
    """The dtype GPUs serve in: the runner's own attention, rotary and cache in bfloat16 lose no more
    than transformers does in bfloat16 (both measured against the float32 model), and stay within
    bfloat16's resolution of transformers' bfloat16 logits (8 mantissa bits: ~0.4% of logits of size ~2)."""
    reference = make_hf_model(family)
    model = make_hf_model(family).to(torch.bfloat16)
    runner = runner_for(model)
    seqs = [[(7 * t) % 90 + 1 for t in range(60)], [5, 4, 3]]  # positions up to 60: rotary angles in bf16 would drift
    firsts = runner.prefill([Prefill(i, seq) for i, seq in enumerate(seqs)])
    nexts = [20, 30]
    stepped = runner.step(nexts)
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            ids = torch.tensor([seq + [nexts[i]]])
            exact, hf_bf16 = reference(ids).logits[0], model(ids).logits[0].float()
            hf_error = (hf_bf16 - exact).abs().max()
            for ours, position in ((firsts[i].logits, -2), (stepped[i], -1)):
                assert (ours - exact[position]).abs().max() <= 1.5 * hf_error + 5e-3
                torch.testing.assert_close(ours, hf_bf16[position], atol=5e-2, rtol=0)
