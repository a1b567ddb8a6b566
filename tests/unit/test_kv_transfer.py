"""KV transfer: two real processes, a pairwise gloo group, encoded blocks arrive bit-identical."""

import multiprocessing as mp

import pytest
import torch

from workers.kv.presets import make_codec
from workers.kv.transfer import KVTransferError, KVTransport, block_nbytes, pack_blocks, unpack_blocks

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


def _sender(endpoint_queue, result_queue, dtype_name: str) -> None:
    transport = KVTransport(timeout_s=30)
    endpoint_queue.put((transport.endpoint.host, transport.endpoint.port))
    pages = make_pages(getattr(torch, dtype_name), seed=1)
    group = transport.serve_group("prefill-0->decode-0")
    sent = transport.send(group, pages, [3, 1, 8, 4], tag=7)
    result_queue.put(("sent", sent))


def _receiver(endpoint_queue, result_queue, dtype_name: str) -> None:
    from workers.kv.transfer import PeerEndpoint

    host, port = endpoint_queue.get(timeout=30)
    transport = KVTransport(timeout_s=30)
    pages = make_pages(getattr(torch, dtype_name), seed=None)
    group = transport.join_group(PeerEndpoint(host, port), "prefill-0->decode-0")
    received = transport.recv(group, pages, [0, 10, 6, 2], tag=7)
    expected = make_pages(getattr(torch, dtype_name), seed=1)
    identical = all(torch.equal(e[[3, 1, 8, 4]].view(torch.uint8), g[[0, 10, 6, 2]].view(torch.uint8))
                    for exp, got in zip(expected, pages) for e, g in zip(exp.tensors(), got.tensors()))
    result_queue.put(("received", received, identical))


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_two_processes_gloo_blocks_arrive_bit_identical(dtype_name):
    ctx = mp.get_context("spawn")
    endpoint_queue, result_queue = ctx.Queue(), ctx.Queue()
    sender = ctx.Process(target=_sender, args=(endpoint_queue, result_queue, dtype_name))
    receiver = ctx.Process(target=_receiver, args=(endpoint_queue, result_queue, dtype_name))
    sender.start()
    receiver.start()
    results = dict((r[0], r[1:]) for r in (result_queue.get(timeout=90) for _ in range(2)))
    sender.join(30)
    receiver.join(30)
    nbytes = 4 * block_nbytes(make_pages(getattr(torch, dtype_name), seed=None))
    assert results["sent"] == (nbytes,)
    assert results["received"] == (nbytes, True)
    assert sender.exitcode == 0 and receiver.exitcode == 0


def test_unreachable_peer_is_a_clear_error():
    from workers.kv.transfer import PeerEndpoint

    transport = KVTransport(timeout_s=2)
    with pytest.raises(KVTransferError, match="cannot reach KV peer"):
        transport.join_group(PeerEndpoint("127.0.0.1", 1), "nobody")


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
