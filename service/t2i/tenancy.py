"""Who a generation is for, as the engine's fair sharing sees it (engine/batching.py).

The billing interceptor sets it from the API key and its tier's weight; the servicer hands it
to the engine. Without billing every caller is the same tenant (first come, first served).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Tenant:
    id: str
    weight: float = 1.0  # shares: a tenant of weight 2 gets twice the service of one of weight 1


ANONYMOUS = Tenant("anonymous")
current_tenant: ContextVar[Tenant] = ContextVar("tenant", default=ANONYMOUS)
