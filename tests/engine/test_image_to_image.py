"""Image to image, inpainting and hires fix in the engine, on the real demo model, against
references written here from docs/image-to-image.md and the model's own parts:

- the picture encoded by the demo model's diffusers VAE directly (posterior mean times the
  scaling factor, pixels 2x - 1), VAEEncode's middle crop done by hand;
- sigmas from compute_sigmas / get_sigmas, sliced by the denoise rule;
- the start noise from torch.randn on a CPU generator seeded with the seed, at the latent's shape;
- the sampler loop of t2i.sampling.sample() with a denoiser that calls
  t2i.engine.denoise.evaluate for the one request.

Engine and reference sum in other orders (other threads, other batches), so they are compared
within the float32 reduction bound of the networks in the chain (tests/support/tolerance.py),
and each comparison is shown to fail on a deliberately wrong variant."""

import asyncio
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from t2i.domain import GenerateRequest, HiresFix
from t2i.engine import core as core_module
from t2i.engine import pictures
from t2i.engine.batching import Batcher
from t2i.engine.core import EngineCore
from t2i.engine.denoise import UNetInput, evaluate
from t2i.engine.engine import AsyncEngine
from t2i.engine.imaging import decode_latents
from t2i.engine.latents import encode_picture
from t2i.engine.text import encode_prompts, prepare_prompt
from t2i.sampling import compute_sigmas, get_sigmas, sample
from t2i.settings import EngineConfig

from ..support.tolerance import EPS32, elementwise_bound, max_abs, max_diff, network_reductions, reduction_bound
from .test_core import TOKENS, engine_request, unet_tolerance

PROMPT, NEGATIVE = "1girl, masterpiece", "worst quality"


# --- pictures and masks, made here --------------------------------------------------------


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def picture_pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def mask_pixels(width: int, height: int) -> np.ndarray:
    """An RGB mask whose red channel is a smooth ramp with intermediate values (green and blue
    are noise: only red counts)."""
    ys, xs = np.mgrid[0:height, 0:width]
    red = np.clip(255 * (0.5 + 0.5 * np.sin(xs / 9.0 + ys / 13.0)), 0, 255).astype(np.uint8)
    rest = np.random.default_rng(9).integers(0, 256, (height, width, 2), dtype=np.uint8)
    return np.concatenate([red[..., None], rest], axis=-1)


# --- the reference --------------------------------------------------------------------------


def reference_latent(model, pixels: np.ndarray) -> torch.Tensor:
    """VAEEncode by hand on an (H, W, 3) uint8 picture whose sides are multiples of 8."""
    assert model.vae.config.get("shift_factor") is None  # SDXL's VAE: the latent is mean * scaling factor
    unit = torch.from_numpy(pixels.astype(np.float32) / np.float32(255))
    image = unit.permute(2, 0, 1).unsqueeze(0) * 2 - 1
    with torch.inference_mode():
        mean = model.vae.encode(image).latent_dist.mean
    return mean * model.vae.config.scaling_factor


