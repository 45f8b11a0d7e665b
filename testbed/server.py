"""Run the real service in a subprocess for end-to-end tests (real gRPC over a real socket)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testbed.gate import FileGate


ROOT = Path(__file__).resolve().parents[1]  # where `testbed` is importable from


class ServerProcess:
    """`python -m t2i serve` on free ports; its JSON log lines are collected in `logs`.

    With `gate` (a folder), the server runs through `python -m testbed.gated_serve` and every
    UNet forward waits while `self.gate` (a testbed.gate.FileGate, open at start) is closed."""

    def __init__(
        self, data_dir: Path, *extra_args: str, env: dict[str, str] | None = None, command: str = "serve",
        gate: Path | None = None, compat: bool = False,
    ) -> None:
        """`compat`: also the adapters' HTTP port (t2i.compat) on a free port (`compat_port`)."""
        self.data_dir = Path(data_dir)
        self.gate = FileGate(gate) if gate is not None else None
        launcher = ["t2i"] if gate is None else ["testbed.gated_serve", str(gate)]
        args = [
            sys.executable, "-m", *launcher, "--log-format", "json", command,
            "--grpc-port", "0", "--metrics-port", "0", "--data-dir", str(data_dir), "--device", "cpu",
            *(["--compat-port", "0" if compat else "-1"] if command == "serve" else []), *extra_args,
        ]
        environment = {**os.environ, **(env or {})}
        if gate is not None:
            environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
        )
        self.logs: list[dict] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self.compat_port: int | None = None  # the adapters' HTTP port (t2i.compat)

    def _read(self) -> None:
        for line in self.process.stderr:
            with self._lock:
                self.raw.append(line)
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    self.logs.append(entry)
                    if entry.get("msg") == "listening":
                        self.grpc_port = entry["grpc_port"]
                        self.metrics_port = entry.get("metrics_port")
                        self.compat_port = entry.get("compat_port")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_listening(self, timeout: float = 120) -> ServerProcess:
        self._wait(lambda: self.grpc_port is not None, timeout, "listen")
        return self

    def wait_serving(self, timeout: float = 180) -> ServerProcess:
        self.wait_listening(timeout)
        self._wait(lambda: self.health() == health_pb2.HealthCheckResponse.SERVING, timeout, "report SERVING")
        return self

    def _wait(self, condition, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} before it could {what}:\n{self.output()}")
            time.sleep(0.05)
        raise TimeoutError(f"server did not {what} within {timeout} s:\n{self.output()}")

    def health(self, service: str = "") -> int | None:
        """The health status, or None when the port does not answer."""
        with grpc.insecure_channel(self.target) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            except grpc.RpcError:
                return None
        return response.status

    def logged(self, msg: str) -> list[dict]:
        with self._lock:
            return [entry for entry in self.logs if entry.get("msg") == msg]

    def wait_logged(self, msg: str, count: int = 1, timeout: float = 60) -> list[dict]:
        """Until `count` log lines with `msg` have arrived (each reaches this process a little
        after the event); the timeout only guards against a hang."""
        end = time.monotonic() + timeout
        while len(entries := self.logged(msg)) < count:
            if time.monotonic() > end:
                raise TimeoutError(
                    f"{msg!r} was logged {len(entries)} times, not {count}, within {timeout} s:\n{self.output()}"
                )
            time.sleep(0.02)
        return entries

    def output(self) -> str:
        with self._lock:
            return "".join(self.raw[-80:])

    def terminate(self, timeout: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.gate is not None:
            self.gate.open()  # a held forward must not keep a dying server busy
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
