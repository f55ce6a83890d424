"""NF4 base weights (torchao's NF4Tensor) against the QLoRA paper's definition, written out here
independently: the code book from normal quantiles, 64-weight absmax blocks, double-quantized
(int8) absmaxes. Also: sizes, and errors for weights NF4 cannot hold."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kubetune.errors import KubetuneError
from kubetune.trainer.quant import dequantize, is_nf4, quantize_base, tensor_nbytes, to_nf4
from kubetune.trainer.quant.nf4 import scaler_block_size


def paper_nf4_code_book() -> torch.Tensor:
    """Dettmers et al. 2023, appendix E: 8 positive and 7 negative normal quantiles, plus an exact 0,
    normalized to [-1, 1] (offset 0.9677 = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2)."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).float()


def reference_nf4_dequantize(weight: torch.Tensor, block: int = 64, scaler_block: int = 256) -> torch.Tensor:
    """The QLoRA format, step by step: code = nearest book value of w / absmax(block); absmaxes stored
    as int8 around their mean, one factor per group of `scaler_block` absmaxes."""
    book = torch.tensor(  # the book torchao ships (paper values, 4 decimals)
        [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
         0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0], dtype=weight.dtype,
    )
    blocks = weight.reshape(-1, block)
    absmax = blocks.abs().max(dim=1).values
    codes = (blocks / absmax[:, None]).unsqueeze(-1).sub(book).abs().argmin(dim=-1)
    centered = (absmax - absmax.mean()).reshape(-1, scaler_block)
    factor = 256 / (2 * centered.abs().max(dim=1).values)
    int8 = (centered * factor[:, None]).round().clamp(-128, 127)
    absmax_dq = (int8 / factor[:, None]).flatten() + absmax.mean()
    return (book[codes] * absmax_dq[:, None]).reshape(weight.shape)


def test_torchao_code_book_is_the_papers():
    from torchao.quantization import to_nf4 as torchao_to_nf4

    book = torchao_to_nf4(torch.randn(64, 256), 64, 256).nf4
    assert torch.allclose(book, paper_nf4_code_book(), atol=5e-5)  # torchao rounds to 4 decimals


@pytest.mark.parametrize("shape", [(128, 128), (96, 64), (256, 512)])
def test_dequantized_weights_equal_the_reference(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    quantized = to_nf4(weight)
    assert is_nf4(quantized) and quantized.shape == weight.shape
    reference = reference_nf4_dequantize(weight, 64, scaler_block_size(weight.numel()))
    assert torch.allclose(dequantize(quantized), reference, rtol=0, atol=1e-6)
    # the 4-bit error bound: half the widest code gap times the block's absmax (+ the int8 absmax error)
    gap = paper_nf4_code_book().diff().max().item()
    absmax = weight.reshape(-1, 64).abs().max(dim=1).values
    error = (dequantize(quantized) - weight).reshape(-1, 64).abs().max(dim=1).values
    assert (error <= absmax * (gap / 2 + 0.01)).all()


def test_nf4_bytes_are_about_a_quarter_of_bf16():
    weight = torch.randn(1024, 1024, dtype=torch.bfloat16)
    ratio = tensor_nbytes(to_nf4(weight)) / weight.nbytes
    assert ratio <= 0.3, ratio  # 4 bits + 8/64 bits of absmax + factors: ~0.2657


def test_quantize_base_keeps_lm_head_and_gradients_reach_inputs():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(64, 64, bias=False))
    model.add_module("lm_head", nn.Linear(64, 32, bias=False))
    quantize_base(model)
    assert is_nf4(model.q_proj.weight) and not is_nf4(model.lm_head.weight)
    x = torch.randn(3, 64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model.q_proj.weight.grad is None
    expected = torch.autograd.grad(
        nn.functional.linear(nn.functional.linear(x, dequantize(model.q_proj.weight)), model.lm_head.weight).sum(), x
    )[0]
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_weight_nf4_cannot_hold_is_refused_with_the_field():
    model = nn.Sequential()
    model.add_module("odd", nn.Linear(10, 3))  # 30 weights: not a multiple of the 64-weight block
    with pytest.raises(KubetuneError, match=r"model\.quantize_base: odd\.weight has 30 weights"):
        quantize_base(model)


def two_projections() -> nn.Module:
    """Tiny-model-sized weights: 64 and 32 blocks of 64, so their NF4 groups depend on the world size."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(64, 64, bias=False))
    model.add_module("k_proj", nn.Linear(64, 32, bias=False))
    return model


def test_a_base_quantized_for_two_ranks_keeps_its_layout_when_sharded_over_one():
    """A QLoRA run resumed at another world size quantizes for the world size it started at
    (`nf4_layout_shards`): the very base it trained on, not the one a fresh run would get."""
    import copy

    base = two_projections()
    for_two = quantize_base(copy.deepcopy(base), shards=2)
    kept = quantize_base(copy.deepcopy(base), shards=2, world_size=1)
    fresh = quantize_base(copy.deepcopy(base), shards=1)
    assert torch.equal(dequantize(kept.q_proj.weight), dequantize(for_two.q_proj.weight))
    assert not torch.equal(dequantize(fresh.q_proj.weight), dequantize(for_two.q_proj.weight))  # groups 64 vs 32


def test_a_base_whose_groups_cannot_split_over_the_new_world_size_is_refused_naming_the_fix():
    with pytest.raises(KubetuneError) as error:
        quantize_base(two_projections(), shards=1, world_size=2)
    message = str(error.value)
    assert "model.quantize_base: this run's NF4 base was quantized for 1 process(es)" in message
    assert "q_proj.weight (64 rows, 64 blocks of 64, 1 double-quantization group(s))" in message
    assert "cannot be split evenly over 2 processes" in message and "Resume this run with 1 process(es)" in message
    # 2 -> 4: q_proj's 64 rows and 64 blocks split, but its 2 groups (of 32) do not; 1 or 2 processes do
    with pytest.raises(KubetuneError, match=r"q_proj\.weight .* 2 double-quantization group.*with 1 or 2 process"):
        quantize_base(two_projections(), shards=2, world_size=4)


def test_real_model_sizes_keep_groups_of_256_at_every_usual_world_size():
    # an 8B model's smallest quantized weight (k_proj, 1024 x 4096): the layout does not depend on the world size
    numel = 1024 * 4096
    assert {scaler_block_size(numel, shards=shards) for shards in (1, 2, 4, 8, 16, 64)} == {256}


def test_nf4_layout_shards_of_a_resumed_run():
    from kubetune.trainer.quant import nf4_layout_shards

    assert nf4_layout_shards(None, 4) == 4  # a fresh run: its own world size
    assert nf4_layout_shards({"nf4_shards": 2, "data": {"world_size": 1}}, 4) == 2  # the run's first layout
    assert nf4_layout_shards({"data": {"world_size": 8}}, 1) == 8  # an older checkpoint: its world size