def middle_crop(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    top, left = (height % 8) // 2, (width % 8) // 2
    return pixels[top : top + height // 8 * 8, left : left + width // 8 * 8]


def seeded_noise(seed: int, shape) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float32)


def conditioning(model, prompt: str = PROMPT, negative: str = NEGATIVE):
    return encode_prompts(model, [prepare_prompt(model, prompt), prepare_prompt(model, negative, "negativePrompt")])


def tail(model, p: GenerateRequest, steps: int, denoise: float) -> torch.Tensor:
    """The sigmas of a pass (docs/image-to-image.md section 3), written out."""
    if denoise > 0.9999:
        return get_sigmas(p.scheduler, steps, p.sampler)
    return compute_sigmas(model.sigma_table, p.scheduler, int(steps / denoise), p.sampler)[-(steps + 1):]


def start(model, latent, noise, sigma0: float) -> torch.Tensor:
    if sigma0 > model.sigma_table.sigma_max or math.isclose(sigma0, model.sigma_table.sigma_max, rel_tol=1e-5):
        return latent + noise * math.sqrt(1 + sigma0 * sigma0)
    return latent + noise * sigma0


class Denoiser:
    """sample()'s denoiser: one request's evaluation through t2i.engine.denoise.evaluate at the
    pass's size conditioning; with a mask, ComfyUI's blends (the input blend before, each
    prediction blended after: cfg is linear, so blending cond and uncond alike is blending the
    guided prediction, up to the rounding counted in `rounding`)."""

    def __init__(self, model, texts, height: int, width: int, mask=None, latent=None, noise=None):
        self.model, (self.cond, self.uncond) = model, texts
        self.time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        self.mask, self.latent, self.noise = mask, latent, noise
        self.evaluations, self.largest = 0, 0.0

    def __call__(self, x, sigma):
        s = float(sigma[0])
        if self.mask is not None:
            x = x * self.mask + (self.latent + self.noise * s) * (1 - self.mask)
        ((cond, uncond),) = evaluate(self.model, [UNetInput(x, s, self.cond, self.uncond, self.time_ids)])
        self.evaluations += 1
        self.largest = max(self.largest, max_abs(cond, uncond))
        if self.mask is not None:
            keep = self.latent * (1 - self.mask)
            cond, uncond = cond * self.mask + keep, uncond * self.mask + keep
        return cond, uncond


def chain_tolerance(model, magnitude: float, evaluations: int, positions: int = TOKENS, picture: int = 0) -> float:
    """test_core.unet_tolerance's bound (text encoders, then `evaluations` UNet forwards), for
    latents of up to `positions` pixels; plus, when a picture of `picture` pixels was encoded on
    each side, the VAE encoder's own bound (its GroupNorms sum over every pixel). The stages'
    errors add to first order, so each is bounded with its own longest sum."""
    depth, terms = network_reductions(model.unet, positions=max(positions, TOKENS))
    depth *= evaluations
    text_depth, text_terms = network_reductions(*model.text_encoders, positions=TOKENS)
    bound = reduction_bound(eps=EPS32, magnitude=magnitude, terms=max(terms, text_terms), depth=depth + text_depth)
    if picture:
        vae_depth, vae_terms = network_reductions(model.vae.encoder, positions=picture)
        bound += reduction_bound(eps=EPS32, magnitude=magnitude, terms=vae_terms, depth=vae_depth)
    return bound


# A wrong variant must miss the reference by more than the bound plus its own rounding (at most
# the bound again) to show that the comparison fails; these miss by over 10 times the bound.
TEETH = 10


# --- through the AsyncEngine ----------------------------------------------------------------


async def through_engine(model, params: GenerateRequest):
    """The request through AsyncEngine.generate (check, picture read and crop, VAE encode on the
    finishing thread, the core): its final latent, as handed to the decoder, and its result."""
    engine = AsyncEngine({1: model}, EngineConfig(admission_window_ms=0))
    latents = []
    decode = engine.finisher.decode

    def recording(m, latent):
        latents.append(latent.clone())
        return decode(m, latent)

    engine.finisher.decode = recording
    engine.start()
    try:
        result = await asyncio.wait_for(engine.generate(params), timeout=120)
    finally:
        await engine.close()
    (latent,) = latents
    return latent, result


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def params(**overrides) -> GenerateRequest:
    base = dict(model_id=1, prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=64, steps=4, cfg_scale=6.0, seed=11,
                sampler="euler_ancestral", scheduler="karras")
    return GenerateRequest(**{**base, **overrides})


async def test_an_img2img_latent_equals_the_reference(demo_model):
    pixels = picture_pixels(64, 64, seed=1)
    p = params(init_image=png(pixels), denoise=0.6, sampler="dpmpp_2s_ancestral", scheduler="normal", steps=3)
    engine_latent, result = await through_engine(demo_model, p)
    assert image_size(result.images[0]) == (64, 64)

    latent = reference_latent(demo_model, pixels)
    sigmas = tail(demo_model, p, p.steps, p.denoise)
    assert torch.equal(sigmas, compute_sigmas(demo_model.sigma_table, "normal", 5, p.sampler)[-4:])  # int(3 / 0.6) = 5
    noise = seeded_noise(p.seed, latent.shape)
    assert float(sigmas[0]) < demo_model.sigma_table.sigma_max * (1 - 1e-5)  # a partial start: noise * sigma0
    denoiser = Denoiser(demo_model, conditioning(demo_model), 64, 64)
    reference = sample(p.sampler, denoiser, latent + noise * float(sigmas[0]), sigmas, cfg_scale=p.cfg_scale, seed=p.seed)
    assert denoiser.evaluations == 2 * p.steps - 1
    bound = chain_tolerance(demo_model, max_abs(reference), denoiser.evaluations, picture=64 * 64)
    assert max_diff(engine_latent, reference) <= bound
    # Teeth: the text-to-image start scale sqrt(1 + sigma0^2) on the same latent is far off.
    wrong = sample(p.sampler, Denoiser(demo_model, conditioning(demo_model), 64, 64),
                   latent + noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, cfg_scale=p.cfg_scale, seed=p.seed)
    assert max_diff(engine_latent, wrong) > TEETH * bound


async def test_a_picture_without_a_size_is_cropped_in_the_middle(demo_model):
    pixels = picture_pixels(70, 66, seed=2)  # 70 % 8 = 6 -> left 3; 66 % 8 = 2 -> top 1
    p = params(init_image=png(pixels), width=0, height=0, denoise=0.25, sampler="euler", steps=2)
    engine_latent, result = await through_engine(demo_model, p)
    assert image_size(result.images[0]) == (64, 64) and engine_latent.shape == (1, 4, 8, 8)

    sigmas = tail(demo_model, p, 2, 0.25)
    noise = seeded_noise(p.seed, (1, 4, 8, 8))
    texts = conditioning(demo_model)

    def reference(crop):
        latent = reference_latent(demo_model, crop)
        return sample("euler", Denoiser(demo_model, texts, 64, 64), latent + noise * float(sigmas[0]), sigmas,
                      cfg_scale=p.cfg_scale, seed=p.seed)

    middle = reference(pixels[1:65, 3:67])
    assert np.array_equal(middle_crop(pixels), pixels[1:65, 3:67])
    bound = chain_tolerance(demo_model, max_abs(middle), 2, picture=64 * 64)
    assert max_diff(engine_latent, middle) <= bound
    # Teeth: the top-left crop is another picture.
    assert max_diff(engine_latent, reference(pixels[:64, :64])) > TEETH * bound


async def test_an_inpainting_latent_equals_the_reference_with_the_mask_resized_from_its_full_size(demo_model):
    pixels, mask_rgb = picture_pixels(70, 66, seed=3), mask_pixels(70, 66)
    p = params(init_image=png(pixels), mask=png(mask_rgb), width=0, height=0, steps=3)  # denoise 1: the sqrt start
    engine_latent, result = await through_engine(demo_model, p)
    assert image_size(result.images[0]) == (64, 64)

    latent = reference_latent(demo_model, middle_crop(pixels))
    red = torch.from_numpy(mask_rgb[..., 0].astype(np.float32) / np.float32(255))
    sigmas = get_sigmas(p.scheduler, p.steps, p.sampler)
    noise = seeded_noise(p.seed, (1, 4, 8, 8))
    texts = conditioning(demo_model)

    def reference(mask_hw):
        mask = F.interpolate(mask_hw[None, None], size=(8, 8), mode="bilinear").expand(1, 4, 8, 8)
        denoiser = Denoiser(demo_model, texts, 64, 64, mask, latent, noise)
        x = start(demo_model, latent, noise, float(sigmas[0]))
        return sample(p.sampler, denoiser, x, sigmas, cfg_scale=p.cfg_scale, seed=p.seed), denoiser

    expected, denoiser = reference(red)
    assert math.isclose(float(sigmas[0]), demo_model.sigma_table.sigma_max, rel_tol=1e-5)
    # The networks' bound, plus the blends' own roundings (a few per evaluation, on values up to
    # (1 + 2 cfg) times the largest prediction or latent: blending before or after cfg differs by them).
    blends = denoiser.evaluations * elementwise_bound(
        eps=EPS32, magnitude=(1 + 2 * p.cfg_scale) * max(denoiser.largest, max_abs(latent)), operations=8)
    bound = chain_tolerance(demo_model, max_abs(expected), denoiser.evaluations, picture=64 * 64) + blends
    assert max_diff(engine_latent, expected) <= bound
    # Teeth: the mask resized from its middle crop (as if it were cropped like the picture) is off.
    cropped, _ = reference(red[1:65, 3:67].contiguous())
    assert max_diff(engine_latent, cropped) > TEETH * bound


# --- through the EngineCore -----------------------------------------------------------------


def with_picture(model, name: str, p: GenerateRequest, latent=None) -> tuple:
    """An EngineRequest as AsyncEngine prepares one with a picture: the picture read, cropped and
    encoded, the mask read (pass `latent` to reuse an encoding)."""
    request = engine_request(model, name, p)
    if p.init_image:
        if latent is None:
            pixels = pictures.decode_picture(p.init_image, "initImage", 10**8)
            latent = encode_picture(model, pictures.crop_to_multiple_of_8(pixels)[0])
        request.image_latent = latent
        request.mask = pictures.decode_mask(p.mask, "mask", 10**8) if p.mask else None
    return request, latent


def run_requests(model, requests, max_batch: int = 8):
    core = EngineCore({1: model}, Batcher(max_batch, admission_window=0.0))
    for request in requests:
        core.add(request)
    while core.has_work():
        result = core.step()
        assert not result.failed, result.failed
    return [r.run.result for r in requests]


def recorded_evaluations(monkeypatch):
    """Every UNet evaluation the core makes: its inputs."""
    seen = []
    real = core_module.evaluate

    def recording(model, batch):
        seen.append(list(batch))
        return real(model, batch)

    monkeypatch.setattr(core_module, "evaluate", recording)
    return seen


def test_size_conditioning_follows_each_pass(demo_model, monkeypatch):
    seen = recorded_evaluations(monkeypatch)
    p = params(width=96, height=64, steps=2, sampler="euler", hires_fix=HiresFix(scale=1.25, steps=2, denoise=0.5))
    request = engine_request(demo_model, "hires", p)
    core = EngineCore({1: demo_model}, Batcher(8, admission_window=0.0))
    core.add(request)
    core.step()
    assert request.pass_index == 0 and request.time_ids.tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]
    while request.pass_index == 0:
        core.step()
    # 96 x 64 -> latent 12 x 8 -> 15 x 10 (x 1.25) -> 120 x 80 pixels: (height, width) = (80, 120).
    assert request.time_ids.tolist() == [[80.0, 120.0, 0.0, 0.0, 80.0, 120.0]]
    assert request.run.pending[0].shape == (1, 4, 10, 15)
    while core.has_work():
        core.step()
    sizes = [(tuple(b[0].time_ids.tolist()[0]), tuple(b[0].x.shape)) for b in seen]
    first_pass = ((64.0, 96.0, 0.0, 0.0, 64.0, 96.0), (1, 4, 8, 12))
    second_pass = ((80.0, 120.0, 0.0, 0.0, 80.0, 120.0), (1, 4, 10, 15))
    assert sizes == [first_pass] * 2 + [second_pass] * 2


