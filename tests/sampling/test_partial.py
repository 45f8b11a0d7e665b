"""Runs that start from a latent image, on tensors: each rule of docs/image-to-image.md that
sampling/partial.py, sampling/noise.py, passes.py and engine/latents.py implement.

- the denoise tail (section 3): the last steps + 1 sigmas of the schedule for int(steps / denoise)
  steps, written here from compute_sigmas and the scheduler functions;
- the start (section 3): latent + noise * sigma0, or sqrt(1 + sigma0^2) at sigma_max;
- the latent noise mask (section 5): its resize and both blends, then whole inpainting runs of
  every sampler against k-diffusion (and the CFG++ transcriptions) given ComfyUI's
  KSamplerX0Inpaint blends, with injected noise, on the toy denoiser;
- hires fix sizes and the latent upscale (section 4).
Every comparison is shown once to fail on a deliberately wrong variant."""

import math

import pytest
import torch
import torch.nn.functional as F

from t2i.domain import UPSCALE_METHODS, GenerateRequest, HiresFix
from t2i.engine.latents import upscale_latent
from t2i.passes import hires_size, plan
from t2i.sampling import (
    SAMPLER_NAMES, SCHEDULER_NAMES, AncestralNoise, SamplingRun, SigmaTable, compute_sigmas, starting_latent,
)
from t2i.sampling.partial import LatentMask, partial_sigmas, resize_mask
from t2i.sampling.schedulers import SCHEDULERS

from ..support.tolerance import EPS32, EPS64, elementwise_bound, max_abs, max_diff
from .kdiffusion_oracle import SAMPLER_FUNCTIONS, run_kdiffusion
from .spec_cfg_pp import SPEC_CFG_PP
from .toy import OPERATIONS_PER_STEP, as_column, nonlinear_pair

TABLE = SigmaTable.sdxl()
assert set(SAMPLER_FUNCTIONS) | set(SPEC_CFG_PP) == set(SAMPLER_NAMES)
SEED = 2024
SCALING_FACTOR = 0.13025  # SDXL's VAE


def noise_source(like: torch.Tensor):
    return AncestralNoise(SEED, like)


def reference_tail(scheduler: str, steps: int, denoise: float, sampler: str | None) -> torch.Tensor:
    """KSampler's denoise, written out: the schedule for int(steps / denoise) steps (truncated),
    its last steps + 1 sigmas."""
    total = math.trunc(steps / denoise)
    return compute_sigmas(TABLE, scheduler, total, sampler)[-(steps + 1):]


# --- the denoise tail -----------------------------------------------------------------------

# (steps, denoise): the document's example, truncations that rounding would change (7 / 0.55 =
# 12.7 -> 12, 4 / 0.3 = 13.3 -> 13), a tiny denoise and the largest one still partial.
PAIRS = [(6, 0.6), (7, 0.55), (4, 0.3), (5, 0.45), (10, 0.8), (2, 0.05), (3, 0.9999)]


