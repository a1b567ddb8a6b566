"""KV transfer bytes: encoded blocks pack into one buffer and scatter back bit-identical (the channels that move
them between processes: test_kv_channels.py)."""

import pytest
import torch

from workers.kv.presets import make_codec
from workers.kv.transfer import KVTransferError, block_nbytes, layout_digest, pack_blocks, unpack_blocks

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 3, 12, 4, 2, 8


def make_pages(dtype: torch.dtype, seed: int | None):
    codec = make_codec("auto", model_dtype=dtype, num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM)
    pages = [codec.allocate(layer, NUM_BLOCKS, BLOCK_SIZE, torch.device("cpu")) for layer in range(NUM_LAYERS)]
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        for layer in pages:
            for t in layer.tensors():
                t.copy_(torch.randn(t.shape, generator=generator).to(t.dtype))
    return pages


def test_pack_unpack_round_trip_is_exact():
    source = make_pages(torch.bfloat16, seed=0)
    target = make_pages(torch.bfloat16, seed=None)
    buffer = pack_blocks(source, [7, 2, 9])
    assert buffer.dtype == torch.uint8 and buffer.numel() == 3 * block_nbytes(source)
    unpack_blocks(buffer, target, [0, 5, 11])
    for src, dst in zip(source, target):
        for s, d in zip(src.tensors(), dst.tensors()):
            assert torch.equal(s[[7, 2, 9]].view(torch.uint8), d[[0, 5, 11]].view(torch.uint8))
            assert d[1].abs().sum() == 0  # untouched blocks stay untouched
    with pytest.raises(KVTransferError, match="layout expects"):
        unpack_blocks(buffer[:-1], target, [0, 5, 11])


@pytest.mark.parametrize("name", ["tq-k4v3", "tq-k3v4+qjl"])
def test_encoded_pages_round_trip_as_stored(name):
    """A quantized codec's pages (uint8 codes + fp16 scales, + QJL sign bytes and norms) travel byte for byte,
    at the accounted size."""
    codec = make_codec(name, model_dtype=torch.float32, num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS,
                       head_dim=HEAD_DIM)
    source = [codec.allocate(layer, NUM_BLOCKS, BLOCK_SIZE, torch.device("cpu")) for layer in range(NUM_LAYERS)]
    target = [codec.allocate(layer, NUM_BLOCKS, BLOCK_SIZE, torch.device("cpu")) for layer in range(NUM_LAYERS)]
    generator = torch.Generator().manual_seed(3)
    slots = torch.arange(NUM_BLOCKS * BLOCK_SIZE)
    for pages in source:
        codec.write(pages, slots, torch.randn(slots.numel(), NUM_KV_HEADS, HEAD_DIM, generator=generator),
                    torch.randn(slots.numel(), NUM_KV_HEADS, HEAD_DIM, generator=generator))
    assert block_nbytes(source) == BLOCK_SIZE * sum(codec.bytes_per_token(layer) for layer in range(NUM_LAYERS))
    buffer = pack_blocks(source, [4, 1])
    unpack_blocks(buffer, target, [0, 2])
    for src, dst in zip(source, target):
        for s, d in zip(src.tensors(), dst.tensors()):
            assert s.dtype in (torch.uint8, torch.float16)
            assert torch.equal(s[[4, 1]].view(torch.uint8), d[[0, 2]].view(torch.uint8))


def test_layout_digest_tells_page_formats_apart():
    fp32, bf16 = make_pages(torch.float32, seed=None), make_pages(torch.bfloat16, seed=None)
    assert layout_digest(fp32) == layout_digest(make_pages(torch.float32, seed=0))  # contents do not matter
    assert layout_digest(fp32) != layout_digest(bf16)
    assert 0 <= layout_digest(fp32) < 2**63
