"""Real PostgreSQL and Redis for tests: a throwaway database per use, and a reachability check
that fails (rather than skips) under CI=true."""

from __future__ import annotations

import os
import uuid

import pytest

POSTGRES_ADMIN_URL = os.environ.get("T2I_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("T2I_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable ({error}); .ci/run starts it"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def postgres_database() -> tuple[str, callable]:
    """Create an empty database; returns its URL and a function that drops it."""
    import psycopg

    name = f"t2i_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        unavailable("PostgreSQL", error)
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]

    def drop() -> None:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{base}/{name}", drop


def require_redis() -> str:
    import redis

    try:
        redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.exceptions.RedisError as error:
        unavailable("Redis", error)
    return REDIS_URL


def address_of(url: str) -> tuple[str, int]:
    """(host, port) of a PostgreSQL or Redis URL."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    default = 6379 if parsed.drivername.startswith("redis") else 5432
    return parsed.host or "127.0.0.1", parsed.port or default


def via(url: str, address: str) -> str:
    """The same URL pointing at `address` (host:port), e.g. a FaultyLink in front of the server."""
    from sqlalchemy.engine import make_url

    host, port = address.rsplit(":", 1)
    return make_url(url).set(host=host, port=int(port)).render_as_string(hide_password=False)


class PrivateRedis:
    """A redis-server of the test's own on a free port (for tests that cut, kill or flood it)."""

    def __init__(self) -> None:
        import shutil
        import socket
        import subprocess
        import tempfile
        import time

        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server", FileNotFoundError("redis-server is not on PATH"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._dir = tempfile.mkdtemp(prefix="t2i-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self._dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.close()
                    raise RuntimeError(f"private redis-server on port {self.port} did not start")
                time.sleep(0.05)
        self.client = client

    def close(self) -> None:
        import shutil

        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "PrivateRedis":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
