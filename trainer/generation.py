"""Text generation with a KV cache: greedy (temperature 0) or sampled with temperature, top-k and
top-p; batched prompts of different lengths are left-padded. Greedy output equals transformers'
`generate(do_sample=False)` token for token."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from kubetune.trainer.models.llama import KVCache, LlamaForCausalLM


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (as transformers' warpers).

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p, and
    always at least one token."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token per row from last-position logits [B, vocab]; temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt. A row ends after `max_new_tokens` or after a stop id, which is
    included (as transformers includes EOS); decode with skip_special_tokens to drop it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.lm_head.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    # Left padding: every row's next token is predicted at the same (last) position.
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt) :] = 1
    cache = KVCache(model.args, batch, longest + max_new_tokens, device=device, dtype=model.lm_head.weight.dtype)
    generator = None
    if temperature > 0.0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    outputs: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logits = model(input_ids, attention_mask=attention_mask, kv_cache=cache)[:, -1]
    for step in range(max_new_tokens):
        next_tokens = sample_next(logits, temperature, top_k, top_p, generator)
        for row, token in enumerate(next_tokens.tolist()):
            if not finished[row]:
                outputs[row].append(token)
        finished |= torch.isin(next_tokens, stops)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        # Finished rows keep decoding a pad token whose output is ignored, so the batch stays aligned.
        next_tokens = next_tokens.masked_fill(finished, pad_id)
        logits = model(next_tokens[:, None], kv_cache=cache)[:, -1]
    return outputs
