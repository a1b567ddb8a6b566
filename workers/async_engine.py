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
from typing import AsyncIterator

from workers.engine import Engine
from workers.outputs import RequestOutput
from workers.sampling_params import SamplingParams
from workers.sequence import Sequence

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop stopped after an internal error; the replica should be replaced."""


@dataclass(frozen=True)
class _Add:
    seq: Sequence
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tierserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                       params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs until the request finishes. Closing the iterator early aborts the request."""
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}")
        seq = self.engine.make_sequence(request_id, prompt, prompt_token_ids, params)  # raises on bad input
        stream: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Add(seq, stream, asyncio.get_running_loop()))
        finished = False
        try:
            while True:
                item = await stream.get()
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
            while True:
                # Block for work only when idle; otherwise drain what arrived and keep stepping.
                block = not self.engine.has_unfinished()
                while True:
                    try:
                        command = self._inbox.get(block=block)
                    except queue.Empty:
                        break
                    if command is None:
                        return
                    self._apply(command)
                    block = False
                for output in self.engine.step():
                    self._deliver(output)
        except BaseException as exc:  # noqa: BLE001 - surface anything to the waiting streams
            logger.exception("engine loop died")
            self._error = exc
            for add in list(self._streams.values()):
                add.loop.call_soon_threadsafe(add.stream.put_nowait, EngineDeadError(f"engine loop died: {exc!r}"))
            self._streams.clear()

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_sequence(command.seq)
            except Exception as exc:  # duplicate request id and the like: tell that caller only
                command.loop.call_soon_threadsafe(command.stream.put_nowait, exc)
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
        add.loop.call_soon_threadsafe(add.stream.put_nowait, output)
