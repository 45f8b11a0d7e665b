"""Domain dataclasses shared by the engine, the server and the client (no protobuf here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA on a request: ComfyUI LoraLoader's strength_model and strength_clip."""

    name: str
    strength: float = 1.0
    strength_clip: float | None = None  # None: the same as strength

    @property
    def clip_strength(self) -> float:
        return self.strength if self.strength_clip is None else self.strength_clip


RESIZE_MODES = ("just-resize", "crop-and-resize", "resize-and-fill")  # A1111's three, in its order
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")  # ComfyUI LatentUpscaleBy's
# How prompts are read: ComfyUI's CLIPTextEncode (the default, docs/prompts.md) or A1111's
# rules (t2i.prompts.a1111), the latter for the A1111-compatible API and callers who write for it.
PROMPT_SYNTAXES = ("comfyui", "a1111")


@dataclass(frozen=True)
class HiresFix:
    """A second pass at a larger size: the first pass's latent upscaled by `scale`
    (ComfyUI's LatentUpscaleBy) and denoised again (a second KSampler), docs/image-to-image.md."""

    scale: float = 0.0  # 1 < scale <= 4; 0 on the wire when left out (refused)
    upscale_method: str = ""  # "" on the wire: nearest-exact
    steps: int = 0  # 0: the request's steps
    denoise: float = 0.5

    @property
    def method(self) -> str:
        return self.upscale_method or UPSCALE_METHODS[0]


@dataclass(frozen=True)
class JobWebhook:
    """Where a job's outcome is POSTed (t2i.jobs.webhooks); jobs only."""

    url: str = ""
    events: tuple[str, ...] = ()  # empty: every event


@dataclass(frozen=True)
class GenerateRequest:
    """One generation, as validated by t2i.validation. The defaults are what the client and
    the CLI send when a caller leaves a field out (the REST API has no defaults)."""

    model_id: int = 1
    prompt: str = ""
    negative_prompt: str = ""
    height: int = 1024
    width: int = 1024
    steps: int = 28
    cfg_scale: float = 7.0
    seed: int = -1  # -1: a random seed, returned in the result
    sampler: str = "euler"
    scheduler: str = "normal"
    loras: tuple[LoraSpec, ...] = ()
    num_images: int = 1
    preview_every_steps: int = 0  # streams only; 0: no previews
    omit_metadata: bool = False
    output_format: str = "png"  # png, webp or jpeg ("" on the wire: png)
    quality: int = 90  # webp and jpeg
    # RescaleCFG's multiplier phi, 0 to 1 (0: plain cfg); docs/sampling.md "RescaleCFG". Last,
    # so that positional construction keeps its meaning.
    cfg_rescale: float = 0.0
    # Image to image (docs/image-to-image.md). `init_image` and `mask` are the caller's file
    # bytes (PNG, JPEG or WebP), read by engine/pictures.py; width and height 0 with a picture:
    # the picture's own size, cropped to multiples of 8.
    init_image: bytes = field(default=b"", repr=False)
    denoise: float = 1.0  # ComfyUI KSampler's denoise: 0 < denoise <= 1
    mask: bytes = field(default=b"", repr=False)  # inpainting: white repaints, black keeps
    resize_mode: str = ""  # "" on the wire: just-resize
    hires_fix: HiresFix | None = None
    prompt_syntax: str = ""  # "" on the wire: comfyui
    webhook: JobWebhook | None = None  # SubmitJob only (t2i.jobs); validation refuses it elsewhere

    @property
    def syntax(self) -> str:
        return self.prompt_syntax or PROMPT_SYNTAXES[0]

    @property
    def image_format(self) -> str:
        return self.output_format or "png"

    @property
    def resize(self) -> str:
        return self.resize_mode or RESIZE_MODES[0]


@dataclass(frozen=True)
class GenerateResult:
    images: list[bytes]
    seeds: list[int]
    # Filled by the billing layer; the engine leaves them at 0.
    stardust_usage: int = 0
    stardust_balance: int = 0
    output_format: str = "png"


@dataclass(frozen=True)
class ModelInfo:
    id: int
    name: str
    min_size: int
    max_size: int
    max_steps: int
    max_pixels: int  # width x height (models/config.py: ModelSpec holds the defaults)
    max_prompt_chunks: int
    demo: bool = False
    # Textual inversions a prompt can name as `embedding:NAME` on this model.
    embeddings: tuple[str, ...] = ()
    # What the UNet predicts (epsilon or v_prediction) and whether its sigma table has zero
    # terminal SNR: what a client needs to reproduce the model's images elsewhere.
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    checkpoint: str = ""  # the checkpoint's file name (the recipe's Model is its stem)
    sha256: str = ""  # of the checkpoint file


@dataclass(frozen=True)
class LoraDescription:
    """A registered LoRA as ListLoras shows it."""

    name: str
    model_id: int
    base_model: str
    rank: int
    size_bytes: int
    has_text_encoder: bool
    trigger_words: tuple[str, ...]
    hash: str


@dataclass
class StageTimes:
    """Seconds spent per stage of one request, for metrics and logs."""

    queue_wait: float = 0.0
    text_encode: float = 0.0
    vae_encode: float = 0.0  # image to image: the picture's VAE encode
    denoise: float = 0.0
    vae_decode: float = 0.0
    png_encode: float = 0.0
    evaluations: int = 0
    batch_sizes: list[int] = field(default_factory=list)


# Events of a streamed generation (GenerateImageStream), in the order they come.


@dataclass(frozen=True)
class Queued:
    position: int  # 1: next to be admitted
    ahead: int


@dataclass(frozen=True)
class Started:
    queue_seconds: float


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    evaluations: int
    total_evaluations: int
    elapsed_seconds: float
    remaining_seconds: float


@dataclass(frozen=True)
class Preview:
    step: int
    jpeg: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Failed:
    """The last event of a stream that failed after it started."""

    code: int  # HTTP status
    status: str  # gRPC status name
    message: str


Event = Queued | Started | Progress | Preview | GenerateResult | Failed
