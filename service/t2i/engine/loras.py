"""A request's LoRAs on the engine side: checked before queueing, loaded before admission.

Checking (`resolve_loras`) runs on the event loop with the request's other checks: unknown
names, too many LoRAs, strengths out of range are InvalidArgument. Loading (`load_loras`) pins
the weights in the model's LoRA cache, reading missing ones from disk on the cache's own
thread; the request waits for them before it enters the engine, and the pins are released when
the request ends (request.py), so the weights a running request uses are never evicted.
"""

from __future__ import annotations

import asyncio

from ..domain import LoraSpec
from ..errors import InvalidArgument, Unavailable
from ..lora import LoadedLora, LoraFileError, LoraRequest, RequestLoras, ResolvedLora
from ..models.loader import LoadedModel


def resolve_loras(model: LoadedModel, loras: tuple[LoraSpec, ...]) -> tuple[ResolvedLora, ...]:
    if not loras:
        return ()
    if model.loras is None:
        raise InvalidArgument("loras", f"{len(loras)} LoRAs", f"model {model.id} has no LoRA folder (lora_dir), so it takes none")
    return tuple(model.loras.resolve([LoraRequest(l.name, l.strength, l.clip_strength) for l in loras]))


async def load_loras(model: LoadedModel, resolved: tuple[ResolvedLora, ...]) -> tuple[tuple[LoadedLora, ...], RequestLoras]:
    leases = model.lora_cache.acquire_all(resolved)
    try:
        await asyncio.shield(asyncio.wrap_future(leases.future))
        return tuple(leases.loaded()), leases
    except LoraFileError as error:
        leases.release()
        raise Unavailable(f"a LoRA of this request could not be loaded ({error}); try again later") from None
    except BaseException:  # cancelled while loading: the loads finish for the cache, the pins go
        leases.release()
        raise
