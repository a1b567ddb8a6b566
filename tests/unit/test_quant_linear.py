"""Block-quantized linears: GGUF blocks -> rows -> the kernel's panels, each step exact against gguf's own
dequantizer (on random blocks of every type we read, every bit pattern likely, fp16 scales from subnormal to the
largest); the native kernel against its torch twin on fresh random inputs; rows independent of the batch."""

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from torch import nn

from kernels.cpu_native import native_kernels
from kernels.quant_linear import (BLOCK_QUANT_TYPES, GGUF_BLOCK_TYPES, BlockQuantRows, PackedBlockWeight,
                                  native_block_quant_linear, reference_block_quant_linear)
from workers.model.block_quant_linear import BlockQuantLinear, quantize_linears

TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K")
MIXED = "Q4_K+Q6_K"  # a fused weight whose parts differ (Qwen2.5-Coder-1.5B's q/k and v): q8, per 16, with mins
# Byte offsets of each type's fp16 scale fields in a block (gguf's block structs); every other byte is quants or
# packed sub-block scales, any value of which is valid.
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
pytestmark = pytest.mark.usefixtures("two_threads")


def test_every_type_is_covered():
    assert set(TYPES) == set(BLOCK_QUANT_TYPES) == set(FP16_FIELDS)
    for type_name, spec in GGUF_BLOCK_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[GGMLQuantizationType[type_name]] == (spec.block_weights, spec.block_bytes)


def random_fp16(rng: np.random.Generator, count: int) -> np.ndarray:
    """Weight-like scales, and a few extremes: fp16 subnormals and values up to fp16's largest, either sign."""
    values = rng.standard_normal(count) * 0.02
    pick = rng.random(count)
    values = np.where(pick < 0.05, rng.integers(1, 1024, count) * 2.0 ** -24, values)  # subnormal
    values = np.where(pick > 0.95, rng.uniform(1000, 65504, count), values) * rng.choice([-1, 1], count)
    return values.astype(np.float16)


