"""Generate text from a prompt: load the model (+ adapter), tokenize, decode with a KV cache.

    kubetune run generate --config tiny_generate prompt="Once upon a time" max_new_tokens=32

Only the generated text goes to stdout, so the output can be piped; logs go to stderr.
"""
from __future__ import annotations

import logging
import sys
import time

from kubetune.trainer.config.generate import GenerateConfig

log = logging.getLogger("kubetune.generate")


def recipe_main(cfg: GenerateConfig) -> dict:
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.device import resolve_device, resolve_dtype
    from kubetune.trainer.generation import generate
    from kubetune.trainer.tokenizers import check_vocab_matches, load_tokenizer

    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    log.info("loading %s on %s (%s)", cfg.model.path, device, cfg.dtype)
    model = load_pretrained(cfg.model.path, device=device, dtype=dtype)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    check_vocab_matches(tokenizer, model.args.vocab_size, cfg.model.path)
    if cfg.model.quantize_base == "nf4":
        from kubetune.trainer.quant.nf4 import quantize_base

        quantize_base(model)
    if cfg.adapter:
        from kubetune.trainer.peft import load_adapter

        log.info("applying adapter %s", cfg.adapter)
        model = load_adapter(model, cfg.adapter)

    if cfg.chat:
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": cfg.prompt}], add_generation_prompt=True)
    else:
        prompt_ids = tokenizer.encode(cfg.prompt)
    started = time.perf_counter()
    new_ids = generate(
        model,
        [prompt_ids],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
        stop_ids=tokenizer.stop_ids,
        pad_id=tokenizer.pad_id,
    )[0]
    seconds = time.perf_counter() - started
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    print(text, flush=True)
    log.info("%d prompt tokens, %d new tokens, %.1f tokens/s", len(prompt_ids), len(new_ids), len(new_ids) / max(seconds, 1e-9))
    return {"text": text, "promptTokens": len(prompt_ids), "newTokens": len(new_ids), "tokensPerSecond": len(new_ids) / max(seconds, 1e-9)}
