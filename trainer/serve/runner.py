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

New sequences are prefilled together in one forward, each row starting at its own position (so a
row can resume after a prefix copied from the prefix cache). Only their real tokens go through
the embedding, projections and MLP (a flat batch, no padding: prompts of mixed lengths padded to
the longest would cost up to twice the matmuls); attention alone sees them right-padded to the
longest, as [rows, T] for SDPA, and padding writes no K/V.
`fork` copies a prefilled row for the other choices of an n > 1 request.

`run` does both in one forward: a decode step of the running rows and the prefill of new ones.
The matmuls (three quarters of a step on a CPU) see every token of both as one flat batch, so
the weights are read once per iteration instead of once for the step and again for each prefill;
only attention is done per part (decode rows against their cache, prompts causally).
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

    def prefill(self, new: Sequence[Prefill]) -> list[Prefilled]:
        """Prefill several new sequences in one forward (right-padded), each into a free cache row.

        With the prefix cache, a row starts after the longest cached prefix of its prompt (its K/V
        are copied in) and only the rest is computed."""
        return self.run(None, new)[1]

    def step(self, next_tokens: Sequence[int]) -> torch.Tensor:
        """Decode one token for every row (next_tokens in row order, see seq_ids); logits [B, vocab]."""
        logits = self.run(next_tokens)[0]
        assert logits is not None
        return logits

    @torch.inference_mode()
    def run(
        self, next_tokens: Optional[Sequence[int]], new: Sequence[Prefill] = ()
    ) -> tuple[Optional[torch.Tensor], list[Prefilled]]:
        """One forward: a decode step of every running row (next_tokens in row order; None: no
        step) and the prefill of `new` into free rows after them. Returns the step's logits
        [B, vocab] (None without a step) and the prefill results."""
        batch = len(self.seq_ids)
        if next_tokens is not None:
            if len(next_tokens) != batch:
                raise ValueError(f"{len(next_tokens)} tokens for {batch} running sequences")
            if any(length >= self.max_model_len for length in self.lengths):
                raise ValueError("a sequence reached max_model_len; the scheduler must finish it first")
        if len(new) > self.free_slots:
            raise RuntimeError("no free cache row; the scheduler admits at most max_slots sequences")
        for item in new:
            if not 0 < len(item.prompt_ids) <= self.max_model_len:
                raise ValueError(f"prompt of {len(item.prompt_ids)} tokens does not fit max_model_len={self.max_model_len}")
        segments: list[_Segment] = []
        if next_tokens is not None and batch:
            segments.append(_Segment(
                slice(0, batch), torch.tensor(list(next_tokens))[:, None], torch.tensor(self.lengths)[:, None], list(self.row_adapters),
            ))
        rows = range(batch, batch + len(new))
        for item in new:
            self.seq_ids.append(item.seq_id)
            self.lengths.append(0)
            self.row_adapters.append(item.adapter)
        starts: list[int] = []
        try:
            if new:
                starts = [self._reuse_prefix(row, item) for row, item in zip(rows, new)]
                segments.append(self._prefill_segment(batch, new, starts))
            hidden = self._forward(segments) if segments else []
        except BaseException:
            for item in new:
                if item.seq_id in self.seq_ids:
                    self.remove(item.seq_id)
            raise
        step_logits = None
        if next_tokens is not None and batch:
            step_logits = self.model.lm_head(hidden[0][:, -1]).float()
            self.lengths[:batch] = [length + 1 for length in self.lengths[:batch]]
        if not new:
            return step_logits, []
        prefill_hidden = hidden[-1]
        last = torch.tensor([len(item.prompt_ids) - start - 1 for item, start in zip(new, starts)], device=self.device)
        logits = self.model.lm_head(prefill_hidden[torch.arange(len(new), device=self.device), last]).float()
        results = []
        for i, (row, item, start) in enumerate(zip(rows, new, starts)):
            self.lengths[row] = len(item.prompt_ids)
            prompt_logits = None
            if item.prompt_logits and len(item.prompt_ids) > 1:
                prompt_logits = self.model.lm_head(prefill_hidden[i, : len(item.prompt_ids) - 1]).float()
            if self.prefix_cache is not None and not item.prompt_logits:
                self.prefix_cache.insert(item.adapter, item.prompt_ids, self.k_cache[:, row], self.v_cache[:, row])
            results.append(Prefilled(logits[i], prompt_logits, start))
        return step_logits, results

    def _prefill_segment(self, first: int, new: Sequence[Prefill], starts: list[int]) -> "_Segment":
        """The prompts (after their cached prefixes), right-padded to the longest, in rows first.."""
        width = max(len(item.prompt_ids) - start for item, start in zip(new, starts))
        tokens = torch.zeros((len(new), width), dtype=torch.long)
        positions = torch.zeros((len(new), width), dtype=torch.long)
        for i, (item, start) in enumerate(zip(new, starts)):
            rest = list(item.prompt_ids[start:])
            tokens[i, : len(rest)] = torch.tensor(rest)
            positions[i, : len(rest)] = torch.arange(start, len(item.prompt_ids))
            # padding (never computed, see _forward) sits at the slot after the prompt, so each of
            # its attention rows has a key and softmax stays finite; its output is dropped
            positions[i, len(rest) :] = len(item.prompt_ids)
        lengths = [len(item.prompt_ids) - start for item, start in zip(new, starts)]
        return _Segment(slice(first, first + len(new)), tokens, positions, [item.adapter for item in new], lengths)

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

    def _forward(self, segments: Sequence["_Segment"]) -> list[torch.Tensor]:
        """Run the segments' tokens through the model as one flat batch (embedding, norms, projections,
        MLP per token), attention per segment over its own cache rows; writes their K/V. Returns
        the final-norm hidden states of each segment, [rows, T, hidden]."""
        real = [seg.real_tokens() for seg in segments]  # per segment: flat indices of its real tokens
        tokens = torch.cat([seg.tokens.reshape(-1)[idx] for seg, idx in zip(segments, real)]).to(self.device)
        positions = torch.cat([seg.positions.reshape(-1)[idx] for seg, idx in zip(segments, real)]).to(self.device)
        cache_rows = torch.cat([
            torch.arange(seg.rows.start, seg.rows.stop)[:, None].expand(seg.tokens.shape).reshape(-1)[idx]
            for seg, idx in zip(segments, real)
        ]).to(self.device)
        groups = self._adapter_groups([a for seg in segments for a, n in zip(seg.adapters, seg.real_counts()) for _ in range(n)])
        real = [None if idx.numel() == seg.tokens.numel() else idx.to(self.device) for seg, idx in zip(segments, real)]
        freqs = positions[:, None].float() * self.inv_freq  # [N, head_dim/2], float32 as in transformers
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]  # [N, 1, D]
        masks = [self._attention_mask(seg) for seg in segments]
        count = tokens.shape[0]

        x = self.model.model.embed_tokens(tokens)  # [N, hidden]
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = (
                self._project(getattr(attn, name), h, (i, name), groups).view(count, -1, self.head_dim)
                for name in ("q_proj", "k_proj", "v_proj")
            )
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.k_cache[i][cache_rows, :, positions] = k
            self.v_cache[i][cache_rows, :, positions] = v
            outs, offset = [], 0
            for seg, idx, (key_len, mask) in zip(segments, real, masks):
                rows, width = seg.tokens.shape
                count_here = rows * width if idx is None else idx.numel()
                part = _padded(q[offset : offset + count_here], idx, rows * width)
                part = part.view(rows, width, self.n_heads, self.head_dim).transpose(1, 2)
                keys = self.k_cache[i, seg.rows, :, :key_len]
                values = self.v_cache[i, seg.rows, :, :key_len]
                if width == 1:
                    out = self._decode_attention(part, keys, values, mask)
                else:
                    out = F.scaled_dot_product_attention(part, keys, values, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
                out = out.transpose(1, 2).reshape(rows * width, self.n_heads * self.head_dim)
                outs.append(out if idx is None else out.index_select(0, idx))
                offset += count_here
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + self._project(attn.o_proj, out, (i, "o_proj"), groups)
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            gate = self._project(mlp.gate_proj, h, (i, "gate_proj"), groups)
            up = self._project(mlp.up_proj, h, (i, "up_proj"), groups)
            x = x + self._project(mlp.down_proj, F.silu(gate) * up, (i, "down_proj"), groups)
        x = self.model.model.norm(x)
        hidden, offset = [], 0
        for seg, idx in zip(segments, real):
            rows, width = seg.tokens.shape
            count_here = rows * width if idx is None else idx.numel()
            hidden.append(_padded(x[offset : offset + count_here], idx, rows * width).view(rows, width, -1))
            offset += count_here
        return hidden

    def _attention_mask(self, seg: "_Segment") -> tuple[int, torch.Tensor]:
        """(keys to attend, mask) of a segment, built once for all layers: causal within each row's
        own cache (and its sliding window). Boolean [B, 1, T, keys] for SDPA; with one token per
        row (decode), an additive bias [B, 1, 1, keys] for _decode_attention."""
        positions = seg.positions.to(self.device)
        key_len = int(positions.max()) + 1
        key_positions = torch.arange(key_len, device=self.device)
        mask = key_positions[None, None, :] <= positions[..., None]  # [B, T, key_len]
        if self.sliding_window is not None:
            mask = mask & (positions[..., None] - key_positions[None, None, :] < self.sliding_window)
        mask = mask[:, None]
        if seg.tokens.shape[1] == 1:
            return key_len, torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(~mask, float("-inf"))
        return key_len, mask


@dataclass
class _Segment:
    """Rows of one kind in a forward: the running rows' next tokens (width 1), or new prompts."""

    rows: slice  # cache rows
    tokens: torch.Tensor  # [rows, T], on the CPU
    positions: torch.Tensor  # [rows, T]
    adapters: list[int]  # per row
    lengths: Optional[list[int]] = None  # real (not padding) tokens per row, a prefix of it (None: all T)

    def real_counts(self) -> list[int]:
        rows, width = self.tokens.shape
        return [width] * rows if self.lengths is None else self.lengths

    def real_tokens(self) -> torch.Tensor:
        """Flat indices (into tokens.reshape(-1)) of the tokens that are computed."""
        width = self.tokens.shape[1]
        return torch.cat([torch.arange(row * width, row * width + n) for row, n in enumerate(self.real_counts())])


def _padded(flat: torch.Tensor, index: Optional[torch.Tensor], size: int) -> torch.Tensor:
    """Rows `flat` placed at `index` of `size` zero rows (index None: flat is already all of them)."""
    if index is None:
        return flat
    out = flat.new_zeros((size, *flat.shape[1:]))
    return out.index_copy_(0, index, flat)
