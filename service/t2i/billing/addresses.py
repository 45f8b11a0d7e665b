"""Who is calling: the client address used for per-address limits, and which peers may name it.

Only a trusted proxy (the edge) may name the client in x-forwarded-for; anyone else is the
client themselves, so that nobody can dodge a per-address limit, or get a victim blocked, by
claiming an address.
"""

from __future__ import annotations

import ipaddress

import grpc

from .. import wire
from ..server.interceptors import metadata_value


def parse_networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated CIDRs (or addresses); ValueError names the bad entry."""
    networks = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: {part!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """The address of the connection's other end (gRPC peer strings: ipv4:a.b.c.d:port, ipv6:[..]:port)."""
    peer = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


def client_address(context: grpc.aio.ServicerContext, trusted: tuple = ()) -> str:
    """The caller's address: the last x-forwarded-for hop when the peer is a trusted proxy
    (the edge), else the peer itself.

    The edge appends the address of the peer it saw to whatever x-forwarded-for the client
    sent, so only the last hop is trustworthy, and only when the edge is the one who sent it:
    a caller reaching the service directly could otherwise claim any address (dodging the
    failed-authentication limit, or getting a victim's address blocked).
    """
    return client_of(peer_address(context), metadata_value(context, wire.FORWARDED_FOR_HEADER), trusted)


def client_of(peer: str, forwarded: str | None, trusted: tuple = ()) -> str:
    """The rule of client_address for any protocol: the last x-forwarded-for hop when `peer` is
    a trusted proxy, else `peer` (the adapters' HTTP port applies it too, t2i.compat.app)."""
    if forwarded and _trusted(peer, trusted):
        return forwarded.rsplit(",", 1)[-1].strip()
    return peer


def trusts(networks: tuple, address: str) -> bool:
    """Whether `address` is among the trusted proxies."""
    return _trusted(address, networks)


def _trusted(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks if network.version == ip.version)
