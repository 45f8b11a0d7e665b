"""Request validation: every bad field becomes an InvalidArgument naming field, value and rule.

Runs before a request is queued, so NaN, negative or absurd values never reach the model.
"""

from __future__ import annotations

import math
import unicodedata

from .cost import PIXELS_PER_MEGAPIXEL
from .domain import PROMPT_SYNTAXES, RESIZE_MODES, UPSCALE_METHODS, GenerateRequest, ModelInfo
from .errors import InvalidArgument, MissingFields
from .passes import hires_size
from .sampling import SAMPLER_NAMES, SCHEDULER_NAMES
from .sampling.noise import MAX_SEED, RANDOM_SEED

MAX_PROMPT_CHARS = 3000
MAX_IMAGES = 8
IMAGE_FORMATS = ("png", "webp", "jpeg")
MIN_STEPS = 1
MAX_CFG_SCALE = 30.0
MAX_HIRES_SCALE = 4.0
# The least denoise: ComfyUI's denoise moves in steps of 0.01, and the schedule is made for
# steps / denoise steps, which must stay a schedule (150 / 0.01 = 15,000), not a denial of service.
MIN_DENOISE = 0.01
MAX_CFG_RESCALE = 1.0  # RescaleCFG's phi mixes the rescaled and the plain guidance: 0 to 1
SIZE_MULTIPLE = 8
# The control characters a prompt may hold: what people paste. The others are refused: NUL ends
# the text of a PNG text chunk (and many readers choke on it), and none of them means anything
# to the text encoder, while several (\v, \f, \x1c-\x1e, \x85) are line breaks to some readers
# of the image's recipe (engine/recipe.py writes the prompt on one line).
ALLOWED_CONTROLS = "\t\n\r"


# Fields a request must set, with their wire (JSON) names. A protobuf field left out arrives as
# its zero value, and none of these may be zero, so zero means "missing".
REQUIRED = (("modelId", "model_id"), ("prompt", "prompt"), ("height", "height"), ("width", "width"),
            ("steps", "steps"), ("samplerName", "sampler"), ("scheduler", "scheduler"))


def check_required(request: GenerateRequest) -> None:
    """InvalidArgument naming every required field the request left out (an empty body, say),
    before anything else is judged: "model 0 does not exist" would send the caller astray.

    One zero-valued field among set ones is more likely a value than an omission, so it gets
    its own rule's message ("invalid steps 0: must be 1 to 150") from validate(); a zero modelId,
    or two or more zero fields, read as a body that left them out."""
    missing = [name for name, attribute in REQUIRED if not getattr(request, attribute)]
    if request.init_image:
        # With a picture, the size may be left out: the picture's own size is used.
        missing = [name for name in missing if name not in ("height", "width")]
    if "modelId" in missing or len(missing) > 1:
        raise MissingFields(missing)


def check_text(field: str, text: str) -> None:
    """InvalidArgument naming the first control character of `text` that is not allowed."""
    for position, character in enumerate(text):
        if character not in ALLOWED_CONTROLS and unicodedata.category(character) == "Cc":
            raise InvalidArgument(
                field, text,
                f"control character U+{ord(character):04X} at position {position} is not allowed "
                "(of the control characters only tab, line feed and carriage return are)",
            )


def check_size(request: GenerateRequest, model: ModelInfo, origin: str = "") -> None:
    """InvalidArgument unless width and height are multiples of 8 within the model's bounds and
    pixel cap; `origin` says where the size came from when the caller did not write it."""
    for name, value in (("height", request.height), ("width", request.width)):
        if value % SIZE_MULTIPLE or not model.min_size <= value <= model.max_size:
            raise InvalidArgument(
                name, value,
                f"must be a multiple of {SIZE_MULTIPLE} from {model.min_size} to {model.max_size} for model {model.id}{origin}",
            )
    if request.width * request.height > model.max_pixels:
        raise InvalidArgument(
            "width x height", f"{request.width}x{request.height}",
            f"must be at most {model.max_pixels} pixels ({model.max_pixels / PIXELS_PER_MEGAPIXEL:.2f} megapixels) "
            f"for model {model.id}{origin}",
        )