@pytest.mark.parametrize("sampler", [None, "euler", "dpmpp_2s_ancestral", "dpm_2", "dpm_2_ancestral"])
@pytest.mark.parametrize("steps,denoise", PAIRS)
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_a_partial_denoise_runs_the_tail_of_the_longer_schedule(scheduler, steps, denoise, sampler):
    sigmas = partial_sigmas(TABLE, scheduler, steps, sampler, denoise)
    assert torch.equal(sigmas, reference_tail(scheduler, steps, denoise, sampler))
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0 and sigmas.dtype == torch.float32
    run = SamplingRun(sampler or "euler", torch.zeros(1, 4, 2, 2), sigmas, 5.0, noise_source(torch.zeros(1, 4, 2, 2)))
    assert run.total_steps == steps


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_the_documented_example_and_truncation_not_rounding(scheduler):
    # steps 6, denoise 0.6: total 10, sigmas 4..10 of the 10-step schedule.
    ten = compute_sigmas(TABLE, scheduler, 10, "euler")
    assert torch.equal(partial_sigmas(TABLE, scheduler, 6, "euler", 0.6), ten[4:11])
    # 7 / 0.55 = 12.7: a 12-step schedule; a rounded 13 would be another tail.
    assert torch.equal(partial_sigmas(TABLE, scheduler, 7, "euler", 0.55), compute_sigmas(TABLE, scheduler, 12)[-8:])
    assert not torch.equal(partial_sigmas(TABLE, scheduler, 7, "euler", 0.55), compute_sigmas(TABLE, scheduler, 13)[-8:])
    # A tail starts below the top of the schedule: the start is not the sigma_max case.
    assert partial_sigmas(TABLE, scheduler, 6, "euler", 0.6)[0] < TABLE.sigma_max * (1 - 1e-5)


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_ancestral"])
@pytest.mark.parametrize("steps,denoise", [(6, 0.6), (4, 0.3), (5, 0.45)])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_dpm_2s_extra_step_applies_to_the_full_schedule_before_the_tail(scheduler, steps, denoise, sampler):
    """The full schedule is made for total + 1 steps and its last non-zero sigma dropped (the
    scheduler functions themselves, not compute_sigmas' handling of it), then the tail taken."""
    total = math.trunc(steps / denoise)
    longer = SCHEDULERS[scheduler](TABLE, total + 1)
    expected = torch.cat([longer[:-2], longer[-1:]])[-(steps + 1):]
    sigmas = partial_sigmas(TABLE, scheduler, steps, sampler, denoise)
    assert torch.equal(sigmas, expected)
    # Teeth: without the extra step (any other sampler) the tail is another one.
    assert not torch.equal(sigmas, partial_sigmas(TABLE, scheduler, steps, "euler", denoise))


@pytest.mark.parametrize("denoise", [1.0, 0.99995, 0.99991])
@pytest.mark.parametrize("sampler", ["euler", "dpm_2"])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_a_denoise_above_0_9999_is_the_full_schedule(scheduler, sampler, denoise):
    for steps in (1, 6, 13):
        full = compute_sigmas(TABLE, scheduler, steps, sampler)
        assert torch.equal(partial_sigmas(TABLE, scheduler, steps, sampler, denoise), full)


def test_where_a_scheduler_changes_the_step_count():
    """ddim_uniform can give one step more and beta fewer (duplicate timesteps dropped): at full
    denoise the run has the schedule's count; a tail (denoise <= 0.9999) is cut to steps + 1
    sigmas, so it has `steps` steps whenever the longer schedule has that many."""

    def steps_of(sigmas):
        return SamplingRun("euler", torch.zeros(1, 4, 2, 2), sigmas, 5.0, noise_source(torch.zeros(1, 4, 2, 2))).total_steps

    # ddim_uniform, 6 steps: stride 1000 // 6 = 166 gives timesteps 1, 167, ..., 831: 7 steps.
    assert steps_of(partial_sigmas(TABLE, "ddim_uniform", 6, "euler", 1.0)) == 7
    # denoise 0.9999 is not above 0.9999: int(6 / 0.9999) = 6, the same 7-step schedule, its last 7 sigmas.
    tail = partial_sigmas(TABLE, "ddim_uniform", 6, "euler", 0.9999)
    assert steps_of(tail) == 6 and torch.equal(tail, compute_sigmas(TABLE, "ddim_uniform", 6)[1:])
    assert steps_of(partial_sigmas(TABLE, "ddim_uniform", 6, "euler", 0.5)) == 6
    # beta, 140 steps: two quantiles round to one timestep, so 139 steps at full denoise...
    assert steps_of(partial_sigmas(TABLE, "beta", 140, "euler", 1.0)) == 139
    # ...and at 0.9999 too (int(140 / 0.9999) = 140: the tail is the whole, shorter schedule).
    assert steps_of(partial_sigmas(TABLE, "beta", 140, "euler", 0.9999)) == 139
    # A longer schedule has enough sigmas: 140 steps again.
    assert steps_of(partial_sigmas(TABLE, "beta", 140, "euler", 0.9)) == 140


# --- the start ------------------------------------------------------------------------------


