"""KV channels (workers/dist/): one long-lived pair group per (prefill, decode) replica pair, framed transfers in any
order, cancellation, dead peers and epochs. Real gloo groups, in one process (each side on its own threads) and
across two processes."""

import multiprocessing as mp
import random
import time

import pytest
import torch

from workers.dist.frames import Frame, FrameError, FrameKind
from workers.dist.kv_receiver import HELLO_COUNT_KEY, HELLO_KEY, KVReceiver
from workers.dist.kv_sender import KVSender
from workers.dist.pair_groups import backend_for, form_pair_group
from workers.kv.transfer import KVTransferError, PeerEndpoint

DIGEST = 0x1234
CPU = torch.device("cpu")


def until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def pair():
    receiver = KVReceiver("127.0.0.1", DIGEST, CPU, timeout_s=5, max_payload_bytes=1 << 20)
    sender = KVSender("prefill-a", CPU, timeout_s=5, heartbeat_s=0.2)
    yield sender, receiver
    sender.close(join_timeout_s=5)
    receiver.close(join_timeout_s=5)


def payload(tag: int, nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(tag))


def test_one_channel_carries_many_requests_in_any_order(pair):
    sender, receiver = pair
    sizes = {tag: random.Random(tag).randint(1, 5000) for tag in range(1, 17)}
    received: dict[int, torch.Tensor] = {}
    pendings = [receiver.expect(tag, nbytes, lambda buffer, tag=tag: received.__setitem__(tag, buffer.clone()))
                for tag, nbytes in sizes.items()]
    order = list(sizes)
    random.Random(0).shuffle(order)
    futures = [sender.send("decode-x", receiver.endpoint, tag, DIGEST, payload(tag, sizes[tag])) for tag in order]
    assert [f.result(timeout=20) for f in futures] == [sizes[tag] for tag in order]
    assert [p.done.result(timeout=20) for p in pendings] == list(sizes.values())
    assert all(torch.equal(received[tag], payload(tag, sizes[tag])) for tag in sizes)
    # Formed once, on both sides: one channel, one epoch, every frame on it.
    (sent,) = sender.channel_stats()
    (got,) = receiver.channel_stats()
    assert (sent.sender_id, sent.epoch, sent.frames) == ("decode-x", 0, 16)
    assert (got.sender_id, got.epoch, got.frames, got.dropped) == ("prefill-a", 0, 16, 0)
    assert receiver.num_pending == 0


def test_bytes_for_a_cancelled_request_are_dropped_and_the_channel_goes_on(pair):
    sender, receiver = pair
    written = []
    gone = receiver.expect(1, 100, written.append)
    assert receiver.cancel(gone) and gone.done.cancelled()  # nothing will write: its blocks may be freed now
    assert sender.send("decode-x", receiver.endpoint, 1, DIGEST, payload(1, 100)).result(timeout=20) == 100
    after = receiver.expect(2, 50, written.append)
    sender.send("decode-x", receiver.endpoint, 2, DIGEST, payload(2, 50)).result(timeout=20)
    assert after.done.result(timeout=20) == 50
    assert len(written) == 1 and torch.equal(written[0], payload(2, 50))
    (stats,) = receiver.channel_stats()
    assert stats.frames == 2 and stats.dropped == 1
    assert not receiver.cancel(after)  # already delivered: nothing to take back


def test_a_frame_that_does_not_fit_fails_its_request_with_a_clear_error(pair):
    sender, receiver = pair
    wrong_layout = receiver.expect(1, 10, lambda buffer: None)
    sender.send("decode-x", receiver.endpoint, 1, DIGEST + 1, payload(1, 10)).result(timeout=20)
    with pytest.raises(KVTransferError, match="layout"):
        wrong_layout.done.result(timeout=20)
    wrong_size = receiver.expect(2, 10, lambda buffer: None)
    sender.send("decode-x", receiver.endpoint, 2, DIGEST, payload(2, 11)).result(timeout=20)
    with pytest.raises(KVTransferError, match="11 bytes"):
        wrong_size.done.result(timeout=20)
    ok = receiver.expect(3, 10, lambda buffer: None)  # the channel itself is fine
    sender.send("decode-x", receiver.endpoint, 3, DIGEST, payload(3, 10)).result(timeout=20)
    assert ok.done.result(timeout=20) == 10


def test_a_gone_receiver_is_detected_and_the_next_send_forms_a_new_epoch(pair):
    sender, receiver = pair
    sender.send("decode-x", receiver.endpoint, 1, DIGEST, payload(1, 10)).result(timeout=20)
    receiver.close(join_timeout_s=5)  # scale-down: the decode replica goes away
    # The sender's heartbeat finds the closed socket and drops the channel without any request asking.
    assert until(lambda: sender.peers == [], seconds=10), sender.channel_stats()
    replacement = KVReceiver("127.0.0.1", DIGEST, CPU, timeout_s=5, max_payload_bytes=1 << 20)
    try:
        pending = replacement.expect(7, 10, lambda buffer: None)
        sender.send("decode-x", replacement.endpoint, 7, DIGEST, payload(7, 10)).result(timeout=20)
        assert pending.done.result(timeout=20) == 10
        (stats,) = sender.channel_stats()
        assert stats.epoch == 1  # a fresh rendezvous, never the broken one
    finally:
        sender.close(join_timeout_s=5)
        replacement.close(join_timeout_s=5)