def check_image_fields(request: GenerateRequest, model: ModelInfo) -> None:
    """The image-to-image and hires fix fields, apart from the files themselves (engine/pictures.py
    reads those)."""
    if not (math.isfinite(request.denoise) and MIN_DENOISE <= request.denoise <= 1.0):
        raise InvalidArgument("denoise", request.denoise, f"must be a finite number from {MIN_DENOISE:g} to 1")
    if request.denoise < 1.0 and not request.init_image:
        raise InvalidArgument(
            "denoise", request.denoise,
            "below 1 needs initImage (image to image); text-to-image starts from pure noise (a second, partial pass is hiresFix)",
        )
    if request.mask and not request.init_image:
        raise InvalidArgument("mask", request.mask, "needs initImage: a mask says which part of that picture to re-draw")
    if request.resize_mode and request.resize_mode not in RESIZE_MODES:
        raise InvalidArgument("resizeMode", request.resize_mode, "must be one of " + ", ".join(RESIZE_MODES))
    hires = request.hires_fix
    if hires is None:
        return
    if not (math.isfinite(hires.scale) and 1.0 < hires.scale <= MAX_HIRES_SCALE):
        raise InvalidArgument("hiresFix.scale", hires.scale, f"must be a finite number more than 1 and at most {MAX_HIRES_SCALE:g}")
    if hires.upscale_method and hires.upscale_method not in UPSCALE_METHODS:
        raise InvalidArgument("hiresFix.upscaleMethod", hires.upscale_method, "must be one of " + ", ".join(UPSCALE_METHODS))
    if not 0 <= hires.steps <= model.max_steps:
        raise InvalidArgument("hiresFix.steps", hires.steps, f"must be 0 (the request's steps) or 1 to {model.max_steps}")
    if not (math.isfinite(hires.denoise) and MIN_DENOISE <= hires.denoise <= 1.0):
        raise InvalidArgument("hiresFix.denoise", hires.denoise, f"must be a finite number from {MIN_DENOISE:g} to 1")


def validate(request: GenerateRequest, model: ModelInfo) -> None:
    if not 1 <= len(request.prompt) <= MAX_PROMPT_CHARS:
        raise InvalidArgument("prompt", request.prompt, f"must be 1 to {MAX_PROMPT_CHARS} characters")
    if len(request.negative_prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument("negativePrompt", request.negative_prompt, f"must be at most {MAX_PROMPT_CHARS} characters")
    if request.prompt_syntax and request.prompt_syntax not in PROMPT_SYNTAXES:
        raise InvalidArgument("promptSyntax", request.prompt_syntax, "must be one of " + ", ".join(PROMPT_SYNTAXES))
    if request.webhook is not None:
        raise InvalidArgument("webhook", request.webhook.url, "only a job takes a webhook (POST /text-to-image/jobs, "
                              "SubmitJob): a synchronous call has its answer")
    check_text("prompt", request.prompt)
    check_text("negativePrompt", request.negative_prompt)
    check_size(request, model)
    if not MIN_STEPS <= request.steps <= model.max_steps:
        raise InvalidArgument("steps", request.steps, f"must be {MIN_STEPS} to {model.max_steps}")
    if not (math.isfinite(request.cfg_scale) and 0.0 <= request.cfg_scale <= MAX_CFG_SCALE):
        raise InvalidArgument("cfgScale", request.cfg_scale, f"must be a finite number from 0 to {MAX_CFG_SCALE:g}")
    if not (math.isfinite(request.cfg_rescale) and 0.0 <= request.cfg_rescale <= MAX_CFG_RESCALE):
        raise InvalidArgument(
            "cfgRescale", request.cfg_rescale, f"must be a finite number from 0 (plain cfg) to {MAX_CFG_RESCALE:g}"
        )
    if request.seed != RANDOM_SEED and not 0 <= request.seed <= MAX_SEED:
        raise InvalidArgument("seed", request.seed, f"must be -1 (random) or 0 to {MAX_SEED}")
    if request.sampler not in SAMPLER_NAMES:
        raise InvalidArgument("samplerName", request.sampler, "must be one of " + ", ".join(SAMPLER_NAMES))
    if request.scheduler not in SCHEDULER_NAMES:
        raise InvalidArgument("scheduler", request.scheduler, "must be one of " + ", ".join(SCHEDULER_NAMES))
    if not 1 <= request.num_images <= MAX_IMAGES:
        raise InvalidArgument("numImages", request.num_images, f"must be 1 to {MAX_IMAGES}")
    if not 0 <= request.preview_every_steps <= request.steps:
        raise InvalidArgument("previewEverySteps", request.preview_every_steps, f"must be 0 (no previews) to {request.steps} (the steps)")
    if request.image_format not in IMAGE_FORMATS:
        raise InvalidArgument("outputFormat", request.output_format, "must be one of " + ", ".join(IMAGE_FORMATS))
    if not 1 <= request.quality <= 100:
        raise InvalidArgument("quality", request.quality, "must be 1 to 100")
    check_image_fields(request, model)
    if request.hires_fix is not None:
        width, height = hires_size(request.width, request.height, request.hires_fix.scale)
        if not (model.min_size <= min(width, height) and max(width, height) <= model.max_size
                and width * height <= model.max_pixels):
            raise InvalidArgument(
                "hiresFix.scale", request.hires_fix.scale,
                f"makes {request.width}x{request.height} into {width}x{height}, which is out of model {model.id}'s limits "
                f"(sides {model.min_size} to {model.max_size}, at most {model.max_pixels} pixels)",
            )
