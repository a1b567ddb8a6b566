"""The KV handoff protocol (workers/handoff/) between two real engines in one process: the bytes cross a real gloo
channel; fakes stand in only for the prefill tier where a test needs it to fail, hang or lie. Every path (success,
`fail`, `recompute`, codec mismatch, a client gone mid-handoff, bytes that never come, a channel that cannot carry
them) ends with no block held on either side."""

import asyncio
import contextlib
import concurrent.futures
import dataclasses

import pytest
import torch

from tests.unit.test_engine import make_engine, random_prompts
from workers.async_engine import AsyncEngine
from workers.dist.kv_receiver import KVReceiver
from workers.dist.kv_sender import KVSender
from workers.handoff.decode import DecodeHandoff, HandoffPolicy
from workers.handoff.prefill import LocalPrefillClient, PrefillHandoff
from workers.handoff.records import CodecMismatchError, KVLayout, PrefillRequest, TransferFailedError
from workers.kv.transfer import KVTransferError, block_nbytes, layout_digest
from workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
CPU = torch.device("cpu")


def layout_of(engine) -> KVLayout:
    return KVLayout(engine.codec.name, engine.block_size, block_nbytes(engine.kv_pages), len(engine.kv_pages))


@dataclasses.dataclass
class Tiers:
    decode: DecodeHandoff
    prefill: PrefillHandoff
    receiver: KVReceiver
    sender: KVSender

    @property
    def decode_pool(self):
        return self.decode.engine.engine.pool

    @property
    def prefill_pool(self):
        return self.prefill.engine.engine.pool


@contextlib.contextmanager
def tiers(tiny_loaded, policy: str = "recompute", client=None, timeout_s: float = 5.0):
    """A decode and a prefill replica in one process, joined by a real channel; `client(prefill_handoff)` may
    replace the in-process prefill tier."""
    decode_engine, prefill_engine = AsyncEngine(make_engine(tiny_loaded)), AsyncEngine(make_engine(tiny_loaded))
    pages = decode_engine.engine.kv_pages
    receiver = KVReceiver("127.0.0.1", layout_digest(pages), CPU, timeout_s=timeout_s,
                          max_payload_bytes=decode_engine.engine.pool.num_blocks * block_nbytes(pages))
    sender = KVSender("prefill-0", CPU, timeout_s=timeout_s, heartbeat_s=0.2)
    layout = layout_of(decode_engine.engine)
    prefill = PrefillHandoff(prefill_engine, sender, "prefill-0", layout, timeout_s=timeout_s)
    prefill_client = client(prefill) if client else LocalPrefillClient(prefill)
    decode = DecodeHandoff(decode_engine, receiver, prefill_client, "decode-0", layout,
                           HandoffPolicy(timeout_s, policy))
    try:
        yield Tiers(decode, prefill, receiver, sender)
    finally:
        sender.close(join_timeout_s=5)
        receiver.close(join_timeout_s=5)
        decode_engine.shutdown()
        prefill_engine.shutdown()