def test_the_start_is_latent_plus_noise_times_sigma0_below_sigma_max():
    generator = torch.Generator().manual_seed(1)
    noise, latent = torch.randn(2, 4, 3, 5, generator=generator), torch.randn(2, 4, 3, 5, generator=generator)
    sigma_max = TABLE.sigma_max
    # Both sides round the same product and sum (addition commutes exactly in IEEE arithmetic).
    for s0 in (0.5, 3.0, sigma_max * (1 - 2e-5)):  # below, and just outside the 1e-5 tolerance
        assert torch.equal(starting_latent(noise, s0, sigma_max, latent), latent + noise * s0)
    for s0 in (sigma_max, sigma_max * (1 - 0.9e-5), sigma_max * (1 + 0.9e-5), sigma_max * 2):
        assert torch.equal(starting_latent(noise, s0, sigma_max, latent), latent + noise * math.sqrt(1 + s0 * s0))
    # Teeth: the two forms differ by far more than a rounding (sqrt(1 + 3^2) = 3.16 against 3).
    assert max_diff(starting_latent(noise, 3.0, sigma_max, latent), latent + noise * math.sqrt(10)) > 0.1
    # Text-to-image (no latent) is the same rule on zeros.
    assert torch.equal(starting_latent(noise, 3.0, sigma_max), noise * 3.0)


# --- the mask -------------------------------------------------------------------------------


def gradient_mask(height: int, width: int) -> torch.Tensor:
    """A smooth (H, W) mask with intermediate values, so that resampling errors show."""
    ys = torch.linspace(0, 1, height).view(-1, 1)
    xs = torch.linspace(0, 1, width).view(1, -1)
    return (0.5 + 0.5 * torch.sin(6 * xs + 4 * ys)).clamp(0, 1).float()


def test_the_mask_is_resized_bilinearly_from_its_full_size_and_repeated():
    mask = gradient_mask(66, 70)  # a 70 x 66 picture's mask: never cropped
    latent = torch.zeros(3, 4, 8, 12)
    expected = F.interpolate(mask[None, None], size=(8, 12), mode="bilinear").repeat(3, 4, 1, 1)
    resized = resize_mask(mask, latent)
    assert resized.shape == (3, 4, 8, 12) and torch.equal(resized, expected)
    # Teeth: from the cropped mask, with corners aligned, or antialiased, it is another mask.
    for wrong in (
        F.interpolate(mask[1:65, 3:67][None, None], size=(8, 12), mode="bilinear"),
        F.interpolate(mask[None, None], size=(8, 12), mode="bilinear", align_corners=True),
        F.interpolate(mask[None, None], size=(8, 12), mode="bilinear", antialias=True),
    ):
        assert max_diff(resized, wrong.repeat(3, 4, 1, 1)) > 1e-2


def blend_parts(shape=(2, 4, 5, 6), dtype=torch.float32):
    generator = torch.Generator().manual_seed(3)
    x, latent, noise, x0 = (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(4))
    mask = torch.rand(shape, generator=generator, dtype=dtype)
    mask[..., 0] = 0.0
    mask[..., 1] = 1.0
    return x * 4, latent, noise, x0, mask


def test_both_blends_follow_the_formulas():
    x, latent, noise, x0, m = blend_parts()
    blend = LatentMask(m, latent, noise)
    sigma = 2.75
    # Five roundings (noise * sigma, + latent, * (1 - m), x * m, +) of values no larger than
    # |x| + |latent| + |noise| sigma, in whatever order: elementwise_bound.
    magnitude = max_abs(x) + max_abs(latent) + max_abs(noise) * sigma
    shown = blend.model_input(x, sigma)
    input_bound = elementwise_bound(eps=EPS32, magnitude=magnitude, operations=6)
    assert max_diff(shown, x * m + (latent + noise * sigma) * (1 - m)) <= input_bound
    predicted = blend.prediction(x0)
    bound = elementwise_bound(eps=EPS32, magnitude=max_abs(x0) + max_abs(latent), operations=4)
    assert max_diff(predicted, x0 * m + latent * (1 - m)) <= bound
    # Where the mask is 1 the model sees x itself and predicts x0; where 0, the noised latent and the latent.
    assert torch.equal(shown[..., 1], x[..., 1]) and torch.equal(predicted[..., 1], x0[..., 1])
    assert torch.equal(predicted[..., 0], latent[..., 0])
    # Teeth: the text-to-image start scale sqrt(1 + sigma^2) in the input blend is far off.
    wrong = x * m + (latent + noise * math.sqrt(1 + sigma**2)) * (1 - m)
    assert max_diff(shown, wrong) > 100 * input_bound


