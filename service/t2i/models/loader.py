"""Load an SDXL checkpoint onto a device, ready for batched evaluation.

Two layouts are supported, both through diffusers' own loaders so that real checkpoints load
exactly as diffusers loads them:
- a diffusers folder (model_index.json, unet/, vae/, text_encoder*/, tokenizer*/), and
- a single-file original-format `.safetensors` (how Illustrious-XL is distributed), which also
  needs `config:` pointing at a diffusers-layout folder with the SDXL configs and tokenizers,
  because nothing may be fetched from a model hub at run time.

What the UNet predicts (epsilon or v_prediction) and whether its sigma table has zero terminal
SNR is settled before any weight is read (kind.py): a checkpoint of a kind that is not served
is refused at once, naming what was found.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import torch

from ..domain import ModelInfo
from ..lora import LayerIndex, LoraCache, LoraRegistry
from ..prompts.embeddings import Embeddings, load_embeddings
from ..sampling import SigmaTable, scaled_linear_betas
from .config import ModelSpec
from .hashing import hash_in_background
from .kind import ModelKind, detect

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")


@dataclass
class LoadedModel:
    spec: ModelSpec
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple[torch.nn.Module, torch.nn.Module]
    tokenizers: tuple
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    sigma_table: SigmaTable
    attention: str
    load_seconds: float
    # What the UNet predicts and how the table was built (kind.py); evaluate() reads its output by it.
    kind: ModelKind = field(default_factory=ModelKind)
    # Textual inversions from spec.embeddings_dir, on the device in the encoders' dtype.
    embeddings: Embeddings = field(default_factory=Embeddings)
    # LoRAs from spec.lora_dir (None without one) and their device-resident weights.
    loras: LoraRegistry | None = None
    lora_cache: LoraCache | None = None
    # SHA-256 of the weights file (A1111's model hash), set by a background thread after loading.
    sha256: str | None = None

    @property
    def id(self) -> int:
        return self.spec.id

    @property
    def prediction(self) -> str:
        return self.kind.prediction_type

    def info(self) -> ModelInfo:
        """What callers see of the model, including what is only known once loaded."""
        return replace(
            self.spec.info(), embeddings=self.embeddings.names, prediction_type=self.kind.prediction_type,
            zero_terminal_snr=self.kind.zero_terminal_snr, checkpoint=self.spec.path.name, sha256=self.sha256 or "",
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def load_model(spec: ModelSpec, device: torch.device, attention: str = "auto") -> LoadedModel:
    # Belt and braces: diffusers and transformers must never reach for the hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()

    started = time.perf_counter()
    kind = detect(spec)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if spec.single_file:
        if spec.config is None:
            raise ValueError(
                f"model {spec.id}: {spec.path} is a single-file checkpoint; set `config:` to a diffusers-layout "
                "folder holding the SDXL component configs and tokenizers (see README, 'Use a real model')"
            )
        pipeline = StableDiffusionXLPipeline.from_single_file(
            str(spec.path), config=str(spec.config), dtype=dtype, local_files_only=True
        )
    else:
        pipeline = StableDiffusionXLPipeline.from_pretrained(spec.path, dtype=dtype, local_files_only=True)

    table = _sigma_table(spec, dict(pipeline.scheduler.config), kind.zero_terminal_snr)
    unet, vae = pipeline.unet, pipeline.vae
    text_encoders = (pipeline.text_encoder, pipeline.text_encoder_2)
    # The SDXL VAE overflows in fp16 (NaN or black images); its config asks for an fp32 decode.
    vae_dtype = torch.float32 if dtype == torch.float16 and vae.config.get("force_upcast", True) else dtype
    for module in (unet, vae, *text_encoders):
        module.to(device).eval().requires_grad_(False)
    if vae_dtype != dtype:
        vae.to(dtype=vae_dtype)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    backend = select_attention(unet, device, attention)
    embeddings = load_embeddings(spec.embeddings_dir, text_encoders, device, text_encoders[0].dtype)
    loras = cache = None
    if spec.lora_dir is not None:
        index = LayerIndex(unet, text_encoders)
        loras = LoraRegistry(spec.lora_dir, index, spec.id, max_per_request=spec.max_loras_per_request)
        cache = LoraCache(index, device, dtype, spec.lora_cache_bytes, model_label=str(spec.id))
    seconds = time.perf_counter() - started
    log.info(
        "model loaded",
        extra={"model_id": spec.id, "device": str(device), "dtype": str(dtype), "attention": backend, "seconds": round(seconds, 2),
               "prediction_type": kind.prediction_type, "zero_terminal_snr": kind.zero_terminal_snr, "kind_from": kind.source},
    )
    model = LoadedModel(
        spec=spec,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=(pipeline.tokenizer, pipeline.tokenizer_2),
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        sigma_table=table,
        attention=backend,
        load_seconds=seconds,
        kind=kind,
        embeddings=embeddings,
        loras=loras,
        lora_cache=cache,
    )
    hash_in_background(model)
    return model


def select_attention(unet: torch.nn.Module, device: torch.device, requested: str = "auto") -> str:
    """xformers when installed on CUDA (or when asked for), else PyTorch SDPA."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {requested!r}")
    if requested in ("auto", "xformers") and device.type == "cuda":
        try:
            import xformers  # noqa: F401
        except ImportError:
            if requested == "xformers":
                raise ValueError("attention 'xformers' was requested but xformers is not installed") from None
        else:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
    elif requested == "xformers":
        raise ValueError("attention 'xformers' needs a CUDA device")
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def _sigma_table(spec: ModelSpec, scheduler_config: dict, zero_terminal_snr: bool) -> SigmaTable:
    # The prediction type was settled by kind.detect; the betas come from the scheduler config.
    schedule = scheduler_config.get("beta_schedule", "scaled_linear")
    if schedule != "scaled_linear":
        raise ValueError(f"model {spec.id}: beta_schedule {schedule!r} is not supported (only scaled_linear)")
    return SigmaTable(
        scaled_linear_betas(
            scheduler_config.get("beta_start", 0.00085),
            scheduler_config.get("beta_end", 0.012),
            scheduler_config.get("num_train_timesteps", 1000),
        ),
        zero_terminal_snr,
    )