async def generate(tiers: Tiers, request_id: str, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    engine = tiers.decode.engine
    seq = engine.engine.make_sequence(request_id, prompt_token_ids=prompt, params=params)
    stream = await tiers.decode.run(seq)
    if stream is None:  # recompute
        stream = engine.generate(request_id, prompt_token_ids=prompt, params=params)
    return [t async for output in stream for t in output.new_token_ids]


async def until(condition, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def eventually(condition, seconds: float = 5.0) -> bool:
    """Releases are queued behind the engine's loop thread (release_behind): poll, bounded, from sync code."""
    return asyncio.run(until(condition, seconds))


async def no_blocks_anywhere(t: Tiers) -> bool:
    return await until(lambda: t.decode_pool.num_used_blocks == 0 and t.prefill_pool.num_used_blocks == 0)


def unified_tokens(tiny_loaded, prompts, params=GREEDY) -> list[list[int]]:
    engine = make_engine(tiny_loaded)
    return [engine.generate([prompt], params)[0].token_ids for prompt in prompts]


def test_concurrent_handoffs_share_one_channel_and_equal_unified(tiny_loaded):
    prompts = random_prompts(8, seed=21, min_len=3, max_len=40)
    expected = unified_tokens(tiny_loaded, prompts)
    with tiers(tiny_loaded) as t:
        async def run_all():
            got = await asyncio.gather(*(generate(t, f"r{i}", p) for i, p in enumerate(prompts)))
            return got, await no_blocks_anywhere(t)

        got, freed = asyncio.run(run_all())
        assert got == expected and freed
        assert t.decode.stats.transfers == 8 and t.decode.stats.failures == 0
        assert t.decode.stats.object_store_transfers == 0
        # One channel, formed once, carried all eight.
        (sent,) = t.sender.channel_stats()
        (received,) = t.receiver.channel_stats()
        assert sent.frames == received.frames == 8 and sent.epoch == received.epoch == 0


class FailingCall:
    """A prefill call that raised on the prefill replica."""

    def __init__(self, error: Exception):
        self.error, self.cancelled = error, False

    def __await__(self):
        async def fail():
            raise self.error
        return fail().__await__()

    def cancel(self):
        self.cancelled = True


class HangingCall:
    """A prefill call that never answers (a busy or stuck prefill tier)."""

    def __init__(self):
        self.cancelled = False

    def __await__(self):
        return asyncio.Event().wait().__await__()

    def cancel(self):
        self.cancelled = True


class FixedClient:
    def __init__(self, call):
        self.call, self.requests = call, []

    def prefill(self, request):
        self.requests.append(request)
        return self.call


REQUEST_PROMPT = [5, 6, 7, 8, 9]


def test_fail_policy_raises_a_clear_error_and_frees_the_reservation(tiny_loaded):
    client = FixedClient(FailingCall(KVTransferError("prefill replica gone")))
    with tiers(tiny_loaded, "fail", client=lambda _: client) as t:
        with pytest.raises(TransferFailedError, match="KV transfer failed for request r1"):
            asyncio.run(generate(t, "r1", REQUEST_PROMPT))
        assert client.call.cancelled and t.decode.stats.failures == 1
        assert eventually(lambda: t.decode_pool.num_used_blocks == 0) and t.receiver.num_pending == 0


def test_recompute_policy_prefills_locally(tiny_loaded):
    client = FixedClient(FailingCall(KVTransferError("prefill replica gone")))
    with tiers(tiny_loaded, "recompute", client=lambda _: client) as t:
        assert asyncio.run(generate(t, "r1", REQUEST_PROMPT)) == unified_tokens(tiny_loaded, [REQUEST_PROMPT])[0]
        assert t.decode.stats.failures == 1 and eventually(lambda: t.decode_pool.num_used_blocks == 0)


def test_codec_mismatch_is_refused_before_any_work(tiny_loaded):
    client = FixedClient(FailingCall(CodecMismatchError("KV layout mismatch")))
    with tiers(tiny_loaded, "recompute", client=lambda _: client) as t:
        # Decode side: the mismatch propagates (no silent recompute) and the reservation is released.
        with pytest.raises(CodecMismatchError):
            asyncio.run(generate(t, "r1", REQUEST_PROMPT))
        assert eventually(lambda: t.decode_pool.num_used_blocks == 0) and t.decode.stats.failures == 0
        # Prefill side: checks the layout first, so nothing is computed or held.
        other = KVLayout(codec="tq-k4v3", block_size=16, block_nbytes=99, num_layers=2)
        request = PrefillRequest("p1", [5, 6, 7], GREEDY, t.receiver.endpoint, "decode-0", other, num_blocks=1, tag=1)
        with pytest.raises(CodecMismatchError, match="same kv_codec and block_size"):
            asyncio.run(t.prefill.run(request))
        assert eventually(lambda: t.prefill_pool.num_used_blocks == 0)


def test_a_client_gone_mid_handoff_gives_the_reservation_back(tiny_loaded):
    """Cancelled while waiting for the prefill tier (deadline, disconnect): CancelledError is not an Exception,
    and nothing else would ever commit or release the reserved blocks."""
    client = FixedClient(HangingCall())
    with tiers(tiny_loaded, client=lambda _: client) as t:
        async def cancel_mid_handoff():
            task = asyncio.ensure_future(generate(t, "r1", REQUEST_PROMPT))
            assert await until(lambda: t.decode_pool.num_used_blocks > 0)  # reserved, waiting on the prefill tier
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await until(lambda: t.decode_pool.num_used_blocks == 0)

        assert asyncio.run(cancel_mid_handoff())
        assert client.call.cancelled and t.receiver.num_pending == 0


def test_bytes_that_never_come_time_out_and_recompute(tiny_loaded):
    """The prefill tier answers with a ticket but its bytes never reach us: the wait ends at the timeout."""
    class TicketWithoutBytes:
        def __init__(self, handoff):
            self.handoff = handoff

        def prefill(self, request):
            lost = dataclasses.replace(request, tag=10_000)  # sent under a tag nobody expects: dropped on arrival
            return asyncio.ensure_future(self.handoff.run(lost))

    with tiers(tiny_loaded, client=TicketWithoutBytes, timeout_s=1.0) as t:
        tokens = asyncio.run(generate(t, "r1", REQUEST_PROMPT))
        assert tokens == unified_tokens(tiny_loaded, [REQUEST_PROMPT])[0]
        assert t.decode.stats.failures == 1 and t.receiver.channel_stats()[0].dropped == 1
        assert asyncio.run(no_blocks_anywhere(t)) and t.receiver.num_pending == 0


def test_a_channel_that_cannot_carry_the_bytes_hands_them_over_in_the_ticket(tiny_loaded):
    prompts = random_prompts(3, seed=22)
    expected = unified_tokens(tiny_loaded, prompts)
    with tiers(tiny_loaded) as t:
        t.prefill.inject_channel_failures(1)
        got = [asyncio.run(generate(t, f"r{i}", p)) for i, p in enumerate(prompts)]
        assert got == expected
        assert t.decode.stats.object_store_transfers == 1 and t.decode.stats.transfers == 3
        assert t.decode.stats.failures == 0 and asyncio.run(no_blocks_anywhere(t))


class HoldForever:
    """The prefill replica's AsyncEngine, except that held_kv() (the prefill is done, its blocks held) returns only
    when cancelled: the window between holding the KV and packing it."""

    def __init__(self, engine: AsyncEngine):
        self.inner, self.calls = engine, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def held_kv(self, request_id):
        await self.inner.held_kv(request_id)
        self.calls += 1
        await asyncio.Event().wait()


def test_a_prefill_cancelled_while_holding_its_kv_releases_it(tiny_loaded):
    with tiers(tiny_loaded) as t:
        engine = t.prefill.engine
        t.prefill.engine = HoldForever(engine)
        request = PrefillRequest("p2", REQUEST_PROMPT, GREEDY, t.receiver.endpoint, "decode-0", t.prefill.layout,
                                 num_blocks=2, tag=1)

        async def cancel_while_held():
            task = asyncio.ensure_future(t.prefill.run(request))
            assert await until(lambda: t.prefill.engine.calls > 0)
            assert engine.engine.pool.num_used_blocks > 0  # prefilled and held
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await until(lambda: engine.engine.pool.num_used_blocks == 0)

        assert asyncio.run(cancel_while_held())


class ReceiverMidWrite:
    """A KV receiver whose channel has claimed the request and is writing into its blocks right now."""

    def __init__(self, real: KVReceiver):
        self.endpoint, self.done = real.endpoint, concurrent.futures.Future()

    def expect(self, tag, nbytes, write):
        return dataclasses.make_dataclass("P", ["tag", "done"])(tag, self.done)

    def cancel(self, pending):
        return False  # too late: a write is under way


def test_blocks_under_a_write_go_back_only_once_it_is_done(tiny_loaded):
    """Blocks freed under a late write could already hold another request's KV: they wait for the write; the
    request id is free at once."""
    client = FixedClient(HangingCall())
    with tiers(tiny_loaded, client=lambda _: client) as t:
        receiver = ReceiverMidWrite(t.receiver)
        t.decode.receiver = receiver
        engine = t.decode.engine.engine

        async def cancel_while_writing():
            task = asyncio.ensure_future(generate(t, "r1", REQUEST_PROMPT))
            assert await until(lambda: t.decode_pool.num_used_blocks > 0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await until(lambda: "r1" not in engine.scheduler.reserved)
            await asyncio.sleep(0.2)  # the loop thread has had every chance to free them: it must not
            still_held = t.decode_pool.num_used_blocks > 0
            receiver.done.set_result(40)  # the write ends
            return still_held, await until(lambda: t.decode_pool.num_used_blocks == 0)

        assert asyncio.run(cancel_while_writing()) == (True, True)