def test_hires_fix_upscales_pass_one_and_adds_fresh_noise_then_equals_a_two_pass_reference(demo_model, monkeypatch):
    upscaled = []
    real_upscale = core_module.upscale_latent

    def recording(latent, size, method, scaling_factor):
        out = real_upscale(latent, size, method, scaling_factor)
        upscaled.append((latent.clone(), tuple(size), method, out))
        return out

    monkeypatch.setattr(core_module, "upscale_latent", recording)
    p = params(steps=3, hires_fix=HiresFix(scale=1.5, steps=2, denoise=0.5))
    request = engine_request(demo_model, "hires", p)
    core = EngineCore({1: demo_model}, Batcher(8, admission_window=0.0))
    core.add(request)
    while request.pass_index == 0:
        core.step()
    ((first, size, method, engine_upscaled),) = upscaled
    assert (size, method) == ((12, 12), "nearest-exact")
    sf = demo_model.vae.config.scaling_factor
    assert torch.equal(engine_upscaled, F.interpolate(first / sf, size=(12, 12), mode="nearest-exact") * sf)
    sigmas2 = tail(demo_model, p, 2, 0.5)  # int(2 / 0.5) = 4: the last 3 sigmas of a 4-step schedule
    fresh = seeded_noise(p.seed, (1, 4, 12, 12))
    # The second pass's first x: the upscaled latent plus fresh noise at the new shape times
    # sigma0 (one product and one sum, in either order: the same float32 value).
    assert torch.equal(request.run.pending[0], engine_upscaled + fresh * float(sigmas2[0]))
    assert request.run.pending[1] == float(sigmas2[0])
    reused = F.interpolate(seeded_noise(p.seed, (1, 4, 8, 8)), size=(12, 12), mode="nearest-exact")
    assert max_diff(request.run.pending[0], engine_upscaled + reused * float(sigmas2[0])) > 0.1  # teeth
    while core.has_work():
        core.step()
    engine_final = request.run.result

    # The two-pass reference: pass 1 text-to-image at 64 x 64, pass 2 from its latent upscaled.
    texts = conditioning(demo_model)
    sigmas1 = get_sigmas(p.scheduler, 3, p.sampler)
    x1 = start(demo_model, torch.zeros(1, 4, 8, 8), seeded_noise(p.seed, (1, 4, 8, 8)), float(sigmas1[0]))
    pass1 = sample(p.sampler, Denoiser(demo_model, texts, 64, 64), x1, sigmas1, cfg_scale=p.cfg_scale, seed=p.seed)
    # What the engine upscaled was its first pass's final latent.
    assert max_diff(first, pass1) <= chain_tolerance(demo_model, max_abs(pass1), 3)

    def second(method):
        up = F.interpolate(pass1 / sf, size=(12, 12), mode=method) * sf
        denoiser = Denoiser(demo_model, texts, 96, 96)
        return sample(p.sampler, denoiser, up + fresh * float(sigmas2[0]), sigmas2, cfg_scale=p.cfg_scale, seed=p.seed)

    expected = second("nearest-exact")
    bound = chain_tolerance(demo_model, max_abs(expected), 3 + 2, positions=12 * 12)
    assert max_diff(engine_final, expected) <= bound
    # Teeth: a bilinear upscale in between is another image.
    assert max_diff(engine_final, second("bilinear")) > 100 * bound