def toy_inputs(shape=(1, 4, 6, 6), dtype=torch.float64):
    generator = torch.Generator().manual_seed(11)
    latent = torch.randn(shape, generator=generator, dtype=dtype) * 0.8 + 0.2
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    mask = resize_mask(gradient_mask(48, 48), latent)
    return latent, noise, mask


def drive(run: SamplingRun, pair=nonlinear_pair, on_pending=None):
    while run.pending is not None:
        x, sigma = run.pending
        if on_pending is not None:
            on_pending(x, sigma)
        run.advance(*pair(x, sigma))
    return run.result


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_the_model_is_shown_the_blended_x_at_every_evaluation(sampler):
    """A hand-written masked loop beside the run: at every evaluation the run's pending x is the
    formula applied to this loop's own x, and the results agree."""
    latent, noise, mask = toy_inputs()
    cfg = 5.0
    sigmas = partial_sigmas(TABLE, "karras", 6, sampler, 0.6).tolist()
    x = latent + noise * sigmas[0]
    run = SamplingRun(sampler, x.clone(), sigmas, cfg, noise_source(x), mask=LatentMask(mask, latent, noise))
    generator = torch.Generator().manual_seed(SEED)  # the ancestral draws, as AncestralNoise makes them
    # Per step: the blends (8 roundings), the toy pair (24) and the update (8), on values no
    # larger than |latent| + |noise| sigma0 plus the ancestral noise added (4 sigma0 covers it).
    magnitude = max_abs(latent) + 5 * max_abs(noise) * sigmas[0]
    bound = elementwise_bound(eps=EPS64, magnitude=magnitude, operations=len(sigmas) * 40)
    shown_ok = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        shown = x * mask + (latent + noise * s) * (1 - mask)
        pending_x, pending_sigma = run.pending
        assert pending_sigma == s
        assert max_diff(pending_x, shown) <= bound
        shown_ok.append(max_diff(pending_x, x) > 100 * bound)  # not the unblended x
        cond, uncond = nonlinear_pair(shown, s)
        run.advance(cond, uncond)
        x0 = (uncond + cfg * (cond - uncond)) * mask + latent * (1 - mask)
        if sampler == "euler":
            x = x + (x - x0) / s * (s_next - s)
        else:
            up = min(s_next, math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)) if s_next else 0.0
            down = math.sqrt(s_next**2 - up**2)
            if down == 0:
                x = x0
            else:
                x = x + (x - x0) / s * (down - s) + torch.randn(x.shape, generator=generator, dtype=x.dtype) * up
    assert run.done and max_diff(run.result, x) <= bound
    # Teeth: from the second evaluation on, the blend moves x by far more than the bound (at the
    # first, x is latent + noise * sigma0 itself, which the blend leaves as it is).
    assert all(shown_ok[1:])


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_a_mask_of_ones_is_the_unmasked_run_exactly(sampler):
    latent, noise, _ = toy_inputs()
    sigmas = partial_sigmas(TABLE, "normal", 5, sampler, 0.7)
    x = latent + noise * float(sigmas[0])
    ones = torch.ones_like(latent)
    masked = drive(SamplingRun(sampler, x.clone(), sigmas, 4.0, noise_source(x), mask=LatentMask(ones, latent, noise)))
    plain = drive(SamplingRun(sampler, x.clone(), sigmas, 4.0, noise_source(x)))
    # x * 1 + anything * 0 is x exactly in IEEE arithmetic (finite values): the same run.
    assert torch.equal(masked, plain)
    # Teeth: a mask just under 1 is another run.
    almost = drive(SamplingRun(sampler, x.clone(), sigmas, 4.0, noise_source(x), mask=LatentMask(ones * 0.9, latent, noise)))
    assert max_diff(almost, plain) > 1e-3


