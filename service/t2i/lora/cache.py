"""LoRA weights resident on the model's device, under a byte budget, least recently used out.

Loading (read the file, build the factors, copy them to the device) runs on a worker thread:
`acquire` returns at once with a lease whose future completes when the weights are there, so
the denoise loop admits a request only once its LoRAs are ready and never waits on a disk.

A lease pins its weights: pinned weights are never evicted, so a running request cannot lose
them. To make room for a new load, the least recently acquired unpinned weights are dropped
until the new ones fit the budget; when everything resident is pinned the load goes ahead over
budget (a paid request is served rather than refused) and a warning says so. Weights are keyed
by content (the file's tensor-data hash), so a file replaced under the same name is loaded
afresh and the old copy ages out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .. import metrics
from .apply import LoadedLora
from .file import LoraFileError, LoraInfo, load_weights
from .keys import LayerIndex
from .registry import ResolvedLora
from .weights import LoraWeights

log = logging.getLogger(__name__)

Loader = Callable[[LoraInfo, LayerIndex, torch.device, torch.dtype], LoraWeights]


@dataclass(eq=False)
class _Entry:
    info: LoraInfo
    nbytes: int
    future: Future = field(default_factory=Future)
    pins: int = 0


class LoraLease:
    """One acquisition of one LoRA's weights; release it once the request no longer needs them."""

    def __init__(self, cache: LoraCache, entry: _Entry) -> None:
        self._cache = cache
        self._entry = entry
        self._released = False
        self.info = entry.info

    @property
    def future(self) -> Future:
        return self._entry.future

    def release(self) -> None:
        """Unpin (idempotent)."""
        if not self._released:
            self._released = True
            self._cache._unpin(self._entry)


class RequestLoras:
    """A request's leases: ready when every LoRA is loaded; `loaded()` gives what apply.py takes."""

    def __init__(self, resolved: Sequence[ResolvedLora], leases: list[LoraLease]) -> None:
        self.resolved = list(resolved)
        self.leases = leases
        self.future: Future = Future()  # done when all are (await with asyncio.wrap_future)
        self._pending = len(leases)
        self._lock = threading.Lock()
        if not leases:
            self.future.set_result(None)
        for lease in leases:
            lease.future.add_done_callback(self._one_done)

    def _one_done(self, future: Future) -> None:
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last and not self.future.done():
            errors = [
                lease.future.exception() for lease in self.leases if lease.future.exception() is not None
            ]
            if errors:
                self.future.set_exception(errors[0])
            else:
                self.future.set_result(None)

    def done(self) -> bool:
        return self.future.done()

    def loaded(self) -> list[LoadedLora]:
        """The LoRAs with their weights; raises the load error of any that failed."""
        self.future.result()
        return [
            LoadedLora(lease.future.result(), r.strength_model, r.strength_clip)
            for r, lease in zip(self.resolved, self.leases)
        ]

    def release(self) -> None:
        for lease in self.leases:
            lease.release()