def test_img2img_inpaint_hires_and_plain_requests_are_the_same_alone_and_batched(demo_model):
    picture = png(picture_pixels(64, 64, seed=4))
    mask = png(mask_pixels(64, 64))
    requests = {
        "img2img": params(init_image=picture, denoise=0.5, seed=21, sampler="euler_ancestral"),
        "inpaint": params(init_image=picture, mask=mask, denoise=0.8, seed=22, sampler="dpmpp_2s_ancestral_cfg_pp",
                          scheduler="normal", cfg_scale=1.5, steps=3),
        "hires": params(seed=23, sampler="euler", scheduler="simple", hires_fix=HiresFix(scale=1.25, steps=2, denoise=0.6)),
        "plain": params(seed=24, sampler="dpm_2", scheduler="beta", steps=3),
    }
    shared = {}

    def fresh(name, p):
        request, shared[name] = with_picture(demo_model, name, p, shared.get(name))
        return request

    alone = {}
    for name, p in requests.items():
        request = fresh(name, p)
        (alone[name],) = run_requests(demo_model, [request])
        assert max(request.times.batch_sizes) == 1
    together = [fresh(name, p) for name, p in requests.items()]
    results = dict(zip(requests, run_requests(demo_model, together)))
    for request in together:
        # Every request's first evaluations shared a forward with all four.
        assert request.times.batch_sizes[0] == 4, (request.request_id, request.times.batch_sizes)
    hires = together[2]
    assert hires.times.batch_sizes[-2:] == [1, 1]  # its second pass, alone in the 80 x 80 bucket
    for request in together:
        name = request.request_id
        positions = 10 * 10 if name == "hires" else TOKENS
        bound = chain_tolerance(demo_model, max_abs(alone[name]), request.times.evaluations, positions=positions)
        if name != "hires":
            evaluations = request.times.evaluations
            assert bound == unet_tolerance(demo_model, max_abs(alone[name]), evaluations=evaluations, text=True)
        assert results[name].shape == alone[name].shape
        assert max_diff(results[name], alone[name]) <= bound, name
        images_alone, images_together = decode_latents(demo_model, alone[name]), decode_latents(demo_model, results[name])
        assert np.abs(images_alone[0].astype(int) - images_together[0].astype(int)).max() <= 2, name
    assert results["hires"].shape == (1, 4, 10, 10)
    # Teeth: the inpainting request with another seed lands far outside its bound.
    other = fresh("inpaint", GenerateRequest(**{**requests["inpaint"].__dict__, "seed": 99}))
    (other_seed,) = run_requests(demo_model, [other])
    bound = unet_tolerance(demo_model, max_abs(alone["inpaint"]), evaluations=other.times.evaluations, text=True)
    assert max_diff(other_seed, alone["inpaint"]) > 100 * bound


