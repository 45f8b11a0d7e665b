"""Group commit: concurrent reserves and commits share one database transaction.

Every request needs a reserve before and a commit after its generation. Done one by one, each
is a transaction of its own (a durable commit, several round trips, a few hundred
microseconds of Python); under concurrency most of that is overhead. One thread takes every op
waiting in the queue and applies them with Ledger.apply_batch; a batch forms by itself while
the previous one is in the database. Each op still succeeds or fails on its own.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from .. import metrics
from .ledger import CommitOp, Ledger, Reservation, ReserveOp

log = logging.getLogger(__name__)

MAX_BATCH = 64
_STOP = object()


class GroupCommitter:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="t2i-group-commit", daemon=True)
        self._thread.start()

    async def reserve(self, op: ReserveOp) -> Reservation:
        return await self._submit(op)

    async def commit(self, op: CommitOp) -> int:
        return await self._submit(op)

    async def _submit(self, op):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((op, loop, future))
        return await future

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(more)
            metrics.LEDGER_BATCH.observe(len(batch))
            try:
                results = self.ledger.apply_batch([op for op, _, _ in batch])
            except Exception as error:  # the database failed: every op of the batch fails
                log.exception("ledger batch failed", extra={"ops": len(batch)})
                results = [error] * len(batch)
            for (_, loop, future), result in zip(batch, results):
                loop.call_soon_threadsafe(_settle, future, result)


def _settle(future: asyncio.Future, result) -> None:
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
