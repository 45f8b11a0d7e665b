"""The eight KSampler samplers as resumable programs, one model evaluation at a time.

A sampler here is a generator function::

    program = SAMPLERS[name](x, sigmas, guidance, noise)
    x, sigma = next(program)                  # "evaluate the model at (x, sigma)"
    x, sigma = program.send((cond, uncond))   # x0-predictions for prompt and negative prompt
    ...                                       # StopIteration.value is the final latent

It never calls a model itself. That is what lets the serving engine put requests at different
steps, with different samplers, schedules and guidance, into one batched UNet forward: it
collects every request's pending (x, sigma), runs one forward, and sends each its own pair.

`guidance(x, sigma, cond, uncond)` (guidance.py) turns the pair evaluated at (x, sigma) into the
guided x0-prediction: plain cfg, or RescaleCFG. The CFG++ samplers also use `uncond` on its own,
as it came from the model: RescaleCFG changes only the guided prediction (docs/sampling.md).

`noise()` returns the request's next ancestral noise draw; it is injected so that each request
owns its generator and the result never depends on who shared the batch. Sigmas arrive as
Python floats; the tensor arithmetic runs in x's dtype. Formulas: docs/sampling.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence

from torch import Tensor

from .guidance import Guidance
from .names import SAMPLER_NAMES

Evaluation = tuple[Tensor, float]
Prediction = tuple[Tensor, Tensor]
Program = Generator[Evaluation, Prediction, Tensor]
NoiseSource = Callable[[], Tensor]
Sampler = Callable[[Tensor, Sequence[float], Guidance, NoiseSource], Program]


# --- helpers -------------------------------------------------------------------------------

def steps(sigmas: Sequence[float]) -> zip:
    """(sigma_i, sigma_i+1) for every step of the run."""
    return zip(sigmas[:-1], sigmas[1:])


def to_derivative(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """dx/dsigma of the probability-flow ODE given an x0-prediction."""
    return (x - denoised) / sigma


def ancestral_split(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """(down, up) for eta = 1: step deterministically to `down`, then add noise of std `up`."""
    if sigma_to == 0:
        return 0.0, 0.0
    up = min(sigma_to, math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    down = math.sqrt(sigma_to**2 - up**2)
    return down, up


def log_midpoint(a: float, b: float) -> float:
    """The geometric mean of two sigmas: the midpoint in log-sigma."""
    return math.exp((math.log(a) + math.log(b)) / 2)


# --- first-order ---------------------------------------------------------------------------

def euler(x: Tensor, sigmas: Sequence[float], guidance: Guidance, noise: NoiseSource) -> Program:
    for sigma, sigma_next in steps(sigmas):
        cond, uncond = yield x, sigma
        denoised = guidance(x, sigma, cond, uncond)
        x = x + to_derivative(x, denoised, sigma) * (sigma_next - sigma)
    return x


def euler_ancestral(x: Tensor, sigmas: Sequence[float], guidance: Guidance, noise: NoiseSource) -> Program:
    for sigma, sigma_next in steps(sigmas):
        cond, uncond = yield x, sigma
        denoised = guidance(x, sigma, cond, uncond)
        down, up = ancestral_split(sigma, sigma_next)
        if down == 0:
            x = denoised
        else:
            x = x + to_derivative(x, denoised, sigma) * (down - sigma) + noise() * up
    return x


def euler_cfg_pp(x: Tensor, sigmas: Sequence[float], guidance: Guidance, noise: NoiseSource) -> Program:
    # CFG++: the guided prediction is the target, but the way back up to the next noise level
    # follows the unconditional estimate.
    for sigma, sigma_next in steps(sigmas):
        cond, uncond = yield x, sigma
        denoised = guidance(x, sigma, cond, uncond)
        if sigma_next == 0:
            x = denoised
        else:
            x = denoised + to_derivative(x, uncond, sigma) * sigma_next
    return x


def euler_ancestral_cfg_pp(x: Tensor, sigmas: Sequence[float], guidance: Guidance, noise: NoiseSource) -> Program:
    for sigma, sigma_next in steps(sigmas):
        cond, uncond = yield x, sigma
        denoised = guidance(x, sigma, cond, uncond)
        if sigma_next == 0:
            x = denoised
        else:
            down, up = ancestral_split(sigma, sigma_next)
            x = denoised + to_derivative(x, uncond, sigma) * down + noise() * up
    return x


# --- two-stage -----------------------------------------------------------------------------

def dpm_2(x: Tensor, sigmas: Sequence[float], guidance: Guidance, noise: NoiseSource) -> Program:
    for sigma, sigma_next in steps(sigmas):
        cond, uncond = yield x, sigma
        d = to_derivative(x, guidance(x, sigma, cond, uncond), sigma)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = log_midpoint(sigma, sigma_next)
            x_mid = x + d * (sigma_mid - sigma)
            cond, uncond = yield x_mid, sigma_mid
            d_mid = to_derivative(x_mid, guidance(x_mid, sigma_mid, cond, uncond), sigma_mid)
            x = x + d_mid * (sigma_next - sigma)
    return x


def dpm_2_ancestral(x: Tensor, sigmas: Sequence[float], guidance: Guidance, noise: NoiseSource) -> Program:
    for sigma, sigma_next in steps(sigmas):
        cond, uncond = yield x, sigma
        d = to_derivative(x, guidance(x, sigma, cond, uncond), sigma)
        down, up = ancestral_split(sigma, sigma_next)
        if down == 0:
            x = x + d * (down - sigma)
        else:
            sigma_mid = math.sqrt(sigma * down)
            x_mid = x + d * (sigma_mid - sigma)
            cond, uncond = yield x_mid, sigma_mid
            d_mid = to_derivative(x_mid, guidance(x_mid, sigma_mid, cond, uncond), sigma_mid)
            x = x + d_mid * (down - sigma) + noise() * up
    return x


def dpmpp_2s_ancestral(x: Tensor, sigmas: Sequence[float], guidance: Guidance, noise: NoiseSource) -> Program:
    for sigma, sigma_next in steps(sigmas):
        cond, uncond = yield x, sigma
        denoised = guidance(x, sigma, cond, uncond)
        down, up = ancestral_split(sigma, sigma_next)
        if down == 0:
            x = x + to_derivative(x, denoised, sigma) * (down - sigma)
        else:
            # DPM-Solver++(2S) in log-sigma time h, with its midpoint at h / 2.
            h = math.log(sigma) - math.log(down)
            sigma_mid = math.sqrt(sigma * down)
            x_mid = x * (sigma_mid / sigma) - denoised * math.expm1(-h / 2)
            cond, uncond = yield x_mid, sigma_mid
            x = x * (down / sigma) - guidance(x_mid, sigma_mid, cond, uncond) * math.expm1(-h)
        if sigma_next > 0:
            x = x + noise() * up
    return x


def dpmpp_2s_ancestral_cfg_pp(x: Tensor, sigmas: Sequence[float], guidance: Guidance, noise: NoiseSource) -> Program:
    for sigma, sigma_next in steps(sigmas):
        cond, uncond = yield x, sigma
        denoised = guidance(x, sigma, cond, uncond)
        down, up = ancestral_split(sigma, sigma_next)
        if down == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(down)
            sigma_mid = math.sqrt(sigma * down)
            x_mid = (x + denoised - uncond) * (sigma_mid / sigma) - denoised * math.expm1(-h / 2)
            cond_mid, uncond_mid = yield x_mid, sigma_mid
            denoised_mid = guidance(x_mid, sigma_mid, cond_mid, uncond_mid)
            # The first evaluation's `denoised` meets the midpoint's uncond here: ComfyUI does
            # exactly this, and parity requires it (docs/sampling.md).
            x = (x + denoised - uncond_mid) * (down / sigma) - denoised_mid * math.expm1(-h)
            if sigma_next > 0:
                x = x + noise() * up
    return x


SAMPLERS: dict[str, Sampler] = {
    "euler": euler,
    "euler_cfg_pp": euler_cfg_pp,
    "euler_ancestral": euler_ancestral,
    "euler_ancestral_cfg_pp": euler_ancestral_cfg_pp,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": dpmpp_2s_ancestral_cfg_pp,
}
assert tuple(SAMPLERS) == SAMPLER_NAMES

# Samplers that evaluate the model twice per step (once at the step's start, once at a
# midpoint), except on the final step to sigma 0, which is a plain Euler step.
TWO_STAGE = frozenset({"dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp"})


def evaluations_per_step(sampler: str, sigmas: Sequence[float]) -> list[int]:
    """Model evaluations of each step: two for the two-stage samplers, except a step to 0."""
    if sampler not in TWO_STAGE:
        return [1] * (len(sigmas) - 1)
    return [2 if sigma_next > 0 else 1 for _, sigma_next in steps(sigmas)]


def count_evaluations(sampler: str, sigmas: Sequence[float]) -> int:
    """How many model evaluations a run makes: what pricing and capacity should count."""
    return sum(evaluations_per_step(sampler, sigmas))
