"""The Llama family (Llama 2, Llama 3/3.1/3.2, Mistral, Qwen2) in one native PyTorch file.

Parameter names are exactly Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...) so
safetensors checkpoints and PEFT adapters map 1:1, and the math follows transformers' modeling
code step for step so float32 logits agree to ~1e-6.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kubetune.errors import KubetuneError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(KubetuneError):
    """A config.json describing a model this trainer does not implement."""


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None  # {"rope_type": "llama3"|"linear", ...}; None: plain RoPE
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama: bias on q/k/v/o
    qkv_bias: bool = False  # Qwen2: bias on q/k/v only
    mlp_bias: bool = False
    sliding_window: Optional[int] = None  # Mistral
    architecture: str = "LlamaForCausalLM"
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)  # the source config.json, saved back
    generation_config: dict[str, Any] = field(default_factory=dict, repr=False)  # generation_config.json, if any

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build from a Hugging Face config.json (both the transformers 4 and 5 rope layouts)."""
        architecture = _architecture_of(config, source)
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            args = cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=architecture == "LlamaForCausalLM" and bool(config.get("attention_bias", False)),
                qkv_bias=architecture == "Qwen2ForCausalLM",
                mlp_bias=bool(config.get("mlp_bias", False)),
                architecture=architecture,
                hf_config=dict(config),
            )
        except KeyError as missing:
            raise UnsupportedModelError(f"{source}: missing required key {missing}") from None
        args.rope_theta, args.rope_scaling = _rope_from_config(config, source)
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act={config['hidden_act']!r}; only 'silu' is supported")
        if architecture == "MistralForCausalLM" and config.get("sliding_window"):
            args.sliding_window = int(config["sliding_window"])
        if architecture == "Qwen2ForCausalLM" and config.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: Qwen2 use_sliding_window=true is not supported; set it to false")
        if heads % args.num_key_value_heads:
            raise UnsupportedModelError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={args.num_key_value_heads}"
            )
        return args

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json to save: the source config (unknown keys kept) with our values on top."""
        config = dict(self.hf_config)
        model_type = {v: k for k, v in _MODEL_TYPES.items()}[self.architecture]
        config.update(
            architectures=[self.architecture],
            model_type=model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        if self.architecture == "LlamaForCausalLM":
            config.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.architecture == "MistralForCausalLM":
            config["sliding_window"] = self.sliding_window
        # Both rope layouts, so transformers 4 (rope_theta/rope_scaling) and 5 (rope_parameters) read it.
        config.pop("rope_parameters", None)
        config["rope_theta"] = self.rope_theta
        config["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return config


def _architecture_of(config: dict[str, Any], source: str) -> str:
    architectures = config.get("architectures") or []
    candidates = list(architectures) or ([_MODEL_TYPES[config["model_type"]]] if config.get("model_type") in _MODEL_TYPES else [])
    for name in candidates:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(architectures) or f"model_type={config.get('model_type')!r}"
    raise UnsupportedModelError(
        f"{source}: unsupported architecture {found}; kubetune supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_from_config(config: dict[str, Any], source: str) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {}) or params
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    return theta, scaling


def rope_inverse_frequencies(args: ModelArgs) -> torch.Tensor:
    """RoPE inverse frequencies, with `linear` or `llama3` (Llama 3.1) scaling; as transformers computes them."""
    dim = args.head_dim
    # device="cpu": computed for real even while the model is built on the meta device.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    scaling = args.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        return inv_freq / float(scaling["factor"])
    if scaling.get("rope_type") != "llama3":
        return inv_freq
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Hugging Face's layout: the two rotated halves are the first and second half of head_dim.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as transformers does (matters in bf16).
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)


class KVCache:
    """Preallocated keys/values for incremental decoding.

    `forward(..., kv_cache=cache)` appends the new tokens at slots [length, length + T); the
    `attention_mask` passed with a cache covers only the new tokens, and the cache remembers
    which slots hold padding, so left-padded batches of prompts decode correctly.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, args.num_key_value_heads, max_len, args.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # slot holds a real token
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens so far, per row
        self.length = 0  # slots filled
        self.max_len = max_len

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + keys.shape[2]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@dataclass(frozen=True)
class TokenLayout:
    """Where the real tokens of a padded batch sit, so that padding costs no compute.

    Embeddings, norms, projections, MLPs and the final norm act on each token alone, so they run
    on the [N, ...] real tokens only; attention is the one place that needs the rows, and it
    scatters q/k/v back to [B, T, ...] (padding as zeros, masked out) and gathers its output
    again. Real tokens get exactly the padded computation's result; on uneven instruction
    data, where ~20-30% of a padded batch is padding, that much of the matmul work goes away.
    """

    index: torch.Tensor  # [N]: positions of the real tokens in the flattened [B * T]
    batch: int
    seq: int

    @classmethod
    def of_padding(cls, attention_mask: Optional[torch.Tensor]) -> Optional["TokenLayout"]:
        """The layout of a batch with padding; None when every position is a real token."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        batch, seq = attention_mask.shape
        return cls(attention_mask.reshape(-1).nonzero().squeeze(1), batch, seq)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]: the real tokens."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.index)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zeros at the padding."""
        rows = x.new_zeros(self.batch * self.seq, *x.shape[1:])
        return rows.index_copy(0, self.index, x).view(self.batch, self.seq, *x.shape[1:])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        qkv_bias = args.attention_bias or args.qkv_bias
        self.q_proj = nn.Linear(args.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, args.hidden_size, bias=args.attention_bias)

    def forward(self, x, cos, sin, mask, kv_cache: Optional[KVCache] = None, layer_idx: int = 0, layout: Optional[TokenLayout] = None):
        """x: [B, T, hidden]; or, with `layout`, [N, hidden]: only the real tokens of a padded batch."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if layout is not None:  # attention runs per row: put the tokens back in place, padding as zeros
            q, k, v = layout.scatter(q), layout.scatter(k), layout.scatter(v)
        batch, seq = q.shape[:2]
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        # mask None: plain causal attention, which lets SDPA pick its fastest kernel.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads
        )
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(out if layout is None else layout.gather(out))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache: Optional[KVCache] = None, layout: Optional[TokenLayout] = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, self.layer_idx, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not a buffer: it must survive meta-device init and never appear in the state dict.
        self._inv_freq = rope_inverse_frequencies(args)
        self.activation_checkpointing = False

    def tie_weights(self) -> None:
        """Re-point lm_head at the embedding (after weights were assigned into a tied model)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's activations in backward (saves memory; parameter names unchanged)."""
        self.activation_checkpointing = enabled

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Float32 logits [B, T, vocab] (without a kv_cache, padding positions are not computed:
        their logits are those of a zero hidden state; read only real positions).

        attention_mask: [B, T], 1 = token, 0 = padding (with a kv_cache: the new tokens only).
        position_ids: default counts real tokens (so left padding does not shift positions) and
            restarts at each new segment.
        segment_ids: [B, T] document ids of packed sequences; attention stays within a document.
        """
        hidden = self.hidden_states(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, segment_ids=segment_ids, kv_cache=kv_cache
        )
        return self.lm_head(hidden).float()

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """The final normalised hidden states [B, T, hidden]: everything but the lm_head.

        Without a kv_cache, padding positions are not computed: their hidden states are zeros.

        Training computes the lm_head inside the loss (`training.loss.causal_lm_loss_sum_from_hidden`),
        only where there is a label, without materialising the full logits."""
        batch, seq = input_ids.shape
        device = input_ids.device
        if kv_cache is not None and kv_cache.length + seq > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} tokens; {kv_cache.length + seq} needed")
        if kv_cache is not None and attention_mask is not None and attention_mask.shape[1] != seq:
            raise ValueError("with a kv_cache, attention_mask covers only the new tokens ([B, T] for input_ids [B, T])")
        if position_ids is None:
            position_ids = _default_positions(batch, seq, device, attention_mask, segment_ids, kv_cache)
        # A padded batch runs everything but attention on its real tokens only (see TokenLayout).
        layout = TokenLayout.of_padding(attention_mask) if kv_cache is None else None
        mask = _attention_mask(self.args, batch, seq, device, attention_mask, segment_ids, kv_cache, has_padding=layout is not None)
        hidden = self.model.embed_tokens(input_ids if layout is None else layout.gather(input_ids))
        cos, sin = self._rope(position_ids, hidden.dtype)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training and kv_cache is None:
                hidden = checkpoint(layer, hidden, cos, sin, mask, None, layout, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, mask, kv_cache, layout)
        if kv_cache is not None:
            kv_cache.length += seq
        hidden = self.model.norm(hidden)
        return hidden if layout is None else layout.scatter(hidden)

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _default_positions(batch, seq, device, attention_mask, segment_ids, kv_cache) -> torch.Tensor:
    if segment_ids is not None:
        # Position within each packed document: index minus the index where its segment starts.
        index = torch.arange(seq, device=device).expand(batch, seq)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        segment_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
        return index - segment_start
    if attention_mask is None and kv_cache is None:
        return torch.arange(seq, device=device).expand(batch, seq)
    real = attention_mask.long() if attention_mask is not None else torch.ones(batch, seq, dtype=torch.long, device=device)
    offset = kv_cache.seen[:, None] if kv_cache is not None else 0
    return (offset + real.cumsum(-1) - 1).clamp(min=0)


def _attention_mask(args: ModelArgs, batch, seq, device, attention_mask, segment_ids, kv_cache, has_padding: bool) -> Optional[torch.Tensor]:
    """A boolean [B, 1, T, S] mask (True = attend), or None when plain causal attention suffices.

    has_padding: attention_mask holds a 0 (known to the caller already; checking again would cost
    a second device sync). Only read without a kv_cache."""
    past = kv_cache.length if kv_cache is not None else 0
    total = past + seq
    if kv_cache is not None:
        new_valid = attention_mask.bool() if attention_mask is not None else torch.ones(batch, seq, dtype=torch.bool, device=device)
        kv_cache.valid[:, past:total] = new_valid
        kv_cache.seen += new_valid.sum(-1)
        key_valid = kv_cache.valid[:, :total]
    else:
        window_matters = args.sliding_window is not None and seq > args.sliding_window
        if not has_padding and segment_ids is None and not window_matters:
            return None
        key_valid = attention_mask.bool() if attention_mask is not None else None
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if args.sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < args.sliding_window)
    mask = allowed[None, None].expand(batch, 1, seq, total)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    # A padding query may see no key at all; letting it see itself keeps SDPA from returning NaN.
    # Its output is never read by real tokens, which never attend to padding keys.
    return mask | (q_pos == k_pos)[None, None]
