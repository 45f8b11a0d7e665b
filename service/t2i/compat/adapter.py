"""What the edge and the docs need to know about an adapter, stated once.

An adapter serves another API's paths (under its own prefix) on the adapters' HTTP port of
`t2i serve` (t2i.compat.app). What Envoy needs is rendered into edge/envoy.yaml by
scripts/render.py from these records: the Lua filter's prefix -> API table (such requests keep
their own response shapes), one route per body cap, and the local replies (413, no healthy
replica, timeouts, ...) in the adapter's own error shape; tests/edge checks the routes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    method: str  # GET or POST
    path: str  # exact path (under the adapter's prefix)
    body_limit: int  # bytes the edge (and the adapter) accept in a request body; 0: no body
    summary: str  # one line, for the OpenAPI description and the README


@dataclass(frozen=True)
class Adapter:
    name: str  # `api` in the edge's access log
    prefix: str  # every path under it goes to the adapters' port, e.g. "/v1/"
    routes: tuple[Route, ...]
    # The body of a reply the edge makes itself (a 413, no healthy replica, a timeout) in this
    # API's error shape, for a message (text or an Envoy format string) -> Envoy's json_format.
    edge_error: Callable[[str], dict]

    def body_limit(self, path: str) -> int:
        """The body cap of the POST route at `path`."""
        (limit,) = [route.body_limit for route in self.routes if route.method == "POST" and route.path == path]
        return limit

    def large_body_paths(self, default: int) -> tuple[str, ...]:
        """The routes whose body cap is above `default` (the edge's own cap)."""
        return tuple(route.path for route in self.routes if route.body_limit > default)
