"""The model side of the server: per-sequence KV cache rows, batched decode, per-row LoRA adapters.

Why not the model's own `forward(kv_cache=...)`: continuous batching needs every row of a batch at
its own position (sequences join and leave between steps) and every row with its own adapter. So
this module runs the model's decoder layers itself — it calls the model's own embedding, norms and
projection modules (parameter names are Hugging Face's, see docs/architecture.md) and does rotary
embeddings and attention over its own cache. `tests/serve/test_serve_runner.py` checks that the logits
equal transformers' (and peft's, with adapters).

The cache is one tensor per K and V: [layers, max_slots, kv_heads, max_model_len, head_dim]. Running
sequences occupy rows 0..B-1 (compacted when one leaves), so a decode step attends over the view
cache[:, :B, :, :longest] without copying, and rows shorter than the longest are masked. A leaving
sequence costs one copy of the last row into its place (its real length only), once; a slot
indirection instead would cost a gather of every row at every step.

New sequences are prefilled together: one forward over their prompts right-padded to the longest
(padding writes K/V past each row's length, which later steps mask and then overwrite), each row
starting at its own position, so a row can resume after a prefix copied from the prefix cache.
`fork` copies a prefilled row for the other choices of an n > 1 request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch
import torch.nn.functional as F

from kubetune.trainer.models.llama import ModelArgs, rope_inverse_frequencies, rotate_half
from kubetune.trainer.serve.adapters import LoraAdapter
from kubetune.trainer.serve.prefix_cache import PrefixCache


@dataclass
class Prefill:
    """One sequence to prefill: its prompt, adapter, and whether every prompt position's logits are
    wanted (scoring a prompt: echo with logprobs); the prefix cache is not used for those."""

    seq_id: Hashable
    prompt_ids: Sequence[int]
    adapter: int = 0
    prompt_logits: bool = False


@dataclass
class Prefilled:
    logits: torch.Tensor  # float32 [vocab]: the next token after the prompt
    prompt_logits: Optional[torch.Tensor] = None  # float32 [len - 1, vocab]: predictions of prompt tokens 1..
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed


class BatchedRunner:
    """Runs sequences of a Llama-family model (kubetune's, or transformers' with the same names), several at a time.

    `add` prefills a new sequence into a free cache row and returns its next-token logits; `step`
    decodes one token for every sequence at once; `remove` frees a row. Adapter index 0 is the
    base model, i is adapters[i-1].
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: ModelArgs,
        *,
        max_slots: int,
        max_model_len: int,
        adapters: Sequence[LoraAdapter] = (),
        prefix_cache_bytes: int = 0,
    ) -> None:
        self.model = model.eval()
        embed = model.model.embed_tokens.weight
        self.device, self.dtype = embed.device, embed.dtype
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.sliding_window = args.sliding_window
        self.n_layers = len(model.model.layers)
        self.max_slots, self.max_model_len = max_slots, max_model_len
        self.inv_freq = rope_inverse_frequencies(args).to(self.device)
        shape = (self.n_layers, max_slots, self.n_kv_heads, max_model_len + 1, self.head_dim)  # +1: padding's slot
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.seq_ids: list[Hashable] = []  # row i holds seq_ids[i]
        self.lengths: list[int] = []  # tokens in the cache per row
        self.row_adapters: list[int] = []
        # (layer, projection) -> [None for the base model, (A, B, scale) or None per adapter]
        self.lora: dict[tuple[int, str], list[Optional[tuple[torch.Tensor, torch.Tensor, float]]]] = {}
        for index, adapter in enumerate(adapters, start=1):
            for key, (a, b) in adapter.weights.items():
                slots = self.lora.setdefault(key, [None] * (len(adapters) + 1))
                slots[index] = (a.to(self.device, self.dtype), b.to(self.device, self.dtype), adapter.scale)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self.seq_ids)

    def add(self, seq_id: Hashable, prompt_ids: Sequence[int], adapter: int = 0) -> torch.Tensor:
        """Prefill one new sequence; returns float32 logits [vocab] for its first generated token."""
        return self.prefill([Prefill(seq_id, prompt_ids, adapter)])[0].logits

    @torch.inference_mode()
    def prefill(self, new: Sequence[Prefill]) -> list[Prefilled]:
        """Prefill several new sequences in one forward (right-padded), each into a free cache row.

        With the prefix cache, a row starts after the longest cached prefix of its prompt (its K/V
        are copied in) and only the rest is computed."""
        if len(new) > self.free_slots:
            raise RuntimeError("no free cache row; the scheduler admits at most max_slots sequences")
        for item in new:
            if not 0 < len(item.prompt_ids) <= self.max_model_len:
                raise ValueError(f"prompt of {len(item.prompt_ids)} tokens does not fit max_model_len={self.max_model_len}")
        first = len(self.seq_ids)
        rows = range(first, first + len(new))
        for item in new:
            self.seq_ids.append(item.seq_id)
            self.lengths.append(0)
            self.row_adapters.append(item.adapter)
        try:
            starts = [self._reuse_prefix(row, item) for row, item in zip(rows, new)]
            width = max(len(item.prompt_ids) - start for item, start in zip(new, starts))
            tokens = torch.zeros((len(new), width), dtype=torch.long)
            positions = torch.zeros((len(new), width), dtype=torch.long)
            for i, (item, start) in enumerate(zip(new, starts)):
                rest = list(item.prompt_ids[start:])
                tokens[i, : len(rest)] = torch.tensor(rest)
                positions[i, : len(rest)] = torch.arange(start, len(item.prompt_ids))
                # padding writes its K/V into the slot after the prompt (masked, then overwritten by
                # the first decode step; the cache has one spare slot for a prompt of max_model_len)
                positions[i, len(rest) :] = len(item.prompt_ids)
            hidden = self._forward(
                tokens.to(self.device), positions.to(self.device), rows=slice(first, first + len(new)),
                adapters=[item.adapter for item in new],
            )
        except BaseException:
            for item in new:
                if item.seq_id in self.seq_ids:
                    self.remove(item.seq_id)
            raise
        last = torch.tensor([len(item.prompt_ids) - start - 1 for item, start in zip(new, starts)], device=self.device)
        logits = self.model.lm_head(hidden[torch.arange(len(new), device=self.device), last]).float()
        results = []
        for i, (row, item, start) in enumerate(zip(rows, new, starts)):
            self.lengths[row] = len(item.prompt_ids)
            prompt_logits = None
            if item.prompt_logits and len(item.prompt_ids) > 1:
                prompt_logits = self.model.lm_head(hidden[i, : len(item.prompt_ids) - 1]).float()
            if self.prefix_cache is not None and not item.prompt_logits:
                self.prefix_cache.insert(item.adapter, item.prompt_ids, self.k_cache[:, row], self.v_cache[:, row])
            results.append(Prefilled(logits[i], prompt_logits, start))
        return results

    def _reuse_prefix(self, row: int, item: Prefill) -> int:
        """Copy the longest cached prefix of the prompt into `row`; returns its length (0: none)."""
        if self.prefix_cache is None or item.prompt_logits:
            return 0
        hit = self.prefix_cache.lookup(item.adapter, item.prompt_ids)
        if hit is None:
            return 0
        length, keys, values = hit
        self.k_cache[:, row, :, :length] = keys
        self.v_cache[:, row, :, :length] = values
        return length

    @torch.inference_mode()
    def fork(self, seq_id: Hashable, new_seq_id: Hashable) -> None:
        """A new row with a copy of `seq_id`'s cache (the other choices of an n > 1 request share one prefill)."""
        if not self.free_slots:
            raise RuntimeError("no free cache row; the scheduler admits at most max_slots sequences")
        source = self.seq_ids.index(seq_id)
        row, length = len(self.seq_ids), self.lengths[source]
        self.k_cache[:, row, :, :length] = self.k_cache[:, source, :, :length]
        self.v_cache[:, row, :, :length] = self.v_cache[:, source, :, :length]
        self.seq_ids.append(new_seq_id)
        self.lengths.append(length)
        self.row_adapters.append(self.row_adapters[source])

    @torch.inference_mode()
    def step(self, next_tokens: Sequence[int]) -> torch.Tensor:
        """Decode one token for every row (next_tokens in row order, see seq_ids); logits [B, vocab]."""
        batch = len(self.seq_ids)
        if len(next_tokens) != batch:
            raise ValueError(f"{len(next_tokens)} tokens for {batch} running sequences")
        if any(length >= self.max_model_len for length in self.lengths):
            raise ValueError("a sequence reached max_model_len; the scheduler must finish it first")
        tokens = torch.tensor(list(next_tokens), device=self.device)[:, None]
        positions = torch.tensor(self.lengths, device=self.device)[:, None]
        hidden = self._forward(tokens, positions, rows=slice(0, batch), adapters=self.row_adapters)
        self.lengths = [length + 1 for length in self.lengths]
        return self.model.lm_head(hidden[:, -1]).float()

    def remove(self, seq_id: Hashable) -> None:
        """Free the sequence's row; the last row moves into it so running rows stay 0..B-1."""
        row = self.seq_ids.index(seq_id)
        last = len(self.seq_ids) - 1
        if row != last:
            length = self.lengths[last]
            self.k_cache[:, row, :, :length] = self.k_cache[:, last, :, :length]
            self.v_cache[:, row, :, :length] = self.v_cache[:, last, :, :length]
            for column in (self.seq_ids, self.lengths, self.row_adapters):
                column[row] = column[last]
        for column in (self.seq_ids, self.lengths, self.row_adapters):
            column.pop()

    def _adapter_groups(self, adapters: Sequence[int]) -> list[tuple[int, Optional[torch.Tensor]]]:
        """(adapter, rows) for every adapter in the batch; rows None means the whole batch."""
        used = sorted(set(adapters) - {0})
        if len(used) == 1 and all(a == used[0] for a in adapters):
            return [(used[0], None)]
        return [(a, torch.tensor([i for i, r in enumerate(adapters) if r == a], device=self.device)) for a in used]

    def _project(self, module: torch.nn.Module, x: torch.Tensor, key: tuple[int, str], groups) -> torch.Tensor:
        out = module(x)
        loras = self.lora.get(key)
        if loras is None:
            return out
        for adapter, rows in groups:
            if loras[adapter] is None:
                continue
            a, b, scale = loras[adapter]
            if rows is None:
                out = out + (x @ a.T @ b.T) * scale  # PEFT's order: B(A(x)) * scaling, added to base
            else:
                out = out.index_add(0, rows, (x[rows] @ a.T @ b.T) * scale)
        return out

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q [B, heads, 1, D] over keys/values [B, kv_heads, L, D] with bias [B, 1, 1, L]: softmax(q k^T / sqrt(D) + bias) v."""
        batch = q.shape[0]
        group = self.n_heads // self.n_kv_heads
        q = q.reshape(batch, self.n_kv_heads, group, self.head_dim)  # the heads sharing a K/V head, as rows
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(self.head_dim ** -0.5).add_(bias)
        out = torch.matmul(scores.softmax(dim=-1), values)  # [B, kv_heads, group, D]
        return out.reshape(batch, self.n_heads, 1, self.head_dim)

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, *, rows: slice, adapters: Sequence[int]
    ) -> torch.Tensor:
        """tokens/positions [B, T] for cache rows `rows`; writes their K/V, returns the final-norm hidden states [B, T, hidden]."""
        batch, width = tokens.shape
        groups = self._adapter_groups(adapters)
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, head_dim/2], float32 as in transformers
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]  # [B, 1, T, D]
        key_len = int(positions.max()) + 1
        key_positions = torch.arange(key_len, device=self.device)
        mask = key_positions[None, None, :] <= positions[..., None]  # [B, T, key_len]: causal, own row only
        if self.sliding_window is not None:
            mask = mask & (positions[..., None] - key_positions[None, None, :] < self.sliding_window)
        mask = mask[:, None]
        # Decode (one new token per row): attention as two batched matmuls, each query head group
        # against its shared K/V head (no K/V repeated for GQA), with the mask as an additive bias
        # built once for all layers. SDPA's CPU kernel is tuned for long queries and took ~11% of a
        # decode step (benchmarks/serve_throughput.md).
        decode_bias = None
        if width == 1:
            decode_bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(~mask, float("-inf"))
        batch_index = torch.arange(rows.start, rows.stop, device=self.device)[:, None].expand(batch, width)

        x = self.model.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = (
                self._project(getattr(attn, name), h, (i, name), groups).view(batch, width, -1, self.head_dim).transpose(1, 2)
                for name in ("q_proj", "k_proj", "v_proj")
            )
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.k_cache[i][batch_index, :, positions] = k.transpose(1, 2)
            self.v_cache[i][batch_index, :, positions] = v.transpose(1, 2)
            keys = self.k_cache[i, rows, :, :key_len]
            values = self.v_cache[i, rows, :, :key_len]
            if decode_bias is not None:
                out = self._decode_attention(q, keys, values, decode_bias)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
            out = out.transpose(1, 2).reshape(batch, width, self.n_heads * self.head_dim)
            x = x + self._project(attn.o_proj, out, (i, "o_proj"), groups)
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            gate = self._project(mlp.gate_proj, h, (i, "gate_proj"), groups)
            up = self._project(mlp.up_proj, h, (i, "up_proj"), groups)
            x = x + self._project(mlp.down_proj, F.silu(gate) * up, (i, "down_proj"), groups)
        return self.model.model.norm(x)

