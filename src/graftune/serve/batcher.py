"""The batching window: requests that arrive together become one forward.

Requests wait in an asyncio queue. The batcher takes the first, then keeps taking more until the batch holds
``max_batch`` rows or ``max_wait_ms`` have passed since the first one arrived, and hands the batch to the model
store's worker thread. While that forward runs, new requests queue up; the next batch takes them at once (their
window has already passed), so under load batches fill by themselves and a lone request waits at most the window.
A request is never split: one larger than ``max_batch`` runs alone. (Text-generation-inference's router works
this way, with tokens instead of rows.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("graftune.serve")


@dataclass
class _Pending:
    rows: Any  # a store.Rows
    size: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchRecord:
    """What one forward held: for tests and /metrics."""

    requests: int
    rows: int
    adapters: tuple[str, ...]
    seconds: float


class Batcher:
    """Args:
    run: ``run(list_of_rows) -> list_of_results`` on the model's thread, given as ``submit(fn, arg) -> Future``
        (``ModelStore.submit``) and ``fn`` (``ModelStore.classify``, or ``ModelStore.generate`` for a generation
        queue: a batch is then one batched generation). A result that is an exception is raised to its request
        alone (the rest of the batch is answered).
    max_batch: rows per forward at most (a larger single request still runs, alone).
    max_wait_ms: how long the first request of a batch waits for company.
    on_batch: called with each :class:`BatchRecord` (metrics).
    """

    def __init__(self, submit: Callable[..., Future], run: Callable[[Sequence[Any]], list], *, max_batch: int = 32,
                 max_wait_ms: float = 5.0, on_batch: Callable[[BatchRecord], None] | None = None,
                 history: int = 256):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.submit_fn, self.run = submit, run
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.history: deque[BatchRecord] = deque(maxlen=history)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: _Pending | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="graftune-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for p in self._drain_all():
            if not p.future.done():
                p.future.set_exception(RuntimeError("the server is shutting down"))

    async def __call__(self, rows: Any, size: int) -> Any:
        """Queue one request (``size`` rows) and wait for its result."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started (the app's lifespan starts it)")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(rows, size, future))
        return await future

    # --- the loop ----------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            started = time.monotonic()
            try:
                results = await asyncio.wrap_future(self.submit_fn(self.run, [p.rows for p in batch]))
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as e:  # a bug in a forward: fail this batch's requests, keep serving
                log.exception("batch of %d requests failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            record = BatchRecord(len(batch), sum(p.size for p in batch),
                                 tuple(sorted({p.rows.entry.name for p in batch})), time.monotonic() - started)
            self.history.append(record)
            if self.on_batch is not None:
                self.on_batch(record)
            for p, result in zip(batch, results):
                if p.future.done():  # a client that went away has cancelled its future
                    continue
                if isinstance(result, Exception):  # this request alone was refused (a prompt too long)
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, rows = [first], first.size
        deadline = first.arrived + self.max_wait
        while rows < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
            if nxt.future.done():  # cancelled while queued
                continue
            if rows + nxt.size > self.max_batch:
                self._carry = nxt
                break
            batch.append(nxt)
            rows += nxt.size
        return batch

    def _drain_all(self) -> list[_Pending]:
        out = [self._carry] if self._carry else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out
