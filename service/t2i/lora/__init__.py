"""Per-request LoRAs for batched SDXL inference (docs/lora.md for what a file means).

The engine's path through this package, per model:

    index = LayerIndex.from_model(model)                        # once, after loading
    registry = LoraRegistry(lora_dir, index, model.id)          # scans the directory
    cache = LoraCache(index, model.device, model.dtype, budget_bytes, model_label=str(model.id))

    resolved = registry.resolve([LoraRequest(name, strength_model, strength_clip), ...])  # before queueing
    request_loras = cache.acquire_all(resolved)                 # loads off-thread; .done(), .future
    loaded = request_loras.loaded()                             # once done: list[LoadedLora]

    # text encoding: every row (prompt window) gets its owner's LoRAs at strength_clip
    encode_prompts(model, prepared, owners=ids, wrap_forward=text_encoder_wrapper({id: loaded, ...}))
    # denoising: rows 2i / 2i+1 (cond, uncond) get request i's LoRAs at strength_model
    with batched_loras(model.unet, UNET, unet_rows([loaded_0, loaded_1, ...])):
        model.unet(...)

    request_loras.release()                                     # when the request leaves
"""

from .apply import (
    ActiveLoras,
    Adapter,
    LoadedLora,
    LoraBatchError,
    batched_loras,
    hooked_modules,
    stack_bytes,
    repeat_rows,
    text_encoder_wrapper,
    text_rows,
    unet_rows,
)
from .cache import LoraCache, LoraLease, RequestLoras
from .file import LoraFileError, LoraInfo, inspect_file, load_weights
from .keys import COMPONENTS, TE1, TE2, TEXT_ENCODERS, UNET, LayerIndex
from .registry import MAX_STRENGTH, LoraRegistry, LoraRequest, RescanResult, ResolvedLora, name_problem
from .weights import LayerLora, LoraWeights

__all__ = [
    "COMPONENTS",
    "MAX_STRENGTH",
    "TE1",
    "TE2",
    "TEXT_ENCODERS",
    "UNET",
    "ActiveLoras",
    "Adapter",
    "LayerIndex",
    "LayerLora",
    "LoadedLora",
    "LoraBatchError",
    "LoraCache",
    "LoraFileError",
    "LoraInfo",
    "LoraLease",
    "LoraRegistry",
    "LoraRequest",
    "LoraWeights",
    "RequestLoras",
    "RescanResult",
    "ResolvedLora",
    "batched_loras",
    "inspect_file",
    "load_weights",
    "name_problem",
    "hooked_modules",
    "stack_bytes",
    "repeat_rows",
    "text_encoder_wrapper",
    "text_rows",
    "unet_rows",
]
