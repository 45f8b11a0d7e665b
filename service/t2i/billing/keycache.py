"""Known API keys, remembered for a few seconds to save a database read per request.

Bounded: the least recently used entry goes first, one by one (never the whole cache at once,
which made every caller hit the database together). Revocation evicts a key's entries at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from .ledger import KeyRecord


class KeyCache:
    def __init__(self, seconds: float = 5.0, capacity: int = 10_000) -> None:
        self.seconds = seconds
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[KeyRecord, float]] = OrderedDict()

    def get(self, key: str) -> KeyRecord | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        record, expires = entry
        if expires <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return record

    def put(self, key: str, record: KeyRecord) -> None:
        self._entries[key] = (record, time.monotonic() + self.seconds)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def evict(self, key_ids: set[str]) -> None:
        for key in [k for k, (record, _) in self._entries.items() if record.id in key_ids]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
