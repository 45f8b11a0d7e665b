"""Settings of a serving process (each one also settable from the environment by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .engine.engine import EngineConfig


@dataclass(frozen=True)
class ServeSettings:
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    metrics_port: int = 9464
    metrics_host: str = "0.0.0.0"
    models_file: Path | None = None  # None: serve the demo model as modelId 1
    data_dir: Path = Path("data")
    device: str = "auto"
    attention: str = "auto"
    engine: EngineConfig = field(default_factory=EngineConfig)
    grace_period: float = 60.0  # SIGTERM: seconds to finish in-flight work
    max_receive_message_bytes: int = 8 * 1024 * 1024
    max_send_message_bytes: int = 256 * 1024 * 1024
    print_usage: bool = False  # print how to call the service once it is ready