@pytest.mark.parametrize("with_mask", [False, True])
def test_two_images_from_one_picture_repeat_its_latent_with_one_noise_draw(demo_model, with_mask):
    picture = png(picture_pixels(64, 64, seed=5))
    p = params(init_image=picture, mask=png(mask_pixels(64, 64)) if with_mask else b"", denoise=0.6, num_images=2)
    request, latent = with_picture(demo_model, "two", p)
    EngineCore._start_sampling(demo_model, request)
    sigma0 = float(tail(demo_model, p, p.steps, p.denoise)[0])
    noise = seeded_noise(p.seed, (2, 4, 8, 8))  # one draw for both images
    x = request.run.pending[0]
    assert x.shape == (2, 4, 8, 8)
    if with_mask:
        # The model is shown the blend of x and the latent noised to sigma0, which is x itself
        # (x = latent + noise * sigma0), up to the blend's five roundings.
        bound = elementwise_bound(eps=EPS32, magnitude=max_abs(latent) + max_abs(noise) * sigma0, operations=5)
        assert max_diff(x, latent.expand(2, 4, 8, 8) + noise * sigma0) <= bound
    else:
        assert torch.equal(x, latent.expand(2, 4, 8, 8) + noise * sigma0)
    # Teeth: one draw per image (each of shape [1, 4, 8, 8] from the seed) would repeat the noise.
    per_image = seeded_noise(p.seed, (1, 4, 8, 8)).expand(2, 4, 8, 8)
    assert max_diff(x, latent.expand(2, 4, 8, 8) + per_image * sigma0) > 0.1
    if with_mask:
        mask = request.run.mask
        assert torch.equal(mask.noise, noise) and torch.equal(mask.latent, latent.expand(2, 4, 8, 8))
        assert mask.mask.shape == (2, 4, 8, 8) and torch.equal(mask.mask[0], mask.mask[1])
    # Run to the end: both images come out, and they differ (their noise does).
    core = EngineCore({1: demo_model}, Batcher(8, admission_window=0.0))
    request, _ = with_picture(demo_model, "two", p, latent)
    core.add(request)
    while core.has_work():
        core.step()
    assert request.run.result.shape == (2, 4, 8, 8) and max_diff(request.run.result[0], request.run.result[1]) > 0.1
