"""A checkpoint's SHA-256, the identity A1111 and Civitai show (its "Model hash" is the first 10
hex digits). Hashing a 6.5 GB checkpoint takes a while, so it runs on a thread of its own after
the model is loaded; until it is done images carry no model hash."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024


def weights_file(path: Path) -> Path | None:
    """The file to hash: the single-file checkpoint, or a diffusers folder's UNet weights."""
    if path.is_file():
        return path
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        candidate = path / "unet" / name
        if candidate.is_file():
            return candidate
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def hash_in_background(model) -> threading.Thread | None:
    """Set `model.sha256` once its weights file is hashed (None stays when there is none)."""
    target = weights_file(model.spec.path)
    if target is None:
        return None

    def work() -> None:
        started = time.perf_counter()
        try:
            model.sha256 = sha256_of(target)
        except OSError as error:
            log.warning("could not hash the model file", extra={"model_id": model.id, "error": str(error)})
            return
        log.info("model hashed", extra={"model_id": model.id, "sha256": model.sha256[:10], "seconds": round(time.perf_counter() - started, 2)})

    thread = threading.Thread(target=work, name=f"t2i-hash-{model.id}", daemon=True)
    thread.start()
    return thread