def test_an_unreachable_peer_fails_the_send_within_the_timeout():
    sender = KVSender("prefill-a", CPU, timeout_s=2, heartbeat_s=0.2)
    started = time.monotonic()
    future = sender.send("decode-nowhere", PeerEndpoint("127.0.0.1", 1), 1, DIGEST, payload(1, 10))
    with pytest.raises(KVTransferError, match="cannot reach KV peer"):
        future.result(timeout=20)
    assert time.monotonic() - started < 10 and sender.peers == []


def test_a_stranger_in_the_store_is_ignored(pair):
    import torch.distributed as dist

    sender, receiver = pair
    stranger = dist.TCPStore("127.0.0.1", receiver.endpoint.port, is_master=False, use_libuv=True)
    index = stranger.add(HELLO_COUNT_KEY, 1)
    stranger.set(HELLO_KEY.format(index=index), b"\x80not json")
    pending = receiver.expect(1, 10, lambda buffer: None)
    sender.send("decode-x", receiver.endpoint, 1, DIGEST, payload(1, 10)).result(timeout=20)
    assert pending.done.result(timeout=20) == 10
    assert [c.sender_id for c in receiver.channel_stats()] == ["prefill-a"]


def test_frames_round_trip_and_foreign_headers_are_refused():
    frame = Frame(FrameKind.DATA, tag=9, nbytes=123, layout_digest=DIGEST, epoch=2)
    assert Frame.from_tensor(frame.to_tensor()) == frame
    with pytest.raises(FrameError, match="magic"):
        Frame.from_tensor(torch.tensor([1, 2, 0, 0, 0, 0]))
    bad = frame.to_tensor()
    bad[1] = FrameKind.HEARTBEAT
    with pytest.raises(FrameError, match="payload"):
        Frame.from_tensor(bad)


def test_the_backend_follows_the_pages_device():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    if not torch.cuda.is_available():
        with pytest.raises(KVTransferError, match="NCCL"):
            receiver = KVReceiver("127.0.0.1", DIGEST, CPU, timeout_s=2, max_payload_bytes=10)
            try:
                import datetime
                import threading

                # The peer joins the control group; the NCCL data group is what this machine cannot form.
                joiner = threading.Thread(target=lambda: _join_control(receiver.endpoint), daemon=True)
                joiner.start()
                form_pair_group("127.0.0.1", receiver.endpoint.port, "kv-chan/test/0/", 0, "nccl",
                                datetime.timedelta(seconds=5))
            finally:
                receiver.close()


def _join_control(endpoint: PeerEndpoint) -> None:
    import datetime

    try:
        form_pair_group(endpoint.host, endpoint.port, "kv-chan/test/0/", 1, "gloo", datetime.timedelta(seconds=5))
    except KVTransferError:
        pass


# ---- two processes: a prefill replica that sends, then dies ----------------------------------------------------
def _sending_process(endpoint: tuple[str, int], sizes: dict[int, int], done) -> None:
    sender = KVSender("prefill-proc", CPU, timeout_s=10, heartbeat_s=0.2)
    futures = [sender.send("decode-main", PeerEndpoint(*endpoint), tag, DIGEST, payload(tag, nbytes))
               for tag, nbytes in sizes.items()]
    done.put([f.result(timeout=60) for f in futures])
    time.sleep(0.5)
    import os

    os._exit(0)  # killed: no goodbye frame, the socket just closes


def test_across_processes_bytes_arrive_identical_and_a_dead_sender_is_dropped_at_once():
    receiver = KVReceiver("127.0.0.1", DIGEST, CPU, timeout_s=30, max_payload_bytes=1 << 24)
    try:
        sizes = {1: 3_000_000, 2: 17, 3: 65_536}
        received = {}
        pendings = [receiver.expect(tag, nbytes, lambda buffer, tag=tag: received.__setitem__(tag, buffer.clone()))
                    for tag, nbytes in sizes.items()]
        ctx = mp.get_context("spawn")
        done = ctx.Queue()
        process = ctx.Process(target=_sending_process, args=((receiver.endpoint.host, receiver.endpoint.port),
                                                             sizes, done))
        process.start()
        assert done.get(timeout=90) == list(sizes.values())
        assert [p.done.result(timeout=30) for p in pendings] == list(sizes.values())
        assert all(torch.equal(received[tag], payload(tag, nbytes)) for tag, nbytes in sizes.items())
        process.join(30)
        # The socket closed with the process: the channel is gone well before the 30 s idle timeout.
        started = time.monotonic()
        assert until(lambda: receiver.channel_stats() == [], seconds=10)
        assert time.monotonic() - started < 10
    finally:
        receiver.close(join_timeout_s=5)