class LoraCache:
    def __init__(
        self,
        index: LayerIndex,
        device: torch.device,
        dtype: torch.dtype,
        budget_bytes: int,
        *,
        model_label: str = "",
        workers: int = 1,
        loader: Loader = load_weights,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"LoRA cache budget must be >= 0 bytes, got {budget_bytes}")
        self.index = index
        self.device = torch.device(device)
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self._label = str(model_label)
        self._loader = loader
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently acquired first
        self._bytes = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"lora-load-{self._label or 'model'}"
        )

    # ---------------------------------------------------------------- acquiring

    def acquire(self, info: LoraInfo) -> LoraLease:
        """Pin `info`'s weights, loading them in the background when they are not resident."""
        with self._lock:
            entry = self._entries.get(info.sha256)
            if entry is not None:
                entry.pins += 1
                self._entries.move_to_end(info.sha256)
                metrics.LORA_CACHE_HITS.labels(self._label).inc()
                return LoraLease(self, entry)
            metrics.LORA_CACHE_MISSES.labels(self._label).inc()
            nbytes = info.resident_bytes(self.dtype)
            self._make_room(nbytes, info.name)
            entry = _Entry(info, nbytes, pins=1)
            self._entries[info.sha256] = entry
            self._bytes += nbytes
            self._publish_bytes()
        self._executor.submit(self._load, entry)
        return LoraLease(self, entry)

    def acquire_all(self, resolved: Sequence[ResolvedLora]) -> RequestLoras:
        """Leases for every LoRA of one request."""
        return RequestLoras(resolved, [self.acquire(r.info) for r in resolved])

    def _load(self, entry: _Entry) -> None:
        started = time.perf_counter()
        try:
            weights = self._loader(entry.info, self.index, self.device, self.dtype)
        except BaseException as error:  # noqa: BLE001 - whatever it is, the waiting request must hear of it
            with self._lock:
                if self._entries.get(entry.info.sha256) is entry:
                    del self._entries[entry.info.sha256]
                    self._bytes -= entry.nbytes
                    self._publish_bytes()
            log.error("loading a LoRA failed", extra={"lora": entry.info.name, "error": str(error)})
            if isinstance(error, OSError):
                error = LoraFileError(
                    f"LoRA {entry.info.name!r}: cannot read {entry.info.path.name}: {error}"
                )
            entry.future.set_exception(error)
            return
        seconds = time.perf_counter() - started
        metrics.LORA_LOAD_SECONDS.labels(self._label).observe(seconds)
        with self._lock:
            if self._entries.get(entry.info.sha256) is entry:
                self._bytes += weights.nbytes - entry.nbytes
                entry.nbytes = weights.nbytes
                self._publish_bytes()
        log.info(
            "LoRA loaded",
            extra={
                "lora": entry.info.name,
                "bytes": weights.nbytes,
                "seconds": round(seconds, 3),
                "device": str(self.device),
            },
        )
        entry.future.set_result(weights)

    # ---------------------------------------------------------------- budget

    def _make_room(self, nbytes: int, for_name: str, warn: bool = True) -> None:
        """Evict unpinned, loaded entries, least recent first, until `nbytes` more fit."""
        for key in list(self._entries):
            if self._bytes + nbytes <= self.budget_bytes:
                return
            entry = self._entries[key]
            if entry.pins or not entry.future.done():
                continue
            del self._entries[key]
            self._bytes -= entry.nbytes
            metrics.LORA_CACHE_EVICTIONS.labels(self._label).inc()
            log.info("evicted a LoRA from the device", extra={"lora": entry.info.name, "bytes": entry.nbytes})
        self._publish_bytes()
        if warn and self._bytes + nbytes > self.budget_bytes:
            log.warning(
                "LoRA cache over budget: every resident LoRA is in use",
                extra={"lora": for_name, "bytes": self._bytes + nbytes, "budget_bytes": self.budget_bytes},
            )

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1
            if self._bytes > self.budget_bytes:
                # Over budget because everything was pinned when a load went ahead: back under it
                # as soon as pins allow, rather than at the next load.
                self._make_room(0, entry.info.name, warn=False)

    def _publish_bytes(self) -> None:
        metrics.LORA_CACHE_BYTES.labels(self._label).set(self._bytes)

    # ---------------------------------------------------------------- inspection

    @property
    def bytes_resident(self) -> int:
        return self._bytes

    def resident(self) -> list[str]:
        """Names of the LoRAs held, least recently acquired first."""
        with self._lock:
            return [entry.info.name for entry in self._entries.values()]

    def close(self) -> None:
        """Stop loading; leases still waiting get an error rather than hanging."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for entry in self._entries.values():
                if not entry.future.done():
                    entry.future.set_exception(
                        RuntimeError(f"the LoRA cache closed before {entry.info.name!r} was loaded")
                    )
