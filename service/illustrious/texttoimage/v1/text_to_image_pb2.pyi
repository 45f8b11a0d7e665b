from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateImageRequest(_message.Message):
    __slots__ = ("model_id", "prompt", "negative_prompt", "height", "width", "steps", "cfg_scale", "seed", "sampler_name", "scheduler", "loras", "num_images", "preview_every_steps", "omit_metadata", "output_format", "quality", "cfg_rescale", "init_image", "denoise", "mask", "resize_mode", "hires_fix", "prompt_syntax", "webhook")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_NAME_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    OMIT_METADATA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    CFG_RESCALE_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    DENOISE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    HIRES_FIX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SYNTAX_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_FIELD_NUMBER: _ClassVar[int]
    model_id: int
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    cfg_scale: float
    seed: int
    sampler_name: str
    scheduler: str
    loras: _containers.RepeatedCompositeFieldContainer[LoraSettings]
    num_images: int
    preview_every_steps: int
    omit_metadata: bool
    output_format: str
    quality: int
    cfg_rescale: float
    init_image: bytes
    denoise: float
    mask: bytes
    resize_mode: str
    hires_fix: HiresFix
    prompt_syntax: str
    webhook: JobWebhook
    def __init__(self, model_id: _Optional[int] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., steps: _Optional[int] = ..., cfg_scale: _Optional[float] = ..., seed: _Optional[int] = ..., sampler_name: _Optional[str] = ..., scheduler: _Optional[str] = ..., loras: _Optional[_Iterable[_Union[LoraSettings, _Mapping]]] = ..., num_images: _Optional[int] = ..., preview_every_steps: _Optional[int] = ..., omit_metadata: _Optional[bool] = ..., output_format: _Optional[str] = ..., quality: _Optional[int] = ..., cfg_rescale: _Optional[float] = ..., init_image: _Optional[bytes] = ..., denoise: _Optional[float] = ..., mask: _Optional[bytes] = ..., resize_mode: _Optional[str] = ..., hires_fix: _Optional[_Union[HiresFix, _Mapping]] = ..., prompt_syntax: _Optional[str] = ..., webhook: _Optional[_Union[JobWebhook, _Mapping]] = ...) -> None: ...

class JobWebhook(_message.Message):
    __slots__ = ("url", "events")
    URL_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    url: str
    events: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, url: _Optional[str] = ..., events: _Optional[_Iterable[str]] = ...) -> None: ...

class HiresFix(_message.Message):
    __slots__ = ("scale", "upscale_method", "steps", "denoise")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_METHOD_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_FIELD_NUMBER: _ClassVar[int]
    scale: float
    upscale_method: str
    steps: int
    denoise: float
    def __init__(self, scale: _Optional[float] = ..., upscale_method: _Optional[str] = ..., steps: _Optional[int] = ..., denoise: _Optional[float] = ...) -> None: ...

class LoraSettings(_message.Message):
    __slots__ = ("name", "strength", "strength_clip")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_CLIP_FIELD_NUMBER: _ClassVar[int]
    name: str
    strength: float
    strength_clip: float
    def __init__(self, name: _Optional[str] = ..., strength: _Optional[float] = ..., strength_clip: _Optional[float] = ...) -> None: ...

class GenerateImageResponse(_message.Message):
    __slots__ = ("images", "stardust_usage", "stardust_balance", "seeds", "output_format")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STARDUST_USAGE_FIELD_NUMBER: _ClassVar[int]
    STARDUST_BALANCE_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    stardust_usage: int
    stardust_balance: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    output_format: str
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., stardust_usage: _Optional[int] = ..., stardust_balance: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ..., output_format: _Optional[str] = ...) -> None: ...

class GenerateImageEvent(_message.Message):
    __slots__ = ("queued", "started", "progress", "preview", "result", "error")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    queued: QueuedEvent
    started: StartedEvent
    progress: ProgressEvent
    preview: PreviewEvent
    result: GenerateImageResponse
    error: ErrorEvent
    def __init__(self, queued: _Optional[_Union[QueuedEvent, _Mapping]] = ..., started: _Optional[_Union[StartedEvent, _Mapping]] = ..., progress: _Optional[_Union[ProgressEvent, _Mapping]] = ..., preview: _Optional[_Union[PreviewEvent, _Mapping]] = ..., result: _Optional[_Union[GenerateImageResponse, _Mapping]] = ..., error: _Optional[_Union[ErrorEvent, _Mapping]] = ...) -> None: ...

class QueuedEvent(_message.Message):
    __slots__ = ("position", "ahead")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    AHEAD_FIELD_NUMBER: _ClassVar[int]
    position: int
    ahead: int
    def __init__(self, position: _Optional[int] = ..., ahead: _Optional[int] = ...) -> None: ...

class StartedEvent(_message.Message):
    __slots__ = ("queue_seconds",)
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("step", "total_steps", "evaluations", "total_evaluations", "elapsed_seconds", "remaining_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    evaluations: int
    total_evaluations: int
    elapsed_seconds: float
    remaining_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., evaluations: _Optional[int] = ..., total_evaluations: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., remaining_seconds: _Optional[float] = ...) -> None: ...

