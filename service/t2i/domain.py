"""Domain dataclasses shared by the engine, the server and the client (no protobuf here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerateRequest:
    model_id: int
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    cfg_scale: float
    seed: int
    sampler: str
    scheduler: str


@dataclass(frozen=True)
class GenerateResult:
    images: list[bytes]
    seeds: list[int]
    # Filled by the billing layer; the engine leaves them at 0.
    stardust_usage: int = 0
    stardust_balance: int = 0


@dataclass(frozen=True)
class ModelInfo:
    id: int
    name: str
    min_size: int
    max_size: int
    max_steps: int
    demo: bool = False


@dataclass
class StageTimes:
    """Seconds spent per stage of one request, for metrics and logs."""

    queue_wait: float = 0.0
    text_encode: float = 0.0
    denoise: float = 0.0
    vae_decode: float = 0.0
    png_encode: float = 0.0
    evaluations: int = 0
    batch_sizes: list[int] = field(default_factory=list)
