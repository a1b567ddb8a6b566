"""Q5_0 (Qwen2.5-Coder-0.5B's main weight format): gguf-py's dequantizer, which the loader uses, held to a torch
reference written from ggml's block layout, so the format is pinned here and not only by the library; and a Q5_0
GGUF through the engine, whose 32-weight block linears read Q5_0 as int8 q - 16 with the block's scale
(kernels/quant_linear.py; exactness against gguf-py is tests/unit/test_quant_linear.py)."""

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from kernels.cpu_native import native_kernels
from tests.checkpoints import make_tiny_hf_checkpoint, write_tiny_gguf
from workers.config import EngineConfig
from workers.engine import Engine
from workers.model.block_quant_linear import BlockQuantLinear
from workers.model.gguf_loader import SUPPORTED_QUANT_TYPES
from workers.sampling_params import SamplingParams

# B=blocks, one block = 32 weights in 22 bytes
BLOCK_BYTES = 22


def reference_dequantize_q5_0(raw: torch.Tensor) -> torch.Tensor:
    """raw [B, 22] uint8 -> [B, 32] fp32. ggml's block_q5_0: d (fp16), qh (4 bytes, a little-endian uint32 holding
    the 5th bit of each weight), qs (16 bytes: weight j in the low nibble of qs[j], weight j+16 in the high one);
    w = d * ((nibble | 5th bit << 4) - 16)."""
    d = raw[:, 0:2].contiguous().view(torch.float16).float()  # [B, 1]
    qh = sum(raw[:, 2 + i].long() << (8 * i) for i in range(4))  # [B]
    qs = raw[:, 6:22].long()  # [B, 16]
    bit = torch.arange(32)
    high = (qh[:, None] >> bit) & 1  # [B, 32]: weight j's 5th bit is bit j of qh
    nibbles = torch.cat([qs & 0x0F, qs >> 4], dim=1)  # [B, 32]
    return d * ((nibbles | (high << 4)) - 16).float()


def random_q5_0_blocks(num_blocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(num_blocks, BLOCK_BYTES), dtype=np.uint8)
    raw[:, 0:2] = (rng.standard_normal(num_blocks) * 0.02).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def test_q5_0_is_a_supported_quant_type():
    assert "Q5_0" in SUPPORTED_QUANT_TYPES
    assert gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0] == (32, BLOCK_BYTES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gguf_dequantize_matches_the_block_format_on_random_blocks(seed):
    raw = random_q5_0_blocks(4 * 64, seed)  # 4 rows of 64 blocks (2048 weights each), every bit pattern likely
    theirs = gguf.quants.dequantize(raw.reshape(4, 64 * BLOCK_BYTES), GGMLQuantizationType.Q5_0)
    assert theirs.shape == (4, 64 * 32)
    ours = reference_dequantize_q5_0(torch.from_numpy(raw)).reshape(4, 64 * 32)
    assert torch.equal(torch.from_numpy(np.asarray(theirs, dtype=np.float32)), ours)


def test_quantized_weights_come_back_within_a_step():
    values = np.random.default_rng(3).standard_normal((8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, GGMLQuantizationType.Q5_0)
    ours = reference_dequantize_q5_0(torch.from_numpy(raw.reshape(-1, BLOCK_BYTES))).reshape(8, 256)
    steps = np.abs(values.reshape(-1, 32)).max(axis=1, keepdims=True) / 16  # |d| per block
    error = np.abs(ours.numpy() - values).reshape(-1, 32)
    # Half a step from rounding; a whole one where +16 steps clip to +15 (d takes the sign of the block's max).
    assert (error <= steps * 0.5 * 1.01).mean() > 0.95
    assert (error <= steps * 1.01).all()


def test_engine_serves_a_q5_0_gguf_on_block_linears(tmp_path):
    model_dir = make_tiny_hf_checkpoint(tmp_path / "hf", "llama-untied")
    path = write_tiny_gguf(tmp_path / "tiny-q5_0.gguf", model_dir, "Q5_0")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    tokens = {}
    for block_quant in (True, False):
        engine = Engine(EngineConfig(model=str(path), num_kv_blocks=16, block_quant_linears=block_quant))
        assert {t.type_name for t in engine.loaded.block_tensors.values()} == {"Q5_0"}
        swapped = [m for m in engine.model.modules() if isinstance(m, BlockQuantLinear)]
        if block_quant and native_kernels() is not None:
            assert len(swapped) == 4 * engine.loaded.config.num_layers + 1
            assert all(m.packed.kind == "q8" and torch.equal(m.packed.dequantize(), m.weight) for m in swapped)
        else:
            assert not swapped
        tokens[block_quant] = [c.token_ids for c in engine.generate(prompts, params)]
    # The same weights either way; only fp32 summation orders differ (none of these argmaxes is that close).
    assert tokens[True] == tokens[False] and all(len(t) == 8 for t in tokens[True])
