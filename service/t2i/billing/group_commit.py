"""The one money path: every reserve, commit and release goes through here, grouped.

Every request needs a reserve before and a commit or release after its generation. Done one
by one, each is a transaction of its own (a durable commit, several round trips, a few hundred
microseconds of Python); under concurrency most of that is overhead. One thread takes every op
waiting in the queue and applies them with Ledger.apply_batch in one transaction; a batch
forms by itself while the previous one is in the database.

Rules, each for a failure seen in production-like tests:
- Each op succeeds or fails on its own. When a batch's transaction fails, its ops are retried
  one by one, so one caller's bad op (an over-long value, say) fails only that caller.
- The ledger being unreachable is Unavailable, naming it, not an internal error.
- A reserve whose caller was cancelled at any moment (before, during or after the
  transaction) is released as soon as its reservation exists: no money waits for the TTL.
- A release that fails is retried, with backoff, until it succeeds; `pending_releases` says
  how many wait. A commit is not retried (its caller is told, and releases instead, with
  `refund`: had the commit landed after all, its charge is given back).
- A batch that failed because the connection broke may still have committed: the COMMIT can
  reach the database and its acknowledgment be lost. Its reserves answered Unavailable, so
  nobody would resolve them; each is released by its id (chosen before the transaction) once
  the database answers again, a no-op where the reservation never came to be.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future

from .. import metrics
from .database import unavailable_error
from .ledger import CommitOp, Ledger, Op, ReleaseOp, Replay, Reservation, ReserveOp

log = logging.getLogger(__name__)

MAX_BATCH = 64
RETRY_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds between attempts of a failed release
_STOP = object()


class GroupCommitter:
    def __init__(self, ledger: Ledger, *, where: str = "the billing database") -> None:
        self.ledger = ledger
        self.where = where  # how errors name the ledger (a redacted URL)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._retries: list[tuple[float, int, ReleaseOp]] = []  # (due, attempt, op)
        self._thread = threading.Thread(target=self._run, name="t2i-group-commit", daemon=True)
        self._thread.start()

    # --- callers (event loop) --------------------------------------------------------------

    async def reserve(self, op: ReserveOp) -> Reservation | Replay:
        future = self.submit(op)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            # Whenever the caller went away, the reservation (once it exists) goes back.
            future.add_done_callback(self._release_orphan)
            raise

    async def commit(self, op: CommitOp) -> int:
        return await asyncio.wrap_future(self.submit(op))

    def release(self, op: ReleaseOp) -> Future:
        """Queue a release; it is retried until it succeeds. The future says whether this
        call released it (False: it was already resolved)."""
        return self.submit(op)

    @property
    def pending_releases(self) -> int:
        return len(self._retries)

    # --- any thread --------------------------------------------------------------------------

    def submit(self, op: Op) -> Future:
        future: Future = Future()
        self._queue.put((op, future, 0))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop after trying the queued ops and the pending releases once more."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _release_orphan(self, future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        reservation = future.result()
        if isinstance(reservation, Reservation):
            log.info("releasing the reservation of a cancelled request", extra={"reservation": reservation.id})
            self.submit(ReleaseOp(reservation.id, "the request was cancelled while its price was reserved"))

    # --- the committer thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._until_next_retry())
            except queue.Empty:
                item = None
            stopping = item is _STOP
            batch = [] if item is None or stopping else [item]
            batch += self._due_retries(everything=stopping)
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True
                    continue
                batch.append(more)
            if batch:
                self._apply(batch)
            if stopping and self._queue.empty():
                return  # what still failed is left to the sweeper (reservation TTL)

    def _until_next_retry(self) -> float | None:
        if not self._retries:
            return None
        return max(0.0, min(at for at, _, _ in self._retries) - time.monotonic())

    def _due_retries(self, everything: bool = False) -> list:
        now = time.monotonic()
        due = [r for r in self._retries if everything or r[0] <= now]
        self._retries = [r for r in self._retries if r not in due]
        return [(op, None, attempt) for _, attempt, op in due]

    def _apply(self, batch: list[tuple[Op, Future | None, int]]) -> None:
        metrics.LEDGER_BATCH.observe(len(batch))
        ops = [op for op, _, _ in batch]
        try:
            results = self.ledger.apply_batch(ops)
            in_doubt = [False] * len(ops)
        except Exception as error:
            results, in_doubt = self._one_by_one(ops, error)
        for (op, future, attempt), result, doubt in zip(batch, results, in_doubt):
            if isinstance(op, ReleaseOp) and isinstance(result, Exception):
                self._retry(op, attempt, result)
            if isinstance(op, ReserveOp) and doubt:
                self._retry(ReleaseOp(op.reservation_id, "its reserve's outcome was lost with the connection to the ledger"),
                            0, result)
            if future is not None and not future.done():
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _one_by_one(self, ops: list[Op], batch_error: Exception) -> tuple[list, list[bool]]:
        """The batch failed: unreachable ledger for all, or isolate the op that broke it.
        Also says, per op, whether its outcome is in doubt (its transaction lost its connection)."""
        unreachable = unavailable_error(batch_error, self.where)
        if unreachable is not None:
            log.error("the ledger cannot be reached", extra={"ops": len(ops), "error": str(batch_error)[:300]})
            return [unreachable] * len(ops), [True] * len(ops)
        log.warning("ledger batch failed; applying its ops one by one", extra={"ops": len(ops), "error": str(batch_error)[:300]})
        results, in_doubt = [], []
        for op in ops:
            try:
                (result,) = self.ledger.apply_batch([op])
                doubt = False
            except Exception as error:
                log.exception("ledger op failed", extra={"op": type(op).__name__})
                unreachable = unavailable_error(error, self.where)
                result, doubt = unreachable or error, unreachable is not None
            results.append(result)
            in_doubt.append(doubt)
        return results, in_doubt

    def _retry(self, op: ReleaseOp, attempt: int, error: Exception) -> None:
        delay = RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)]
        metrics.LEDGER_RELEASE_RETRIES.inc()
        if attempt == 0:
            log.warning("release failed; retrying until it succeeds", extra={"reservation": op.reservation_id, "error": str(error)[:200]})
        self._retries.append((time.monotonic() + delay, attempt + 1, op))

