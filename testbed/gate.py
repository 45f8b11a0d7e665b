"""A gate in front of the UNet, so that a test decides when denoising may go on.

A test that needs a request "still running" cannot count on it being slow: a fast machine
finishes 150 steps before the test looks. Behind a closed gate every UNet forward waits, and
counts itself as held, so a test closes the gate, starts its requests, waits until the rows
it expects are held, does what it must while they are in flight, and opens the gate. A
forward that passed is counted too, so "no more evaluations" is a number that stops, not a
hope after a sleep.

The gate is a forward pre-hook on the real UNet (not a wrapper module): LoRA hooks, the
LoRA layer index and everything else that holds the UNet keep working. Two kinds:

- `Gate`: in this process (a threading.Condition), for tests that drive AsyncEngine or Server.
- `FileGate`: a folder shared with a server subprocess started through
  `python -m testbed.gated_serve` (`ServerProcess(..., gate=folder)`): the gate is closed while
  `folder/closed` exists (the server polls it every 10 ms), `folder/granted` counts forwards
  let through while closed, and the server publishes its counts in `folder/state.json`.

Both start open, since the server warms its models up before it reports SERVING; a test that
wants to hold the warm-up closes a FileGate before it starts the server.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

POLL_SECONDS = 0.01


def _rows(args: tuple, kwargs: dict) -> int:
    sample = args[0] if args else kwargs["sample"]
    return int(sample.shape[0])


class Gate:
    """UNet forwards wait while the gate is closed. Counts: `held` forwards waiting now and their
    `held_rows` (two per image: cond and uncond), `passed` forwards that went through."""

    def __init__(self) -> None:
        self._open = True
        self._allowance = 0  # forwards that may pass while closed (let_through)
        self._changed = threading.Condition()
        self._lock = threading.Lock()
        self._counts = {"held": 0, "held_rows": 0, "passed": 0}

    # The test's side.
    def close(self) -> None:
        with self._changed:
            self._open = False

    def open(self) -> None:
        with self._changed:
            self._open = True
            self._changed.notify_all()

    def let_through(self, count: int = 1) -> None:
        """Let `count` more forwards pass while the gate stays closed: step the engine. (Grants
        given while the gate is open are kept for when it is closed.)"""
        with self._changed:
            self._allowance += count
            self._changed.notify_all()

    def pace(self, forwards: int, seconds: float) -> None:
        """With the gate closed: hold each of the next `forwards` forwards for `seconds`, then
        open. For what is throttled in wall-clock time (progress events, previews): the test
        makes that time pass between steps instead of hoping the machine is slow. Run it on a
        thread of its own while the test reads what the request reports."""
        for _ in range(forwards):
            state = self.wait_for(lambda s: s["held"] >= 1, what="a forward to pace")
            time.sleep(seconds)  # the hold itself: the throttle's interval must pass
            self.let_through(1)
            self.wait_for(lambda s, passed=state["passed"]: s["passed"] > passed, what="the paced forward")
        self.open()

    def state(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def wait_for(
        self, condition: Callable[[dict[str, int]], bool], timeout: float = 60, what: str = ""
    ) -> dict[str, int]:
        """Poll the counts until `condition(counts)` holds; the timeout only guards against a hang."""
        deadline = time.monotonic() + timeout
        while not condition(state := self.state()):
            assert time.monotonic() < deadline, f"gate: not within {timeout} s: {what or condition} (counts {state})"
            time.sleep(POLL_SECONDS)
        return state

    def wait_held(self, rows: int = 2, timeout: float = 60) -> dict[str, int]:
        """Until a held forward carries at least `rows` rows (a 1-image request is 2)."""
        return self.wait_for(lambda s: s["held_rows"] >= rows, timeout, f"{rows} rows held")

    def __enter__(self) -> Gate:
        self.close()
        return self

    def __exit__(self, *exc) -> None:
        self.open()  # never leave an engine thread waiting behind a failed test

    # The model's side.
    def install(self, unet: torch.nn.Module):
        """Put the gate in front of `unet`'s forward; returns the hook handle (`.remove()`)."""
        return unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    @contextmanager
    def on(self, unet: torch.nn.Module) -> Iterator[Gate]:
        """In front of `unet` and closed inside the block; open and gone after it (for a model
        that other tests share)."""
        handle = self.install(unet)
        try:
            with self:
                yield self
        finally:
            handle.remove()

    def _hook(self, module, args, kwargs) -> None:
        rows = _rows(args, kwargs)
        self._count(held=1, held_rows=rows)
        try:
            self._wait_open()
        finally:
            self._count(held=-1, held_rows=-rows, passed=1)

    def _wait_open(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._open or self._allowance > 0)
            if not self._open:
                self._allowance -= 1

    def _count(self, **changes: int) -> None:
        with self._lock:
            for name, change in changes.items():
                self._counts[name] += change
            self._publish(dict(self._counts))

    def _publish(self, counts: dict[str, int]) -> None:
        pass


class FileGate(Gate):
    """The gate across processes, through `folder` (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._closed = self.folder / "closed"
        self._state = self.folder / "state.json"
        self._grants = self.folder / "granted"
        self._used = 0  # grants used (the server's side)

    def close(self) -> None:
        self._closed.touch()

    def open(self) -> None:
        self._closed.unlink(missing_ok=True)

    def let_through(self, count: int = 1) -> None:
        total = self._granted() + count  # a running total: the server counts what it used
        partial = self._grants.with_name(f"granted.{os.getpid()}.tmp")
        partial.write_text(str(total))
        os.replace(partial, self._grants)

    def _granted(self) -> int:
        try:
            return int(self._grants.read_text())
        except FileNotFoundError:
            return 0

    def state(self) -> dict[str, int]:
        """The counts the server published last (all zero before its first forward)."""
        try:
            return json.loads(self._state.read_text())
        except FileNotFoundError:
            return {"held": 0, "held_rows": 0, "passed": 0}

    def _wait_open(self) -> None:
        while self._closed.exists():
            if self._granted() > self._used:
                self._used += 1
                return
            time.sleep(POLL_SECONDS)

    def _publish(self, counts: dict[str, int]) -> None:
        partial = self._state.with_name(f"state.{os.getpid()}.tmp")
        partial.write_text(json.dumps(counts))
        os.replace(partial, self._state)  # readers never see half a file