# The samplers whose last step returns the guided prediction itself (a step to sigma 0 with
# down = 0): with a mask of zeros that is the latent, bit for bit.
RETURN_THE_PREDICTION = {"euler_ancestral", "euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp"}


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_a_mask_of_zeros_returns_the_latent_image(sampler):
    latent, noise, _ = (t.float() for t in toy_inputs())
    zeros = torch.zeros_like(latent)
    steps = 6
    sigmas = partial_sigmas(TABLE, "karras", steps, sampler, 0.6)
    x = latent + noise * float(sigmas[0])
    seen = []
    result = drive(SamplingRun(sampler, x.clone(), sigmas, 6.0, noise_source(x), mask=LatentMask(zeros, latent, noise)),
                   on_pending=lambda x_in, s: seen.append(max_diff(x_in, latent + noise * s)))
    assert max(seen) == 0.0  # the model only ever sees the latent noised to sigma
    if sampler in RETURN_THE_PREDICTION:
        assert torch.equal(result, latent)
    elif sampler == "euler":
        # Each prediction is the latent L exactly, so euler's step is x' = x + (x - L) / s * (s' - s),
        # i.e. x' - L = (x - L) * s' / s: an earlier rounding is carried on scaled by s' / s <= 1
        # and each step adds its own roundings (the blends, which give L exactly, then x - L, / s,
        # s' - s, *, +: at most 8 of values no larger than |L| + |noise| s0). The last step
        # (s' = 0) leaves L plus those roundings.
        magnitude = max_abs(latent) + max_abs(noise) * float(sigmas[0])
        bound = elementwise_bound(eps=EPS32, magnitude=magnitude, operations=steps * 8)
        assert max_diff(result, latent) <= bound
        # Teeth: a mask of one half re-draws half of it, far from the latent.
        half_mask = LatentMask(zeros + 0.5, latent, noise)
        half = drive(SamplingRun(sampler, x.clone(), sigmas, 6.0, noise_source(x), mask=half_mask))
        assert max_diff(half, latent) > 1000 * bound
    else:
        # The same argument as euler's, with the midpoints and the ancestral noise: the end is
        # the latent up to the roundings of values a few sigma0 large.
        magnitude = max_abs(latent) + 5 * max_abs(noise) * float(sigmas[0])
        assert max_diff(result, latent) <= elementwise_bound(eps=EPS32, magnitude=magnitude, operations=steps * 16)


# --- inpainting parity with k-diffusion -----------------------------------------------------


def inpaint_oracle(name, x, sigmas, cfg, latent, noise, mask, input_blend=True, output_blend=True):
    """k-diffusion's sampler (or the CFG++ transcription) around ComfyUI's KSamplerX0Inpaint:
    the model is shown x * m + (latent + noise * sigma) * (1 - m), and its guided x0 is
    blended as x0 * m + latent * (1 - m). The CFG++ samplers use the unconditional prediction
    as the model gave it (at the blended input), unblended."""

    def shown(x_in, sigma):
        return x_in * mask + (latent + noise * as_column(sigma, x_in)) * (1 - mask) if input_blend else x_in

    def blended(x0):
        return x0 * mask + latent * (1 - mask) if output_blend else x0

    if name in SPEC_CFG_PP:
        return SPEC_CFG_PP[name](
            lambda x_in, s: nonlinear_pair(shown(x_in, s), s), x, sigmas,
            lambda x_in, s, c, u: blended(u + cfg * (c - u)), SEED,
        )
    def model(x_in, sigma):
        cond, uncond = nonlinear_pair(shown(x_in, sigma), sigma)
        return blended(uncond + cfg * (cond - uncond))

    return run_kdiffusion(name, model, x, sigmas, SEED)


def inpaint_tolerance(latent, noise, sigmas) -> float:
    """toy.sampler_tolerance's bound (float64, OPERATIONS_PER_STEP per step) plus the blends:
    per evaluation 5 roundings in and 3 out, two evaluations a step; on values no larger than
    |latent| + |noise| sigma0 (the start), the scale sampler_tolerance takes from x."""
    steps = len(sigmas) - 1
    magnitude = max_abs(latent) + max_abs(noise) * float(sigmas[0])
    return elementwise_bound(eps=EPS64, magnitude=magnitude, operations=steps * (OPERATIONS_PER_STEP + 16))


def ours_inpainting(name, x, sigmas, cfg, latent, noise, mask):
    run = SamplingRun(name, x.clone(), sigmas, cfg, noise_source(x), mask=LatentMask(mask, latent, noise))
    return drive(run)


