"""The serving engine: step-level continuous batching of SDXL requests (see engine/scheduler.py)."""
