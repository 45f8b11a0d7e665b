"""`t2i up` (the service plus real Envoy) in a subprocess, and plain HTTP calls to it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.gate import FileGate
from testbed.server import ROOT


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class UpProcess:
    """`t2i up` on free ports. With `gate` (a folder), its service's UNet forwards wait while
    `self.gate` (testbed.gate.FileGate, open at start) is closed (see testbed/gated_serve.py)."""

    def __init__(
        self, models_from: Path, data_dir: Path, *args: str, env: dict[str, str] | None = None, gate: Path | None = None
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not (data_dir / "models").exists():
            shutil.copytree(Path(models_from) / "models", data_dir / "models")
        self.data_dir = data_dir
        self.http_port, self.grpc_port, self.metrics_port, self.admin_port, self.compat_port = free_ports(5)
        self.gate = FileGate(gate) if gate is not None else None
        launcher = ["t2i"] if gate is None else ["testbed.gated_serve", str(gate)]
        command = [
            sys.executable, "-m", *launcher, "--log-format", "json", "up", "--http-port", str(self.http_port),
            "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
            "--admin-port", str(self.admin_port), "--compat-port", str(self.compat_port), "--data-dir", str(data_dir), *args,
        ]
        environment = {**os.environ, "T2I_DEVICE": "cpu", **(env or {})}
        if gate is not None:
            environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
        # Its own session, so that a Ctrl-C can be simulated for the whole process group.
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        for stream, sink in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _read(self, stream, sink) -> None:
        for line in stream:
            with self._lock:
                sink.append(line)

    def wait_ready(self, timeout: float = 240) -> UpProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if any(line.strip() == "Ready." for line in self.stdout):
                    return self
            if self.process.poll() is not None:
                raise RuntimeError(f"t2i up exited with {self.process.returncode}:\n{self.output()}")
            time.sleep(0.1)
        raise TimeoutError(f"t2i up was not ready within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        with self._lock:
            return "".join(self.stdout[-40:]) + "".join(self.stderr[-60:])

    def access_log(self) -> list[dict]:
        """Envoy's access log entries (JSON lines on stdout)."""
        return [e for e in self._json_lines(self.stdout) if "responseFlags" in e]

    def service_log(self) -> list[dict]:
        """The service's log entries (JSON lines on stderr)."""
        return self._json_lines(self.stderr)

    def _json_lines(self, sink: list[str]) -> list[dict]:
        with self._lock:
            lines = list(sink)
        entries = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    @property
    def demo_key(self) -> str:
        return (self.data_dir / "demo-api-key").read_text().strip()

    def request(self, method: str, path: str, body: bytes | str | dict | None = None, headers: dict | None = None,
                timeout: float = 120) -> Reply:
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def interrupt(self, timeout: float = 120) -> int:
        """Ctrl-C in a terminal: SIGINT to the whole process group."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout)

    def wait_logged(self, msg: str, count: int = 1, timeout: float = 60) -> list[dict]:
        """Until the service has logged `msg` `count` times; the timeout only guards against a hang."""
        deadline = time.monotonic() + timeout
        while len(entries := [e for e in self.service_log() if e.get("msg") == msg]) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{msg!r} was logged {len(entries)} times, not {count}, within {timeout} s:\n{self.output()}"
                )
            time.sleep(0.02)
        return entries

    def kill(self) -> None:
        if self.gate is not None:
            self.gate.open()
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(30)
