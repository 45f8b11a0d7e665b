"""Webhooks of jobs: where they may go, how they are signed, when they are retried.

A job submitted with a `webhook` ({url, events}) gets a POST at that URL when it reaches one of
the events asked for: `job.succeeded`, `job.failed`, `job.cancelled` (default: all three).
Payloads are signed per the Standard Webhooks spec with the key's signing secret (`t2i keys
webhook-secret`), by the `standardwebhooks` library: headers `webhook-id` (the same for every
retry of one event), `webhook-timestamp` and `webhook-signature`. Delivery is at least once:
a delivery that does not get a 2xx answer within DELIVERY_TIMEOUT_SECONDS is retried after
BACKOFF_SECONDS (the first retry within a minute), for up to GIVE_UP_AFTER; redirects are not
followed (a 3xx is a failed attempt). Every attempt is kept on the job.

Where they may go (SSRF): http and https only; every address the host resolves to must be a
public one: not loopback, private, link-local (which includes the cloud metadata address
169.254.169.254), shared, reserved, multicast or unspecified, unless the operator's allow-list
(`--webhook-allow`: host names and CIDRs) allows it: a URL written with an address by a CIDR
containing it, a URL written with a name by that name (never by what it resolves to). The check is
made at submission (a refused URL is a 400 naming `webhook.url`) and again before every attempt,
since what a name resolves to can change.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import InvalidArgument

EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
STATUS_EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
MAX_URL_LENGTH = 2048
DELIVERY_TIMEOUT_SECONDS = 5.0
# Seconds before retry n (1-based) of one event; the last gap repeats until GIVE_UP_AFTER.
BACKOFF_SECONDS = (10, 60, 300, 1800, 3600, 7200)
GIVE_UP_AFTER = dt.timedelta(hours=24)


def backoff(attempt: int, first_retry: float | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 = the first delivery);
    `first_retry` scales the whole ladder (tests make it short)."""
    gap = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS)) - 1]
    if first_retry is None:
        return float(gap)
    return gap * first_retry / BACKOFF_SECONDS[0]


@dataclass(frozen=True)
class AllowList:
    """The operator's exceptions to the public-address rule: host names and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        hosts, networks = set(), []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """A URL written with an address is allowed by a network containing it; one written
        with a name only by that name: a name that merely resolves into an allowed network
        (DNS the caller may control) is not."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return host.lower().rstrip(".") in self.hosts
        return any(address in network for network in self.networks)


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_link_local)


def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))


def check_url(url: str, allow: AllowList, field: str = "webhook.url") -> None:
    """InvalidArgument unless `url` may receive webhooks (module docstring)."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidArgument(field, url, f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise InvalidArgument(field, url, f"is not a URL ({error})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(field, url, "must be an http or https URL with a host")
    if parts.username or parts.password:
        raise InvalidArgument(field, url, "must not carry credentials")
    host = parts.hostname
    try:
        addresses = resolve(host, port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as error:
        raise InvalidArgument(field, url, f"its host {host!r} does not resolve ({error})") from None
    for address in addresses:
        if not _public(address) and not allow.allows(host, address):
            raise InvalidArgument(
                field, url, f"its host {host!r} resolves to {address}, which is not a public address (loopback, private, "
                "link-local, metadata and reserved addresses are refused unless the operator allows them with "
                "--webhook-allow)",
            )


def check_events(events: Iterable[str], field: str = "webhook.events") -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(events)) or EVENTS
    for event in chosen:
        if event not in EVENTS:
            raise InvalidArgument(field, event, "must be one of " + ", ".join(EVENTS))
    return chosen


def signed_headers(secret: str, message_id: str, timestamp: dt.datetime, payload: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one delivery attempt."""
    from standardwebhooks import Webhook

    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, timestamp, payload),
        "content-type": "application/json",
    }


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: whsec_ and 32 random bytes, base64."""
    import base64
    import secrets

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def payload(job, event: str, at: dt.datetime) -> bytes:
    """The body of an event: {"type", "timestamp", "data": the job as GET /jobs/{id} shows it}."""
    import json

    from google.protobuf.json_format import MessageToDict

    from ..server import convert

    data = MessageToDict(convert.job_to_pb(job))
    return json.dumps({"type": event, "timestamp": at.isoformat().replace("+00:00", "Z"), "data": data},
                      separators=(",", ":")).encode()


def post(url: str, headers: dict[str, str], body: bytes, timeout: float = DELIVERY_TIMEOUT_SECONDS) -> int:
    """One delivery attempt: the answer's status (redirects are answers, never followed).
    OSError (refused, timed out, TLS) when no answer came."""
    import http.client

    parts = urlsplit(url)
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.hostname, parts.port, timeout=timeout)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", target, body=body, headers={**headers, "user-agent": "illustrious-t2i-webhooks"})
        response = connection.getresponse()
        response.read(64 * 1024)  # a little of the body, so the connection closes cleanly
        return response.status
    finally:
        connection.close()
