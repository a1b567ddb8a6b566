"""AsyncEngine: the Engine's step loop on a background thread, with an async token stream per request.

Safe to call from asyncio code (Ray Serve replicas): requests are validated on the caller's side,
then handed to the loop thread through a queue; only the loop thread touches engine state.
Failure mode: if a step raises, every open stream receives the error (never a silent hang).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable

import torch

from workers.engine import Engine
from workers.kv.block_scores import ScoreSpec
from workers.outputs import RequestOutput
from workers.sampling_params import SamplingParams
from workers.sequence import Sequence
from workers.spec.drafter import PromptFeatures

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop stopped after an internal error; the replica should be replaced."""


@dataclass(frozen=True)
class _Add:
    seq: Sequence
    score_spec: ScoreSpec | None  # block scores a decode tier wants computed here (prefill role)
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Rejected:
    """The loop refused a request before admitting it (e.g. duplicate id)."""

    error: Exception


@dataclass(frozen=True)
class _Call:
    """Run fn(engine) on the loop thread (engine state has one owner) and resolve the future."""

    fn: Callable[[Engine], Any]
    future: asyncio.Future | None  # None: posted, nobody waits for the result
    loop: asyncio.AbstractEventLoop | None


@dataclass(frozen=True)
class _Commit:
    request_id: str
    first_token_id: int
    block_scores: torch.Tensor | None
    drafter_features: PromptFeatures | None
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tierserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                       params: SamplingParams | None = None, hold_kv: bool = False,
                       score_spec: ScoreSpec | None = None) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs until the request finishes. Closing the iterator early aborts the request."""
        self._check_alive()
        seq = self.engine.make_sequence(request_id, prompt, prompt_token_ids, params, hold_kv)  # raises on bad input
        stream: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Add(seq, score_spec, stream, asyncio.get_running_loop()))
        async for output in self._drain(request_id, stream):
            yield output

    async def stream_imported(self, request_id: str, first_token_id: int, block_scores: torch.Tensor | None = None,
                              drafter_features: PromptFeatures | None = None) -> AsyncIterator[RequestOutput]:
        """Start decoding a request whose KV was imported into blocks from reserve_import."""
        self._check_alive()
        stream: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Commit(request_id, first_token_id, block_scores, drafter_features, stream,
                                asyncio.get_running_loop()))
        async for output in self._drain(request_id, stream):
            yield output

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) between steps on the loop thread; returns its result (or raises its error)."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(_Call(fn, future, loop))
        return await future

    def post(self, fn: Callable[[Engine], Any]) -> None:
        """Queue fn(engine) on the loop thread and return at once (no result; errors are dropped). It is in the
        queue when this returns, so it runs after every command queued before it: usable from a task that is
        being cancelled, where awaiting is no longer possible."""
        self._inbox.put(_Call(fn, None, None))

    @property
    def score_spec(self) -> ScoreSpec | None:
        """How this engine's own requests keep eviction scores (a decode tier asks the prefill tier for them)."""
        return self.engine.score_spec

    # ---- the handoff's steps, each run between steps on the loop thread --------------------------------
    async def reserve_import(self, seq: Sequence) -> list[int] | None:
        return await self.call(partial(Engine.reserve_import, seq=seq))

    async def held_kv(self, request_id: str):
        return await self.call(partial(Engine.held_kv, request_id=request_id))

    async def release_kv(self, request_id: str) -> bool:
        return await self.call(partial(Engine.release_kv, request_id=request_id))

    def release_behind(self, request_id: str, owner: Sequence | None = None) -> None:
        """Queue the release of a request's held or reserved blocks without waiting (the caller may be being
        cancelled). It runs after a hold or reservation still queued; with `owner`, only that sequence's blocks are
        freed (never those of another request that took the same id since)."""
        self.post(partial(Engine.release_kv, request_id=request_id, owner=owner))

    def detach_behind(self, request_id: str, owner: Sequence) -> None:
        """Queue: take the reservation off its id (free for reuse at once) but keep its blocks (free_behind)."""
        self.post(partial(Engine.detach_kv, request_id=request_id, owner=owner))

    def free_behind(self, seq: Sequence) -> None:
        """Queue: free a detached sequence's blocks."""
        self.post(partial(Engine.free_detached, seq=seq))

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}")

    async def _drain(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, _Rejected):
                    finished = True  # never admitted: there is nothing to abort (the id may be someone else's)
                    raise item.error
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def shutdown(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    # ---- loop thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            ep = self.engine.expert_parallel
            # Expert-parallel ranks step together, so an idle one still wakes to agree with the others (and serves
            # its experts while they have work).
            idle_wait_s = self.engine.config.expert_parallel.idle_poll_ms / 1000 if ep is not None else None
            while True:
                # Block for work only when idle; otherwise drain what arrived and keep stepping.
                block = not self.engine.has_unfinished() and not (ep is not None and ep.peers_busy)
                while True:
                    try:
                        command = self._inbox.get(block=block, timeout=idle_wait_s if block else None)
                    except queue.Empty:
                        break
                    if command is None:
                        self.engine.close()
                        return
                    self._apply(command)
                    block = False
                for output in self.engine.step():
                    self._deliver(output)
        except BaseException as exc:  # noqa: BLE001 - surface anything to the waiting streams
            logger.exception("engine loop died")
            self._error = exc
            for add in list(self._streams.values()):
                _put(add.loop, add.stream, EngineDeadError(f"engine loop died: {exc!r}"))
            self._streams.clear()

    def _apply(self, command: _Add | _Abort | _Call | _Commit) -> None:
        if isinstance(command, _Call):
            try:
                result = command.fn(self.engine)
            except Exception as exc:  # the caller's error, not the loop's
                if command.future is not None:
                    _call_soon(command.loop, _resolve, command.future, None, exc)
                else:
                    logger.warning("posted engine call failed: %r", exc)
            else:
                if command.future is not None:
                    _call_soon(command.loop, _resolve, command.future, result, None)
        elif isinstance(command, _Commit):
            self._streams[command.request_id] = command
            try:
                output = self.engine.commit_import(command.request_id, command.first_token_id, command.block_scores,
                                                   command.drafter_features)
            except Exception as exc:
                del self._streams[command.request_id]
                _put(command.loop, command.stream, _Rejected(exc))
                return
            self._deliver(output)
        elif isinstance(command, _Add):
            try:
                self.engine.add_sequence(command.seq, command.score_spec)
            except Exception as exc:  # duplicate request id and the like: tell that caller only
                _put(command.loop, command.stream, _Rejected(exc))
                return
            self._streams[command.seq.request_id] = command
        else:
            output = self.engine.abort(command.request_id)
            if output is not None:
                self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        add = self._streams.get(output.request_id)
        if add is None:
            return
        if output.finished:
            del self._streams[output.request_id]
        if not _put(add.loop, add.stream, output) and not output.finished:
            # The caller's event loop is gone (client vanished without closing its stream): free the request.
            del self._streams[output.request_id]
            self.engine.abort(output.request_id)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> bool:
    """Schedule fn on the caller's loop; False if that loop has closed (its caller is gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _put(loop: asyncio.AbstractEventLoop, stream: asyncio.Queue, item: Any) -> bool:
    return _call_soon(loop, stream.put_nowait, item)
