"""Block-quantized linears: GGUF blocks -> rows -> the kernel's panels, each step exact against gguf's own
dequantizer; the native kernel against its torch twin on fresh random inputs; rows independent of the batch."""

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from torch import nn

from kernels.cpu_native import native_kernels
from kernels.quant_linear import (BlockQuantRows, PackedBlockWeight, native_block_quant_linear,
                                  reference_block_quant_linear)
from workers.model.block_quant_linear import BlockQuantLinear, quantize_linears

TYPES = ("Q4_0", "Q4_1", "Q8_0")
pytestmark = pytest.mark.usefixtures("two_threads")


def gguf_blocks(type_name: str, out_features: int, in_features: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """(the raw blocks gguf's quantizer writes, gguf's own fp32 dequantization of them)"""
    values = np.random.default_rng(seed).standard_normal((out_features, in_features)).astype(np.float32)
    values[:, :5] *= 7.0  # a few large columns, as real weights have
    quant_type = GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(values, quant_type)
    return raw, torch.from_numpy(gguf.quants.dequantize(raw, quant_type).astype(np.float32))


def packed_weight(type_name: str, out_features: int, in_features: int, seed: int):
    raw, dense = gguf_blocks(type_name, out_features, in_features, seed)
    return PackedBlockWeight.pack(BlockQuantRows.from_gguf(type_name, raw, out_features, in_features)), dense


@pytest.mark.parametrize("type_name", TYPES)
def test_rows_and_panels_dequantize_to_ggufs_exact_values(type_name):
    raw, dense = gguf_blocks(type_name, 70, 96, seed=1)  # 70: the last panel is padded
    rows = BlockQuantRows.from_gguf(type_name, raw, 70, 96)
    assert torch.equal(rows.dequantize(), dense)
    packed = PackedBlockWeight.pack(rows)
    assert packed.quants.shape[:3] == (3, 3, 32)
    assert torch.equal(packed.dequantize(), dense)


def test_row_maps_and_concat_follow_the_rows():
    raw_a, dense_a = gguf_blocks("Q4_1", 64, 64, seed=2)
    raw_b, dense_b = gguf_blocks("Q4_1", 32, 64, seed=3)
    a = BlockQuantRows.from_gguf("Q4_1", raw_a, 64, 64)
    b = BlockQuantRows.from_gguf("Q4_1", raw_b, 32, 64)
    order = torch.randperm(64)
    assert torch.equal(a.map_rows(lambda t: t[order]).dequantize(), dense_a[order])
    assert torch.equal(BlockQuantRows.concat([a, b]).dequantize(), torch.cat([dense_a, dense_b]))
    q8 = BlockQuantRows.from_gguf("Q8_0", gguf_blocks("Q8_0", 32, 64, seed=4)[0], 32, 64)
    with pytest.raises(ValueError, match="one block kind"):
        BlockQuantRows.concat([a, q8])


def test_refuses_what_is_not_a_32_block_type():
    with pytest.raises(ValueError, match="Q6_K"):
        BlockQuantRows.from_gguf("Q6_K", np.zeros(10, np.uint8), 1, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        BlockQuantRows.from_gguf("Q8_0", np.zeros(34, np.uint8), 1, 48)


requires_native = pytest.mark.skipif(native_kernels() is None, reason="no C compiler: the fp32 path is used")


@requires_native
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("shape", [(70, 96), (96, 576), (40, 160)])
@pytest.mark.parametrize("num_rows", [1, 3, 13, 32, 64, 70, 130])
def test_native_matches_the_reference(type_name, shape, num_rows):
    out_features, in_features = shape
    weight, dense = packed_weight(type_name, out_features, in_features, seed=num_rows)
    generator = torch.Generator().manual_seed(out_features * num_rows)
    x = torch.randn(num_rows, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if num_rows % 2 else None
    ours = native_block_quant_linear(x, weight, bias)
    exact = torch.nn.functional.linear(x.double(), dense.double(), None if bias is None else bias.double())
    # Only the order of the fp32 sums differs from the reference: within the worst-case bound of any order,
    # (K + 1) * 2^-24 * sum |x w| per output (a wrong weight or a lost block is far outside it).
    magnitude = x.double().abs() @ dense.double().abs().T + (0 if bias is None else bias.double().abs())
    bound = (in_features + 1) * 2.0 ** -24 * magnitude
    assert ((ours.double() - exact).abs() <= bound).all()
    assert ((reference_block_quant_linear(x, weight, bias).double() - exact).abs() <= bound).all()


@requires_native
@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
def test_a_rows_result_does_not_depend_on_the_batch(type_name):
    weight, _ = packed_weight(type_name, 100, 192, seed=7)
    x = torch.randn(130, 192, generator=torch.Generator().manual_seed(8))
    batch = native_block_quant_linear(x, weight)
    for row in (0, 11, 12, 63, 64, 129):  # tile and row-block edges
        assert torch.equal(native_block_quant_linear(x[row:row + 1], weight)[0], batch[row])
    assert torch.equal(native_block_quant_linear(x[5:40], weight), batch[5:40])


@requires_native
def test_the_module_takes_blocks_for_small_batches_and_fp32_above():
    weight, dense = packed_weight("Q4_1", 64, 96, seed=9)
    linear = nn.Linear(96, 64).requires_grad_(False)
    linear.weight.copy_(dense)
    module = BlockQuantLinear(linear, weight, max_rows=8)
    small, large = torch.randn(2, 4, 96), torch.randn(9, 96)
    assert torch.equal(module(small), native_block_quant_linear(small, weight, linear.bias))
    assert torch.equal(module(large), linear(large))
    with pytest.raises(ValueError, match="blocks of shape"):
        BlockQuantLinear(nn.Linear(96, 32), weight)


def test_no_compiler_leaves_the_fp32_linears(monkeypatch, real_model):
    import workers.model.block_quant_linear as module

    monkeypatch.setattr(module, "native_kernels", lambda: None)
    model = nn.Module()
    assert quantize_linears(model, real_model.block_tensors) == 0


@pytest.mark.slow
@requires_native
def test_the_real_files_blocks_are_its_fp32_weights(real_model):
    """Every Q4_1/Q8_0 tensor of the SmolLM2 file, un-permuted and fused as the model fuses them, dequantizes to
    exactly the fp32 parameter the loader made."""
    tensors = real_model.block_tensors
    kinds = {t.type_name for t in tensors.values()}
    assert kinds == {"Q4_1", "Q8_0"} and len(tensors) == 30 * 7 + 1
    quantize_linears(real_model.model, tensors)  # idempotent: swapped modules are left alone
    swapped = [m for m in real_model.model.modules() if isinstance(m, BlockQuantLinear)]
    assert len(swapped) == 30 * 4 + 1
    for module in swapped:
        assert torch.equal(module.packed.dequantize(), module.weight)
    assert real_model.model.lm_head.packed.kind == "q8"


@requires_native
def test_a_bias_that_does_not_fit_is_refused():
    weight, _ = packed_weight("Q8_0", 64, 96, seed=10)
    with pytest.raises(ValueError, match="bias"):
        native_block_quant_linear(torch.randn(2, 96), weight, torch.randn(63))
