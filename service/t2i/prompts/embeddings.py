"""A model's textual inversion embeddings (`embedding:NAME` in a prompt), loaded once at start.

An SDXL embedding file is a safetensors file holding `clip_l` (n x CLIP-L width, 768 on real
SDXL) and `clip_g` (n x CLIP-G width, 1280); its n vectors replace n token embeddings in the
prompt, one per encoder. Only `.safetensors` files are loaded: `.pt` and `.bin` embeddings are
pickles, which can run arbitrary code when unpickled, so they are refused with a log line and
a prompt naming one gets an error that says why. Files are checked against the model's
encoders (width, 1 to 75 vectors, finite values in the model's dtype); a file that fails is
refused the same way instead of failing the model's start. The 75 is one chunk's room. Chunking
no longer needs it (an embedding of 8 or more vectors is split at a chunk boundary like text,
t2i.prompts.chunks); it is kept because it bounds what one reference adds to a prompt, and a
larger tensor is more likely a wrong file than a textual inversion.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InvalidArgument
from .chunks import CHUNK_TOKENS
from .parser import EMBEDDING_PREFIX

log = logging.getLogger(__name__)

SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
# The tensor of each SDXL text encoder, in encoder order (CLIP-L first).
ENCODER_KEYS = ("clip_l", "clip_g")
# How many available names an "unknown embedding" error lists before "and N more".
_LISTED = 30


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: tuple[Tensor, ...]  # per encoder: (n, width), on the model's device and dtype

    @property
    def count(self) -> int:
        return self.vectors[0].shape[0]


@dataclass(frozen=True)
class Embeddings:
    loaded: dict[str, Embedding] = field(default_factory=dict)  # by name (file name less .safetensors)
    refused: dict[str, str] = field(default_factory=dict)  # file name -> why it was not loaded

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.loaded))

    def resolve(self, name: str, field: str = "prompt") -> Embedding:
        """The embedding a prompt names as `embedding:NAME` (NAME or NAME.safetensors)."""
        written = EMBEDDING_PREFIX + name
        # Names are looked up in what was loaded, never opened as paths; refusing separators
        # still tells a caller plainly that other folders are out of reach.
        if "/" in name or "\\" in name or name in (".", ".."):
            raise InvalidArgument(field, written, "an embedding name is a file name in the model's embeddings folder, without folders")
        stem = name[: -len(SAFETENSORS)] if name.lower().endswith(SAFETENSORS) else name
        for candidate in (name, stem):
            if candidate in self.loaded:
                return self.loaded[candidate]
        for file_name in (name, stem + SAFETENSORS, *(stem + suffix for suffix in PICKLE_SUFFIXES)):
            if file_name in self.refused:
                raise InvalidArgument(field, written, f"the embedding file {file_name} was not loaded: {self.refused[file_name]}")
        raise InvalidArgument(field, written, f"unknown embedding; {self.available()}")

    def available(self) -> str:
        names = self.names
        if not names:
            return "this model has no embeddings"
        listed = ", ".join(names[:_LISTED])
        more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
        return f"available: {listed}{more}"


def load_embeddings(directory: Path | None, encoders: Sequence[torch.nn.Module], device: torch.device, dtype: torch.dtype) -> Embeddings:
    """Every SDXL embedding file directly inside `directory` (None or missing: none)."""
    if directory is None:
        return Embeddings()
    if not directory.is_dir():
        log.info("no embeddings folder", extra={"path": str(directory)})
        return Embeddings()
    widths = [encoder.get_input_embeddings().embedding_dim for encoder in encoders]
    loaded: dict[str, Embedding] = {}
    refused: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix != SAFETENSORS and suffix not in PICKLE_SUFFIXES:
            log.info("ignored a file in the embeddings folder: not .safetensors", extra={"path": str(path)})
            continue
        if suffix in PICKLE_SUFFIXES:
            reason = "pickle files (.pt, .bin) can run code when loaded; convert it to .safetensors"
        else:
            name = path.name[: -len(SAFETENSORS)]
            try:
                vectors = _read(path, widths, device, dtype)
            except ValueError as error:
                reason = str(error)
            else:
                if name not in loaded:
                    loaded[name] = Embedding(name, vectors)
                    continue
                reason = f"another file already provides the embedding {name!r}"
        refused[path.name] = reason
        log.warning("embedding refused", extra={"path": str(path), "reason": reason})
    log.info("embeddings loaded", extra={"path": str(directory), "count": len(loaded), "refused": len(refused)})
    return Embeddings(loaded, refused)


def _read(path: Path, widths: Sequence[int], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    from safetensors import SafetensorError, safe_open

    keys = ENCODER_KEYS[: len(widths)]
    vectors = []
    try:
        # Shapes are read from the header first, so a checkpoint dropped here by mistake is
        # refused without reading gigabytes.
        with safe_open(path, framework="pt", device="cpu") as file:
            present = set(file.keys())
            missing = [key for key in keys if key not in present]
            if missing:
                raise ValueError(f"an SDXL embedding needs the tensors {', '.join(keys)}; {', '.join(missing)} missing")
            for key, width in zip(keys, widths):
                shape = tuple(file.get_slice(key).get_shape())
                if len(shape) != 2 or shape[1] != width or not 1 <= shape[0] <= CHUNK_TOKENS:
                    raise ValueError(f"{key} has shape {shape}; this model needs (1 to {CHUNK_TOKENS}, {width})")
                vectors.append(file.get_tensor(key))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"not a readable safetensors file ({error})") from None
    if len({v.shape[0] for v in vectors}) != 1:
        raise ValueError(f"{' and '.join(keys)} have different numbers of vectors")
    converted = []
    for key, tensor in zip(keys, vectors):
        if not tensor.is_floating_point():
            raise ValueError(f"{key} holds {tensor.dtype}, not floating-point numbers")
        # Checked after the cast too: a value that is fine in fp32 can overflow fp16.
        cast = tensor.to(device=device, dtype=dtype)
        if not (torch.isfinite(tensor).all() and torch.isfinite(cast).all()):
            raise ValueError(f"{key} holds NaN or infinite values (in {dtype})")
        converted.append(cast)
    return tuple(converted)
