"""Generate text from a prompt or a file of prompts: load the model (+ adapter), tokenize (plain,
or in the chat template with an optional system prompt), decode with a KV cache.

    kubetune run generate --config tiny_generate prompt="Once upon a time" max_new_tokens=32
    kubetune run generate --config tiny_generate prompt=null prompts_file=prompts.txt system_prompt="Be brief."

Only the generated text goes to stdout (one JSON line {prompt, text} per prompt with
prompts_file), so the output can be piped; logs go to stderr.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from kubetune.errors import KubetuneError
from kubetune.trainer.config.generate import GenerateConfig

log = logging.getLogger("kubetune.generate")


def read_prompts(path: str) -> list[str]:
    """.txt: one prompt per non-empty line; .jsonl: {"prompt": ...} per line."""
    file = Path(path)
    if not file.is_file():
        raise KubetuneError(f"prompts_file {path}: no such file")
    prompts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix.lower() == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise KubetuneError(f"prompts_file {path} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise KubetuneError(f"prompts_file {path} line {number}: expected an object with a string 'prompt'")
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise KubetuneError(f"prompts_file {path}: no prompts in it")
    return prompts


def prompt_ids(tokenizer, prompt: str, cfg: GenerateConfig) -> list[int]:
    """The tokens the model continues: the chat template (system prompt, user turn, assistant header)
    when chat or system_prompt is set, else the plain text."""
    if not cfg.uses_chat_template:
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def recipe_main(cfg: GenerateConfig) -> dict:
    from kubetune.trainer.checkpoint import load_model_args, load_pretrained
    from kubetune.trainer.device import resolve_device, resolve_dtype
    from kubetune.trainer.generation import generate
    from kubetune.trainer.tokenizers import check_vocab_matches, load_tokenizer

    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    prompts = [cfg.prompt] if cfg.prompt is not None else read_prompts(cfg.prompts_file)  # before the model loads
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    load_model_args(cfg.model.path)  # a bad model path is reported before anything else
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.tokenizer.chat_template)
    encoded = [prompt_ids(tokenizer, prompt, cfg) for prompt in prompts]
    log.info("loading %s on %s (%s)", cfg.model.path, device, cfg.dtype)
    model = load_pretrained(cfg.model.path, device=device, dtype=dtype)
    check_vocab_matches(tokenizer, model.args.vocab_size, cfg.model.path)
    if cfg.model.quantize_base == "nf4":
        from kubetune.trainer.quant.nf4 import quantize_base

        quantize_base(model)
    if cfg.adapter:
        from kubetune.trainer.peft import load_adapter

        log.info("applying adapter %s", cfg.adapter)
        model = load_adapter(model, cfg.adapter)

    started = time.perf_counter()
    outputs: list[list[int]] = []
    for start in range(0, len(encoded), cfg.batch_size):
        outputs += generate(
            model,
            encoded[start:start + cfg.batch_size],
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=cfg.seed + start,
            stop_ids=tokenizer.stop_ids,
            pad_id=tokenizer.pad_id,
        )
    seconds = time.perf_counter() - started
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    for prompt, text in zip(prompts, texts):
        print(text if cfg.prompts_file is None else json.dumps({"prompt": prompt, "text": text}), flush=True)
    new_tokens = sum(len(ids) for ids in outputs)
    log.info("%d prompt(s), %d new tokens, %.1f tokens/s", len(prompts), new_tokens, new_tokens / max(seconds, 1e-9))
    result = {"promptTokens": sum(map(len, encoded)), "newTokens": new_tokens,
              "tokensPerSecond": new_tokens / max(seconds, 1e-9)}
    if cfg.prompts_file is None:
        return {"text": texts[0], **result}
    return {"texts": texts, **result}
