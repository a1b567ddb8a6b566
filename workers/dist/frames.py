"""Frames: what one KV channel carries, one header before each payload.

A channel is one long-lived pair group reused by every request between two replicas, in any order, so each
transfer says what it is: a fixed-size int64 header (kind, the receiver's tag for the request, the payload's
byte count, the sender's page-layout digest, the channel epoch), then (DATA only) the payload bytes. Headers
travel on the control group (gloo, CPU tensors) whatever carries the payload.
Heartbeats are headers with no payload: an idle sender sends one every heartbeat interval, so a receiver that
hears nothing for its idle timeout knows the peer is gone (gloo also fails a wait at once on a closed socket).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

MAGIC = 0x7453_4B56  # "tSKV": a header from anything else is refused, not parsed
HEADER_WORDS = 6


class FrameKind(enum.IntEnum):
    HEARTBEAT = 1
    DATA = 2
    CLOSE = 3  # the sender is shutting the channel down (scale-down): not an error


class FrameError(ValueError):
    """A header that is not one of ours (wrong magic or kind, negative size)."""


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    tag: int = 0  # the receiving replica's id for the request (it reserved the blocks under it)
    nbytes: int = 0  # payload bytes that follow (DATA only)
    layout_digest: int = 0  # the sender's page layout (workers.kv.transfer.layout_digest)
    epoch: int = 0

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([MAGIC, int(self.kind), self.tag, self.nbytes, self.layout_digest, self.epoch],
                            dtype=torch.int64)

    @staticmethod
    def empty_tensor() -> torch.Tensor:
        return torch.zeros(HEADER_WORDS, dtype=torch.int64)

    @classmethod
    def from_tensor(cls, words: torch.Tensor) -> "Frame":
        magic, kind, tag, nbytes, digest, epoch = (int(w) for w in words.tolist())
        if magic != MAGIC:
            raise FrameError(f"bad frame magic {magic:#x}")
        if kind not in FrameKind._value2member_map_:
            raise FrameError(f"unknown frame kind {kind}")
        if nbytes < 0 or (kind != FrameKind.DATA and nbytes):
            raise FrameError(f"frame of kind {FrameKind(kind).name} with {nbytes} payload bytes")
        return cls(FrameKind(kind), tag, nbytes, digest, epoch)
