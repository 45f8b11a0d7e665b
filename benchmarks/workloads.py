"""The serving benchmark's workloads: request mixes from a fixed seed, Poisson arrival traces.

- homogeneous: every request as the earlier serving benchmark sent it (128x128, 28 steps,
  euler/normal, cfg 7, the same one-chunk prompt), only the seed differs;
- mixed: each request draws its own settings (fixed seed): steps from the common presets
  between 20 and 40, any of the service's 8 samplers and 7 schedulers, cfg 4 to 9 in steps of
  0.5, one of three sizes, and booru-style tag prompts of 1, 2 or 3 CLIP chunks (75 tokens
  each, counted with the model's own tokenizer, which has the real CLIP vocabulary);
- image mix (benchmarks/image_serving.py): the mixed workload's requests, a third of them image
  to image (denoise 0.3 to 0.8, generated pictures, a quarter of those inpainting with a
  generated mask) and a sixth hires fix at 1.5x; the rest text-to-image.

Arrivals are open-loop: exponential gaps at a given rate (a Poisson process) from a fixed seed,
the same trace for every system.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from t2i.domain import GenerateRequest, HiresFix
from t2i.sampling import SAMPLER_NAMES, SCHEDULER_NAMES

CHUNK_TOKENS = 75

HOMOGENEOUS_PROMPT = "masterpiece, best quality, 1girl, long pink hair, violet eyes, smile, upper body, sunset"
HOMOGENEOUS_NEGATIVE = "worst quality, low quality, bad anatomy"
HOMOGENEOUS = GenerateRequest(
    model_id=1, prompt=HOMOGENEOUS_PROMPT, negative_prompt=HOMOGENEOUS_NEGATIVE, width=128, height=128, steps=28,
    cfg_scale=7.0, seed=0, sampler="euler", scheduler="normal",
)

MIXED_SIZES = ((96, 0.3), (128, 0.4), (160, 0.3))  # square sizes and their shares
MIXED_STEPS = (20, 24, 25, 28, 30, 32, 35, 40)  # the presets people pick between 20 and 40
MIXED_CFG = tuple(4.0 + 0.5 * i for i in range(11))  # 4.0 .. 9.0
PROMPT_CHUNKS = ((1, 0.55), (2, 0.30), (3, 0.15))
NEGATIVE_CHUNKS = ((1, 0.8), (2, 0.2))

QUALITY = ["masterpiece", "best quality", "amazing quality", "very aesthetic", "absurdres", "highres", "newest",
           "detailed background", "ultra detailed", "sharp focus", "depth of field", "cinematic lighting"]
SUBJECT = ["1girl", "1boy", "2girls", "solo", "looking at viewer", "smile", "open mouth", "closed eyes", "blush",
           "long hair", "short hair", "twintails", "ponytail", "pink hair", "silver hair", "black hair", "blonde hair",
           "blue eyes", "red eyes", "violet eyes", "green eyes", "hair ribbon", "hair ornament", "animal ears", "cat ears",
           "fox tail", "bangs", "ahoge", "freckles", "earrings", "choker", "glasses", "hat", "witch hat", "headphones"]
CLOTHES = ["school uniform", "serafuku", "pleated skirt", "thighhighs", "hoodie", "kimono", "yukata", "maid outfit",
           "armor", "cape", "dress", "white dress", "sundress", "jacket", "scarf", "gloves", "boots", "sneakers",
           "sailor collar", "detached sleeves", "oversized shirt", "apron", "swimsuit", "coat", "necktie"]
POSE = ["standing", "sitting", "upper body", "full body", "cowboy shot", "from side", "from above", "dynamic pose",
        "arms up", "hand on hip", "peace sign", "holding umbrella", "holding book", "holding sword", "running",
        "leaning forward", "looking back", "head tilt", "wind", "floating hair"]
SCENE = ["outdoors", "indoors", "city", "night sky", "starry sky", "sunset", "cherry blossoms", "forest", "beach",
         "ocean", "classroom", "cafe", "library", "rooftop", "rain", "snow", "street", "neon lights", "shrine",
         "castle", "field of flowers", "mountain", "river", "bridge", "train station", "autumn leaves", "moonlight",
         "clouds", "blue sky", "lens flare", "bokeh", "reflection", "water drops", "light particles", "sparkle"]
STYLE = ["anime coloring", "watercolor", "oil painting", "flat color", "cel shading", "sketch", "official art",
         "key visual", "illustration", "vibrant colors", "pastel colors", "high contrast", "soft lighting",
         "rim lighting", "backlighting", "volumetric lighting", "chromatic aberration", "film grain"]
NEGATIVE = ["worst quality", "low quality", "normal quality", "lowres", "bad anatomy", "bad hands", "extra fingers",
            "missing fingers", "fewer digits", "text", "signature", "watermark", "username", "blurry", "jpeg artifacts",
            "cropped", "error", "ugly", "duplicate", "deformed", "disfigured", "poorly drawn face", "mutation",
            "extra limbs", "long neck", "bad proportions", "censored", "monochrome", "greyscale", "sketch",
            "artist name", "logo", "out of frame", "bad feet", "simple background", "oversaturated", "underexposed"]


def _choice(rng: random.Random, weighted: tuple[tuple[object, float], ...]):
    values, weights = zip(*weighted)
    return rng.choices(values, weights)[0]


def tag_prompt(rng: random.Random, chunks: int, count_tokens: Callable[[str], int], vocabulary: list[list[str]]) -> str:
    """Comma-separated tags until the prompt needs `chunks` CLIP chunks: its token count lands
    well inside ((chunks - 1) * 75, chunks * 75]. CLIP's tokenizer splits words and
    punctuation apart, so a prompt's count is its tags' counts plus one per comma."""
    low = (chunks - 1) * CHUNK_TOKENS + 10 if chunks > 1 else 12
    high = chunks * CHUNK_TOKENS - 8
    target = rng.randint(low, high)
    tags: list[str] = []
    tokens = -1  # no tags: no comma either
    while tokens < target:
        tag = rng.choice(vocabulary[len(tags) % len(vocabulary)])
        if tokens + 1 + count_tokens(tag) > high:
            break
        tags.append(tag)
        tokens += 1 + count_tokens(tag)
    return ", ".join(tags)


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[GenerateRequest, ...]

    def __len__(self) -> int:
        return len(self.requests)


def homogeneous(count: int, seed: int) -> Workload:
    rng = random.Random(seed)
    return Workload("homogeneous", tuple(replace(HOMOGENEOUS, seed=rng.randrange(2**31)) for _ in range(count)))


def mixed(
    count: int, seed: int, count_tokens: Callable[[str], int], *, sizes: tuple[tuple[int, float], ...] = MIXED_SIZES,
    steps: tuple[int, ...] = MIXED_STEPS,
) -> Workload:
    rng = random.Random(seed)
    positive = [QUALITY, SUBJECT, CLOTHES, POSE, SCENE, STYLE, SUBJECT, SCENE]
    requests = []
    for _ in range(count):
        size = _choice(rng, sizes)
        requests.append(
            GenerateRequest(
                model_id=1,
                prompt=tag_prompt(rng, _choice(rng, PROMPT_CHUNKS), count_tokens, positive),
                negative_prompt=tag_prompt(rng, _choice(rng, NEGATIVE_CHUNKS), count_tokens, [NEGATIVE]),
                width=size, height=size,
                steps=rng.choice(steps),
                cfg_scale=rng.choice(MIXED_CFG),
                seed=rng.randrange(2**31),
                sampler=rng.choice(SAMPLER_NAMES),
                scheduler=rng.choice(SCHEDULER_NAMES),
            )
        )
    return Workload("mixed", tuple(requests))


# --- the image mix (benchmarks/image_serving.py) -------------------------------------------------

# Of every 6 requests, in a shuffled order: 3 text-to-image, 2 image to image, 1 hires fix.
IMAGE_BLOCK = ("text-to-image",) * 3 + ("img2img",) * 2 + ("hires fix",)
IMAGE_DENOISE = tuple(round(0.30 + 0.05 * i, 2) for i in range(11))  # 0.30 .. 0.80, uniform
INPAINT_SHARE = 0.25  # of the image-to-image requests, those that carry a mask (inpainting)
IMAGE_HIRES = HiresFix(scale=1.5, upscale_method="nearest-exact", steps=0, denoise=0.5)  # steps 0: the request's


def picture_png(rng: random.Random, width: int, height: int) -> bytes:
    """A generated picture: a smooth random colour field (a 4x4 grid of random colours, upscaled
    bicubically) with 10 % per-pixel noise, as a PNG. Compresses like a picture, not like noise."""
    from PIL import Image

    field = Image.frombytes("RGB", (4, 4), rng.randbytes(48)).resize((width, height), Image.Resampling.BICUBIC)
    noise = Image.frombytes("RGB", (width, height), rng.randbytes(3 * width * height))
    return _png(Image.blend(field, noise, 0.1))


def mask_png(rng: random.Random, width: int, height: int) -> bytes:
    """A generated inpainting mask: black (keep) with a white (repaint) ellipse covering 30 to
    60 % of each side at a random place, as a grayscale PNG."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (width, height), 0)
    w, h = int(width * rng.uniform(0.3, 0.6)), int(height * rng.uniform(0.3, 0.6))
    x, y = rng.randrange(width - w + 1), rng.randrange(height - h + 1)
    ImageDraw.Draw(mask).ellipse((x, y, x + w - 1, y + h - 1), fill=255)
    return _png(mask)


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_mixed(
    count: int, seed: int, count_tokens: Callable[[str], int], *, sizes: tuple[tuple[int, float], ...] = MIXED_SIZES,
    steps: tuple[int, ...] = MIXED_STEPS,
) -> Workload:
    """The mixed workload's requests (settings and prompts drawn exactly as mixed() draws them
    from `seed`), each turned into one of the image mix's kinds: in every block of 6 (shuffled),
    3 text-to-image, 2 image to image from a generated picture at the request's size with denoise
    uniform over 0.30, 0.35, .., 0.80 (a quarter of them inpainting, with a generated mask), 1 hires
    fix (IMAGE_HIRES: 1.5x, nearest-exact, the request's steps, denoise 0.5)."""
    base = mixed(count, seed, count_tokens, sizes=sizes, steps=steps).requests
    rng = random.Random(f"image-mix-{seed}")
    kinds: list[str] = []
    while len(kinds) < count:
        block = list(IMAGE_BLOCK)
        rng.shuffle(block)
        kinds += block
    requests = []
    for request, kind in zip(base, kinds):
        if kind == "img2img":
            mask = mask_png(rng, request.width, request.height) if rng.random() < INPAINT_SHARE else b""
            request = replace(request, init_image=picture_png(rng, request.width, request.height), mask=mask,
                              denoise=rng.choice(IMAGE_DENOISE))
        elif kind == "hires fix":
            request = replace(request, hires_fix=IMAGE_HIRES)
        requests.append(request)
    return Workload("image mix", tuple(requests))


def image_kind(request: GenerateRequest) -> str:
    """"text-to-image", "img2img", "inpaint" or "hires fix"."""
    if request.init_image:
        return "inpaint" if request.mask else "img2img"
    return "hires fix" if request.hires_fix is not None else "text-to-image"


def poisson_arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Arrival offsets (seconds) of a Poisson process of `rate` per second within `duration`."""
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def arrivals_of_count(count: int, duration: float, seed: int) -> list[float]:
    """`count` arrival offsets (seconds) within `duration`: a Poisson process conditioned on its
    number of arrivals (sorted uniform times), so a short trace offers exactly the load it is
    meant to, with the bursts of Poisson arrivals, rather than that load give or take sqrt(count)."""
    rng = random.Random(seed)
    return sorted(rng.uniform(0.0, duration) for _ in range(count))


def token_counter(model_dir) -> Callable[[str], int]:
    """Tokens of a text (no start/end tokens) with the model's first tokenizer."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer", local_files_only=True)

    @functools.lru_cache(maxsize=None)
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    return count


def chunks_of(count_tokens: Callable[[str], int], text: str) -> int:
    return max(1, -(-count_tokens(text) // CHUNK_TOKENS))
