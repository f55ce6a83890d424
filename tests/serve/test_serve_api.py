"""The OpenAI API of `kubetune serve`, driven by the official openai client over loopback HTTP.

Greedy outputs are compared with transformers' (and peft's, for adapters) `generate` on the same
model and adapter, tokenized by transformers' own tokenizer: the server must produce the same text,
token count and finish reason.
"""
import json

import httpx
import openai
import pytest
import torch

PROMPTS = ["The model is", "What is the capital of France?", "In 2020, the team"]


def reference(references, model: str, prompt_ids: list[int], max_new_tokens: int):
    """(text, completion_tokens, finish_reason) from transformers/peft greedy generate."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = references["models"][model].generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    new = out[0, len(prompt_ids):].tolist()
    eos = references["models"]["tiny"].generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    finish = "stop" if new and new[-1] in eos else "length"
    return references["tokenizer"].decode(new, skip_special_tokens=True), len(new), finish


def chat_prompt_ids(references, messages):
    text = references["tokenizer"].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return references["tokenizer"](text, add_special_tokens=False).input_ids


def test_models_lists_the_base_and_each_adapter(api):
    models = {m.id: m for m in api["client"].models.list().data}
    assert set(models) == {"tiny", "alpha", "beta"}
    assert models["alpha"].model_extra["parent"] == "tiny" and models["tiny"].model_extra["parent"] is None


@pytest.mark.parametrize("model", ["tiny", "alpha", "beta"])
def test_greedy_completion_equals_transformers_generate(api, references, model):
    for prompt in PROMPTS:
        ids = references["tokenizer"](prompt, add_special_tokens=False).input_ids
        text, tokens, finish = reference(references, model, ids, max_new_tokens=12)
        result = api["client"].completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        assert result.choices[0].text == text
        assert result.choices[0].finish_reason == finish
        assert result.usage.prompt_tokens == len(ids) and result.usage.completion_tokens == tokens
        assert result.usage.total_tokens == len(ids) + tokens


def test_adapters_change_the_output(api):
    """Guards the parity test above: the adapters are strong enough to give different text."""
    texts = {
        model: api["client"].completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
        for model in ("tiny", "alpha", "beta")
    }
    assert len(set(texts.values())) == 3, texts


@pytest.mark.parametrize("model", ["tiny", "beta"])
def test_greedy_chat_equals_transformers_generate_with_the_chat_template(api, references, model):
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "How are you today?"}]
    text, tokens, finish = reference(references, model, chat_prompt_ids(references, messages), max_new_tokens=10)
    result = api["client"].chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    choice = result.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
    assert result.object == "chat.completion" and result.usage.completion_tokens == tokens


def test_streaming_completion_concatenates_to_the_whole_response(api):
    client = api["client"]
    whole = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    chunks = list(
        client.completions.create(
            model="alpha", prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_chat_opens_with_the_role_and_matches_the_whole_response(api):
    client = api["client"]
    messages = [{"role": "user", "content": "What time is it?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_sequence_ends_the_text_before_it(api):
    client = api["client"]
    free = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = free.choices[0].text
    assert len(text) > 6, text
    stop = text[4:7]  # a piece from the middle of the greedy text
    cut = text[: text.index(stop)]
    stopped = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_seeded_sampling_is_reproducible_and_n_gives_several_choices(api):
    client = api["client"]
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9, n=3, seed=7, extra_body={"ignore_eos": True})
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice samples with its own stream
    assert first.usage.completion_tokens == 3 * 16
    other = client.completions.create(**{**kwargs, "seed": 8})
    assert [c.text for c in sorted(other.choices, key=lambda c: c.index)] != texts


def test_several_prompts_in_one_completion_request(api, references):
    result = api["client"].completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    for index, prompt in enumerate(PROMPTS[:2]):
        ids = references["tokenizer"](prompt, add_special_tokens=False).input_ids
        assert result.choices[index].text == reference(references, "tiny", ids, 6)[0]


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(api):
    url, client = api["url"], api["client"]
    bad_json = httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and _error(bad_json)["type"] == "invalid_request_error"

    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert unknown.value.code == "model_not_found" and "nope" in unknown.value.message

    with pytest.raises(openai.BadRequestError) as negative:
        client.completions.create(model="tiny", prompt="hi", max_tokens=-1)
    assert negative.value.param == "max_tokens"

    long_prompt = "the model is good today. " * 600  # several thousand tokens; the context is 2048
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=1)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
    assert too_many.value.code == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, presence_penalty=0.5)
    assert unsupported.value.param == "presence_penalty" and unsupported.value.code == "unsupported"

    nulls = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "temperature": None, "top_p": None, "stop": None})
    assert nulls.status_code == 200 and nulls.json()["usage"]["completion_tokens"] <= 16  # null = the default

    missing = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny"})
    assert missing.status_code == 400 and _error(missing)["param"] == "messages"
    assert _error(httpx.get(f"{url}/v1/nothing-here"))["code"] is None

    still = client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    assert still.usage.completion_tokens >= 1


def test_health_readiness_and_metrics(api):
    url = api["url"]
    api["client"].completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200
    text = httpx.get(f"{url}/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['kubetune_serve_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert samples["kubetune_serve_generated_tokens_total"] >= 4
    assert samples['kubetune_serve_time_to_first_token_seconds_count{endpoint="/v1/completions"}'] >= 1
    assert samples['kubetune_serve_request_latency_seconds_count{endpoint="/v1/completions"}'] >= 1
    assert "kubetune_serve_running_sequences" in samples and "kubetune_serve_waiting_sequences" in samples


def test_sse_wire_format_ends_with_done(api):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{api['url']}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_greedy_output_equals_kubetune_run_generate(api, tiny_dir, references, tmp_path):
    """`kubetune run generate` (the model's own KV-cache decoding) gives the same text as the server."""
    import subprocess
    import sys

    import yaml

    cases = {  # one process (each costs a torch start-up): an adapter and the chat template at once
        "adapter chat": ("beta", str(references["adapter_dirs"]["beta"]), True, "How are you today?"),
    }
    runs = {}
    for name, (_, adapter, chat, prompt) in cases.items():
        config = tmp_path / f"{name.replace(' ', '_')}.yaml"
        config.write_text(yaml.safe_dump({
            "recipe": "generate", "model": {"path": str(tiny_dir)}, "adapter": adapter, "prompt": prompt,
            "chat": chat, "max_new_tokens": 12, "temperature": 0.0, "device": "cpu",
        }))
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "run", "generate", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    client = api["client"]
    for name, (model, _, chat, prompt) in cases.items():
        stdout, stderr = runs[name].communicate(timeout=300)
        assert runs[name].returncode == 0, stderr
        if chat:
            served = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)
            text = served.choices[0].message.content
        else:
            text = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
        assert stdout.removesuffix("\n") == text, name
