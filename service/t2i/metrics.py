"""Prometheus metrics, served on their own port (see t2i.server.app).

Defined once per process in the default registry; several servers in one process (tests)
share them, so tests compare values before and after rather than absolute numbers.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("t2i_requests_total", "RPCs handled, by method and gRPC status code", ["method", "code"])
REQUEST_LATENCY = Histogram("t2i_request_seconds", "RPC latency, by method", ["method"], buckets=STAGE_BUCKETS)
STAGE_LATENCY = Histogram(
    "t2i_stage_seconds",
    "Time a request spends per stage (queue_wait, vae_encode (image to image), text_encode, denoise, vae_decode, png_encode)",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
BATCH_SIZE = Histogram(
    "t2i_batch_size", "Requests per UNet evaluation (each is two rows: cond and uncond)", ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
EVALUATIONS = Counter("t2i_unet_evaluations_total", "UNet forwards run", ["model"])
QUEUE_DEPTH = Gauge("t2i_queue_depth", "Requests waiting to be admitted")
RUNNING = Gauge("t2i_running_requests", "Requests being denoised")
INFLIGHT = Gauge("t2i_inflight_requests", "GenerateImage requests accepted and not yet answered")
MODEL_LOAD_SECONDS = Gauge("t2i_model_load_seconds", "Seconds it took to load each model", ["model"])
MODEL_INFO = Gauge(
    "t2i_model_info", "Loaded models (value 1), with their device, dtype and attention backend",
    ["model", "name", "device", "dtype", "attention"],
)

# Billing (billing/interceptor.py)
STARDUST_RESERVED = Counter("t2i_stardust_reserved_total", "Stardust set aside before generations", ["model"])
STARDUST_CHARGED = Counter("t2i_stardust_charged_total", "Stardust charged for delivered images", ["model"])
STARDUST_RELEASED = Counter("t2i_stardust_released_total", "Stardust returned after failed or cancelled requests", ["model"])
AUTH_FAILURES = Counter("t2i_auth_failures_total", "Refused API keys, by reason (missing, malformed, unknown, revoked)", ["reason"])
RATE_LIMITED = Counter("t2i_rate_limited_total", "Requests refused by a rate limit", ["limit"])
RATE_LIMITER_ERRORS = Counter("t2i_rate_limiter_errors_total", "Rate limiter (Redis) calls that failed")
IDEMPOTENT_REPLAYS = Counter("t2i_idempotent_replays_total", "Retries answered from a stored result")
STREAM_EVENTS_DROPPED = Counter(
    "t2i_stream_events_dropped_total",
    "Stream events (previews, progress) not sent because their request had already ended, by event", ["event"],
)
LEDGER_LATENCY = Histogram(
    "t2i_ledger_seconds", "Ledger operation latency", ["operation"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
LEDGER_BATCH = Histogram(
    "t2i_ledger_batch_ops", "Reserves and commits applied per group-commit transaction",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)

# LoRAs (t2i/lora/cache.py, t2i/lora/registry.py)
LORA_CACHE_HITS = Counter(
    "t2i_lora_cache_hits_total", "LoRA acquisitions served by weights already on the device (or already loading)", ["model"]
)
LORA_CACHE_MISSES = Counter("t2i_lora_cache_misses_total", "LoRA acquisitions that started a load from disk", ["model"])
LORA_CACHE_EVICTIONS = Counter("t2i_lora_cache_evictions_total", "LoRAs dropped from the device to stay in budget", ["model"])
LORA_CACHE_BYTES = Gauge("t2i_lora_cache_bytes", "Device bytes held by LoRA weights (resident or loading)", ["model"])
LORA_LOAD_SECONDS = Histogram(
    "t2i_lora_load_seconds", "Time to read one LoRA file and place it on the device", ["model"], buckets=STAGE_BUCKETS
)
LORAS_REGISTERED = Gauge("t2i_loras_registered", "LoRA files registered for each model", ["model"])
LORAS_REFUSED = Gauge("t2i_loras_refused", "LoRA files in a model's directory that were refused", ["model"])
LEDGER_RELEASE_RETRIES = Counter(
    "t2i_ledger_release_retries_total", "Releases that failed (the ledger was unreachable) and were queued for another try"
)
