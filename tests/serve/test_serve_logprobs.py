"""OpenAI's logprobs (completions: logprobs, echo; chat: logprobs, top_logprobs), n > 1 sharing one
prefill, and the prefix cache: the numbers equal the model's log-softmax as transformers (and peft,
for adapters) computes it."""
import httpx
import pytest
import torch

ATOL = 1e-4  # float32 log-probabilities; batching and cache reuse only change reduction order


def reference_logprobs(references, model: str, ids: list[int]) -> torch.Tensor:
    """log-softmax [len(ids), vocab] of transformers' (peft's) forward over ids."""
    with torch.no_grad():
        logits = references["models"][model](input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), -1)


def encode(references, text: str) -> list[int]:
    return references["tokenizer"](text, add_special_tokens=False).input_ids


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def greedy_ids(references, model: str, prompt_ids: list[int], count: int) -> list[int]:
    """transformers' greedy continuation, EOS ignored (the server gives the same: test_serve_api)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = references["models"][model].generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("model", ["tiny", "alpha"])
def test_completion_logprobs_equal_the_models_log_softmax(api, references, model):
    prompt = "The model is"
    result = api["client"].completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    logprobs = result.choices[0].logprobs
    prompt_ids = encode(references, prompt)
    ids = greedy_ids(references, model, prompt_ids, 8)
    ref = reference_logprobs(references, model, prompt_ids + ids)
    assert logprobs.tokens == [references["tokenizer"].decode([i]) for i in ids]
    for k, token in enumerate(ids):
        row = ref[len(prompt_ids) - 1 + k]
        assert logprobs.token_logprobs[k] == pytest.approx(float(row[token]), abs=ATOL)
        expected = torch.topk(row, 3).values.tolist()
        got = sorted(logprobs.top_logprobs[k].values(), reverse=True)
        assert got == pytest.approx(expected[: len(got)], abs=ATOL) and max(got) == pytest.approx(logprobs.token_logprobs[k], abs=ATOL)


def test_echo_with_max_tokens_0_scores_the_prompt(api, references):
    prompt = "What is the capital of France?"
    result = api["client"].completions.create(model="beta", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = result.choices[0]
    ids = encode(references, prompt)
    assert choice.text == prompt and result.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert len(choice.logprobs.tokens) == len(ids)
    ref = reference_logprobs(references, "beta", ids)
    expected = [float(ref[k - 1, ids[k]]) for k in range(1, len(ids))]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=ATOL)
    assert "".join(choice.logprobs.tokens) == prompt
    assert choice.logprobs.text_offset[1] == len(choice.logprobs.tokens[0])


def test_echo_with_generation_returns_prompt_and_completion(api, references):
    prompt = "In 2020, the team"
    plain = api["client"].completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
    echoed = api["client"].completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=0)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert len(echoed.choices[0].logprobs.tokens) == len(encode(references, prompt)) + plain.usage.completion_tokens
    assert all(top == {} for top in echoed.choices[0].logprobs.top_logprobs[1:])  # logprobs=0: no alternatives


def test_chat_logprobs_and_top_logprobs(api, references):
    messages = [{"role": "user", "content": "How are you today?"}]
    result = api["client"].chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True}
    )
    content = result.choices[0].logprobs.content
    tokenizer = references["tokenizer"]
    prompt_ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
    ids = greedy_ids(references, "tiny", prompt_ids, 6)
    ref = reference_logprobs(references, "tiny", prompt_ids + ids)
    assert [entry.token for entry in content] == [tokenizer.decode([i]) for i in ids]
    for k, entry in enumerate(content):
        row = ref[len(prompt_ids) - 1 + k]
        assert entry.logprob == pytest.approx(float(row[ids[k]]), abs=ATOL)
        assert bytes(entry.bytes) == entry.token.encode()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(torch.topk(row, 2).values.tolist(), abs=ATOL)
    plain = api["client"].chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_equal_the_whole_response(api):
    kwargs = dict(model="tiny", prompt="The model is", max_tokens=10, temperature=0, logprobs=2)
    whole = api["client"].completions.create(**kwargs)
    chunks = list(api["client"].completions.create(**kwargs, stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == whole.choices[0].logprobs.tokens
    assert values == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=ATOL)


def test_n_choices_share_one_prefill(api, references):
    url, client = api["url"], api["client"]
    prompt = "People visit the museum"
    length = len(encode(references, prompt))
    before = metric(url, "kubetune_serve_prompt_tokens_total")
    greedy = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, n=3)
    assert metric(url, "kubetune_serve_prompt_tokens_total") - before == length  # once, not 3 times
    single = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert [c.text for c in greedy.choices] == [single.choices[0].text] * 3
    sampled = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, n=4, seed=5, extra_body={"ignore_eos": True})
    first, second = client.completions.create(**sampled), client.completions.create(**sampled)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)] and len(set(texts)) > 1


def test_a_shared_prefix_comes_from_the_cache_with_the_same_output(api, references):
    url, client = api["url"], api["client"]
    system = "You are a careful assistant. Answer in one short sentence, and say when you do not know. " * 2
    cached_before = metric(url, "kubetune_serve_cached_prompt_tokens_total")
    for question in ("Why is the sky blue?", "Where is the museum?"):
        result = client.completions.create(
            model="tiny", prompt=system + question, max_tokens=6, temperature=0, logprobs=1, extra_body={"ignore_eos": True}
        )
        ids = encode(references, system + question)
        generated = greedy_ids(references, "tiny", ids, 6)
        ref = reference_logprobs(references, "tiny", ids + generated)
        expected = [float(ref[len(ids) - 1 + k, t]) for k, t in enumerate(generated)]
        assert result.choices[0].logprobs.token_logprobs == pytest.approx(expected, abs=ATOL)
    assert metric(url, "kubetune_serve_cached_prompt_tokens_total") - cached_before >= 16  # the second reused blocks


def test_the_prefix_cache_is_bounded_and_keys_by_adapter():
    from kubetune.trainer.serve.prefix_cache import BLOCK, PrefixCache

    layers, heads, dim = 2, 2, 4
    per_token = layers * heads * dim * 4 * 2  # float32 K and V
    cache = PrefixCache(max_bytes=3 * 2 * BLOCK * per_token)  # room for three 2-block prompts

    def kv(seed, length):
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(layers, heads, length, dim, generator=generator), torch.randn(layers, heads, length, dim, generator=generator)

    prompts = [[seed] * (2 * BLOCK + 3) for seed in range(5)]
    for seed, ids in enumerate(prompts):
        cache.insert(0, ids, *kv(seed, len(ids)))
        assert cache.bytes <= cache.max_bytes
    assert cache.lookup(0, prompts[0]) is None  # evicted, least recently used first
    length, keys, _ = cache.lookup(0, prompts[4] + [7])
    assert length == 2 * BLOCK and torch.equal(keys, kv(4, len(prompts[4]))[0][:, :, : 2 * BLOCK])
    assert cache.lookup(1, prompts[4]) is None  # another adapter's K/V differ
    shared = prompts[3][:BLOCK] + [99] * BLOCK  # shares only the first block with prompt 3
    assert cache.lookup(0, shared)[0] == BLOCK


def test_batched_prefill_with_mixed_lengths_and_a_cached_prefix_matches_transformers():
    from serve_helpers import make_hf_model

    from kubetune.trainer.models.llama import ModelArgs
    from kubetune.trainer.serve.runner import BatchedRunner, Prefill

    model = make_hf_model("qwen2")
    runner = BatchedRunner(model, ModelArgs.from_hf_config(model.config.to_dict()), max_slots=6, max_model_len=64, prefix_cache_bytes=2**20)
    prefix = list(range(1, 21))
    runner.prefill([Prefill("warm", prefix + [30, 31])])  # caches its first 16 tokens
    prompts = {"a": [5], "b": prefix + [40, 41, 42], "c": list(range(60, 27, -1)), "d": [7, 8, 9]}
    results = runner.prefill([Prefill(name, ids, prompt_logits=(name == "c")) for name, ids in prompts.items()])
    assert [r.cached_tokens for r in results] == [0, 16, 0, 0]
    with torch.no_grad():
        for (name, ids), result in zip(prompts.items(), results):
            ref = model(torch.tensor([ids])).logits[0].float()
            torch.testing.assert_close(result.logits, ref[-1], atol=ATOL, rtol=0)
            if name == "c":
                torch.testing.assert_close(result.prompt_logits, ref[:-1], atol=ATOL, rtol=0)
    runner.fork("b", "b2")
    nexts = [11, 12, 13, 14, 15, 16]
    stepped = runner.step(nexts)
    history = {"warm": prefix + [30, 31], **prompts, "b2": prompts["b"]}
    with torch.no_grad():
        for row, name in enumerate(runner.seq_ids):
            ref = model(torch.tensor([history[name] + [nexts[row]]])).logits[0, -1].float()
            torch.testing.assert_close(stepped[row], ref, atol=ATOL, rtol=0)
