"""Fault injection around real components: the real UNet, sampler, decoder and encoder run,
except on the calls a test chooses, which raise."""

from __future__ import annotations

import dataclasses
import threading

import torch


class InjectedFault(RuntimeError):
    pass


class Faults:
    """Which calls fail: the first `once` calls, or every call while `always` is set."""

    def __init__(self, once: int = 0, always: bool = False) -> None:
        self.once = once
        self.always = always
        self.calls = 0
        self.raised = 0
        self._lock = threading.Lock()

    def check(self, what: str) -> None:
        with self._lock:
            self.calls += 1
            fail = self.always or self.once > 0
            if self.once > 0:
                self.once -= 1
            if fail:
                self.raised += 1
        if fail:
            raise InjectedFault(f"injected fault in {what}")


class FaultyUNet(torch.nn.Module):
    """The real UNet behind a switch; forwards `config` and everything else the engine reads."""

    def __init__(self, unet: torch.nn.Module, faults: Faults) -> None:
        super().__init__()
        self.inner = unet
        self.faults = faults

    def forward(self, *args, **kwargs):
        self.faults.check("UNet forward")
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def with_faulty_unet(model, faults: Faults):
    return dataclasses.replace(model, unet=FaultyUNet(model.unet, faults))


def faulty(function, faults: Faults, what: str):
    """`function` that first asks `faults` whether this call fails."""

    def call(*args, **kwargs):
        faults.check(what)
        return function(*args, **kwargs)

    return call