@pytest.mark.parametrize("denoise", [0.6, 1.0])
@pytest.mark.parametrize("scheduler", ["karras", "normal"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_inpainting_matches_kdiffusion_with_comfyuis_blends(name, scheduler, denoise):
    latent, noise, mask = toy_inputs()
    sigmas = partial_sigmas(TABLE, scheduler, 8, name, denoise).to(torch.float64)
    x = starting_latent(noise, float(sigmas[0]), TABLE.sigma_max, latent)
    cfg = 5.5
    mine = ours_inpainting(name, x, sigmas, cfg, latent, noise, mask)
    oracle = inpaint_oracle(name, x.clone(), sigmas, cfg, latent, noise, mask)
    assert mine.dtype == torch.float64 and torch.isfinite(mine).all()
    assert max_diff(mine, oracle) <= inpaint_tolerance(latent, noise, sigmas)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2", "euler_ancestral_cfg_pp"])
def test_the_parity_fails_without_either_blend(name):
    latent, noise, mask = toy_inputs()
    sigmas = partial_sigmas(TABLE, "karras", 8, name, 0.6).to(torch.float64)
    x = latent + noise * float(sigmas[0])
    mine = ours_inpainting(name, x, sigmas, 5.5, latent, noise, mask)
    bound = inpaint_tolerance(latent, noise, sigmas)
    assert max_diff(mine, inpaint_oracle(name, x.clone(), sigmas, 5.5, latent, noise, mask)) <= bound
    no_input = inpaint_oracle(name, x.clone(), sigmas, 5.5, latent, noise, mask, input_blend=False)
    no_output = inpaint_oracle(name, x.clone(), sigmas, 5.5, latent, noise, mask, output_blend=False)
    assert max_diff(mine, no_input) > 100 * bound
    assert max_diff(mine, no_output) > 100 * bound


# --- hires fix: sizes and the latent upscale -------------------------------------------------


@pytest.mark.parametrize("side,scale,expected", [
    (1000, 1.5, 1504),  # 125 * 1.5 = 187.5 -> 188 (half to even, up)
    (1000, 1.3, 1296),  # 162.5 -> 162 (half to even, down; floor(x + 0.5) would give 1304)
    (1000, 2.5, 2496),  # 312.5 -> 312
    (1000, 1.1, 1104),  # 137.5 -> 138
    (88, 1.5, 128),  # 16.5 -> 16
    (72, 1.5, 112),  # 13.5 -> 14
    (64, 1.1, 72),  # 8.8 -> 9
    (832, 1.25, 1040),  # 130 exactly
    (1024, 1.5, 1536),
])
def test_hires_size_rounds_latent_sides_half_to_even(side, scale, expected):
    assert hires_size(side, 64, scale)[0] == expected
    assert hires_size(64, side, scale)[1] == expected


def test_the_plans_second_pass_is_at_the_hires_size():
    hires = HiresFix(scale=1.5, steps=4, denoise=0.4)
    request = GenerateRequest(prompt="p", width=1000, height=88, steps=9, hires_fix=hires)
    first, second = plan(request).passes
    assert (first.width, first.height, first.steps, first.denoise, first.upscale) == (1000, 88, 9, 1.0, None)
    assert (second.width, second.height, second.steps, second.denoise) == (1504, 128, 4, 0.4)
    assert second.upscale == "nearest-exact"
    assert plan(request).output_size == (1504, 128)
    defaulted = plan(GenerateRequest(prompt="p", width=64, height=64, steps=9, hires_fix=HiresFix(scale=2))).passes[1]
    assert (defaulted.steps, defaulted.denoise) == (9, 0.5)


@pytest.mark.parametrize("method", UPSCALE_METHODS)
def test_upscale_latent_interpolates_in_the_vaes_space(method):
    latent = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(5)) * 3
    size = (12, 18)
    # The same three float32 operations in the same order (divide, interpolate, multiply).
    expected = F.interpolate(latent / SCALING_FACTOR, size=size, mode=method) * SCALING_FACTOR
    upscaled = upscale_latent(latent, size, method, SCALING_FACTOR)
    assert upscaled.shape == (2, 4, 12, 18) and torch.equal(upscaled, expected)
    # Teeth: every other method gives another latent.
    for other in UPSCALE_METHODS:
        if other != method:
            assert max_diff(upscaled, F.interpolate(latent / SCALING_FACTOR, size=size, mode=other) * SCALING_FACTOR) > 1e-2
    if method in ("bilinear", "bicubic"):
        aligned = F.interpolate(latent / SCALING_FACTOR, size=size, mode=method, align_corners=True) * SCALING_FACTOR
        assert max_diff(upscaled, aligned) > 1e-2