class PreviewEvent(_message.Message):
    __slots__ = ("step", "jpeg", "width", "height")
    STEP_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    step: int
    jpeg: bytes
    width: int
    height: int
    def __init__(self, step: _Optional[int] = ..., jpeg: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ErrorEvent(_message.Message):
    __slots__ = ("code", "status", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    status: str
    message: str
    def __init__(self, code: _Optional[int] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ListLorasRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: int
    def __init__(self, model_id: _Optional[int] = ...) -> None: ...

class ListLorasResponse(_message.Message):
    __slots__ = ("loras",)
    LORAS_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[Lora]
    def __init__(self, loras: _Optional[_Iterable[_Union[Lora, _Mapping]]] = ...) -> None: ...

class Lora(_message.Message):
    __slots__ = ("name", "model_id", "base_model", "rank", "size_bytes", "has_text_encoder", "trigger_words", "hash")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_TEXT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_WORDS_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: int
    base_model: str
    rank: int
    size_bytes: int
    has_text_encoder: bool
    trigger_words: _containers.RepeatedScalarFieldContainer[str]
    hash: str
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[int] = ..., base_model: _Optional[str] = ..., rank: _Optional[int] = ..., size_bytes: _Optional[int] = ..., has_text_encoder: _Optional[bool] = ..., trigger_words: _Optional[_Iterable[str]] = ..., hash: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("id", "name", "min_size", "max_size", "max_steps", "demo", "embeddings", "max_pixels", "max_prompt_chunks", "prediction_type", "zero_terminal_snr", "checkpoint", "sha256")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEMO_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    ZERO_TERMINAL_SNR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    min_size: int
    max_size: int
    max_steps: int
    demo: bool
    embeddings: _containers.RepeatedScalarFieldContainer[str]
    max_pixels: int
    max_prompt_chunks: int
    prediction_type: str
    zero_terminal_snr: bool
    checkpoint: str
    sha256: str
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., min_size: _Optional[int] = ..., max_size: _Optional[int] = ..., max_steps: _Optional[int] = ..., demo: _Optional[bool] = ..., embeddings: _Optional[_Iterable[str]] = ..., max_pixels: _Optional[int] = ..., max_prompt_chunks: _Optional[int] = ..., prediction_type: _Optional[str] = ..., zero_terminal_snr: _Optional[bool] = ..., checkpoint: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "status", "created_at", "started_at", "finished_at", "position", "stardust_price", "stardust_usage", "stardust_balance", "image_urls", "error", "attempts", "results_expire_at", "webhook_deliveries", "progress")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STARDUST_PRICE_FIELD_NUMBER: _ClassVar[int]
    STARDUST_USAGE_FIELD_NUMBER: _ClassVar[int]
    STARDUST_BALANCE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URLS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_EXPIRE_AT_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: str
    created_at: str
    started_at: str
    finished_at: str
    position: int
    stardust_price: int
    stardust_usage: int
    stardust_balance: int
    image_urls: _containers.RepeatedScalarFieldContainer[str]
    error: JobError
    attempts: int
    results_expire_at: str
    webhook_deliveries: _containers.RepeatedCompositeFieldContainer[WebhookDelivery]
    progress: ProgressEvent
    def __init__(self, id: _Optional[str] = ..., status: _Optional[str] = ..., created_at: _Optional[str] = ..., started_at: _Optional[str] = ..., finished_at: _Optional[str] = ..., position: _Optional[int] = ..., stardust_price: _Optional[int] = ..., stardust_usage: _Optional[int] = ..., stardust_balance: _Optional[int] = ..., image_urls: _Optional[_Iterable[str]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., attempts: _Optional[int] = ..., results_expire_at: _Optional[str] = ..., webhook_deliveries: _Optional[_Iterable[_Union[WebhookDelivery, _Mapping]]] = ..., progress: _Optional[_Union[ProgressEvent, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id", "after")
    ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    id: str
    after: int
    def __init__(self, id: _Optional[str] = ..., after: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("id", "queued", "started", "progress", "preview", "ended")
    ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    id: int
    queued: QueuedEvent
    started: StartedEvent
    progress: ProgressEvent
    preview: PreviewEvent
    ended: Job
    def __init__(self, id: _Optional[int] = ..., queued: _Optional[_Union[QueuedEvent, _Mapping]] = ..., started: _Optional[_Union[StartedEvent, _Mapping]] = ..., progress: _Optional[_Union[ProgressEvent, _Mapping]] = ..., preview: _Optional[_Union[PreviewEvent, _Mapping]] = ..., ended: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class WebhookDelivery(_message.Message):
    __slots__ = ("id", "event", "status", "attempts", "last_status", "last_error", "next_attempt_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    event: str
    status: str
    attempts: int
    last_status: int
    last_error: str
    next_attempt_at: str
    def __init__(self, id: _Optional[str] = ..., event: _Optional[str] = ..., status: _Optional[str] = ..., attempts: _Optional[int] = ..., last_status: _Optional[int] = ..., last_error: _Optional[str] = ..., next_attempt_at: _Optional[str] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "status", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    status: str
    message: str
    def __init__(self, code: _Optional[int] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("status", "cursor", "page_size")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    status: str
    cursor: str
    page_size: int
    def __init__(self, status: _Optional[str] = ..., cursor: _Optional[str] = ..., page_size: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_cursor")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_cursor: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class GetJobImageRequest(_message.Message):
    __slots__ = ("id", "index")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...