def gguf_blocks(type_name: str, out_features: int, in_features: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """(random raw blocks of the type, gguf's own fp32 dequantization of them); "A+B": the rows split between two
    types, raw as a list."""
    if "+" in type_name:
        halves = [gguf_blocks(part, out_features // 2, in_features, seed + i)
                  for i, part in enumerate(type_name.split("+"))]
        return [raw for raw, _ in halves], torch.cat([dense for _, dense in halves])
    spec = GGUF_BLOCK_TYPES[type_name]
    rng = np.random.default_rng(seed)
    num_blocks = out_features * in_features // spec.block_weights
    raw = rng.integers(0, 256, size=(num_blocks, spec.block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[type_name]:
        raw[:, offset:offset + 2] = random_fp16(rng, num_blocks).view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(out_features, -1)
    dense = gguf.quants.dequantize(raw, GGMLQuantizationType[type_name])
    return raw, torch.from_numpy(np.asarray(dense, dtype=np.float32))


def block_rows(type_name: str, raw, out_features: int, in_features: int) -> BlockQuantRows:
    if "+" in type_name:
        parts = type_name.split("+")
        return BlockQuantRows.concat([BlockQuantRows.from_gguf(part, part_raw, out_features // 2, in_features)
                                      for part, part_raw in zip(parts, raw)])
    return BlockQuantRows.from_gguf(type_name, raw, out_features, in_features)


def packed_weight(type_name: str, out_features: int, in_features: int, seed: int):
    raw, dense = gguf_blocks(type_name, out_features, in_features, seed)
    return PackedBlockWeight.pack(block_rows(type_name, raw, out_features, in_features)), dense


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("seed", [1, 2])
def test_rows_and_panels_dequantize_to_ggufs_exact_values(type_name, seed):
    raw, dense = gguf_blocks(type_name, 70, 512, seed)  # 70: the last panel is padded; 512: two K super-blocks
    rows = BlockQuantRows.from_gguf(type_name, raw, 70, 512)
    spec = GGUF_BLOCK_TYPES[type_name]
    assert (rows.kind, rows.group) == (spec.kind, spec.group)
    assert torch.equal(rows.dequantize(), dense)
    packed = PackedBlockWeight.pack(rows)
    assert packed.quants.shape[:3] == (3, 16, 32) and packed.group == spec.group
    assert torch.equal(packed.dequantize(), dense)


def test_gguf_quantized_blocks_are_read_exactly():
    """Blocks as gguf's own quantizer writes them (the types it can write), not only random bytes."""
    values = np.random.default_rng(3).standard_normal((40, 256)).astype(np.float32)
    for type_name in ("Q4_0", "Q4_1", "Q8_0", "Q5_0"):
        quant_type = GGMLQuantizationType[type_name]
        raw = gguf.quants.quantize(values, quant_type)
        dense = torch.from_numpy(gguf.quants.dequantize(raw, quant_type).astype(np.float32))
        assert torch.equal(BlockQuantRows.from_gguf(type_name, raw, 40, 256).dequantize(), dense), type_name


def test_row_maps_and_concat_follow_the_rows():
    raw_a, dense_a = gguf_blocks("Q4_1", 64, 64, seed=2)
    raw_b, dense_b = gguf_blocks("Q4_1", 32, 64, seed=3)
    a = BlockQuantRows.from_gguf("Q4_1", raw_a, 64, 64)
    b = BlockQuantRows.from_gguf("Q4_1", raw_b, 32, 64)
    order = torch.randperm(64)
    assert torch.equal(a.map_rows(lambda t: t[order]).dequantize(), dense_a[order])
    assert torch.equal(BlockQuantRows.concat([a, b]).dequantize(), torch.cat([dense_a, dense_b]))
    with pytest.raises(ValueError, match="one in_features"):
        BlockQuantRows.concat([a, BlockQuantRows.from_gguf("Q4_1", gguf_blocks("Q4_1", 32, 96, seed=4)[0], 32, 96)])


@pytest.mark.parametrize("types, kind, group, has_mins", [
    (("Q4_K", "Q4_1"), "q4", 32, True),
    (("Q5_0", "Q8_0", "Q5_0"), "q8", 32, False),  # Qwen2.5-Coder-0.5B's q/k/v
    (("Q4_0", "Q8_0"), "q8", 32, True),
    (("Q4_K", "Q4_K", "Q6_K"), "q8", 16, True),  # Qwen2.5-Coder-1.5B's q/k/v in half its layers
    (("Q8_0", "Q6_K"), "q8", 16, False),
])
def test_concat_widens_mixed_parts_to_one_format_exactly(types, kind, group, has_mins):
    parts, denses = [], []
    for index, type_name in enumerate(types):
        raw, dense = gguf_blocks(type_name, 32 * (index + 1), 256, seed=10 + index)
        parts.append(BlockQuantRows.from_gguf(type_name, raw, 32 * (index + 1), 256))
        denses.append(dense)
    fused = BlockQuantRows.concat(parts)
    assert (fused.kind, fused.group, fused.mins is not None) == (kind, group, has_mins)
    assert torch.equal(fused.dequantize(), torch.cat(denses))
    assert torch.equal(PackedBlockWeight.pack(fused).dequantize(), torch.cat(denses))


def test_widening_never_narrows():
    q6 = BlockQuantRows.from_gguf("Q6_K", gguf_blocks("Q6_K", 32, 256, seed=5)[0], 32, 256)
    q4 = BlockQuantRows.from_gguf("Q4_1", gguf_blocks("Q4_1", 32, 256, seed=6)[0], 32, 256)
    for rows, target in ((q6, ("q4", 16, True)), (q6, ("q8", 32, True)), (q4, ("q8", 32, False))):
        with pytest.raises(ValueError, match="cannot be widened"):
            rows.widen(*target)


def test_refuses_what_is_not_a_block_type():
    with pytest.raises(ValueError, match="Q5_1"):
        BlockQuantRows.from_gguf("Q5_1", np.zeros(24, np.uint8), 1, 32)
    with pytest.raises(ValueError, match="multiple of Q8_0's 32"):
        BlockQuantRows.from_gguf("Q8_0", np.zeros(34, np.uint8), 1, 48)
    with pytest.raises(ValueError, match="multiple of Q4_K's 256"):
        BlockQuantRows.from_gguf("Q4_K", np.zeros(144, np.uint8), 1, 128)
    with pytest.raises(ValueError, match="need mins"):
        BlockQuantRows("q4", torch.zeros(1, 32, dtype=torch.uint8), torch.ones(1, 1), None)
    with pytest.raises(ValueError, match="per 32 or 16"):
        BlockQuantRows("q8", torch.zeros(1, 32, dtype=torch.int8), torch.ones(1, 4), None)


requires_native = pytest.mark.skipif(native_kernels() is None, reason="no C compiler: the fp32 path is used")


@requires_native
@pytest.mark.parametrize("type_name", (*TYPES, MIXED))
@pytest.mark.parametrize("shape", [(70, 256), (96, 768), (40, 512)])
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
@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0", "Q4_K", "Q6_K", MIXED])
def test_a_rows_result_does_not_depend_on_the_batch(type_name):
    weight, _ = packed_weight(type_name, 100, 256, seed=7)
    x = torch.randn(130, 256, generator=torch.Generator().manual_seed(8))
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
