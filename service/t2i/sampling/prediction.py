"""What a model's output means, and how it becomes the x0-prediction the samplers want.

A discrete SDXL UNet sees its input scaled to unit variance, `x / sqrt(sigma^2 + 1)`, and the
integer timestep of sigma (SigmaTable.timestep), whatever it predicts. Its output is then read
by the model's prediction kind (docs/sampling.md, "The denoiser"):

- epsilon: the noise,        x0 = x - sigma * eps
- v_prediction: the velocity  v = alpha * eps - sigma_vp * x0 of Salimans and Ho (2022), with
  sigma_data = 1:            x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)

`sigma` may be a Python float or a tensor that broadcasts against x (one value per row).
"""

from __future__ import annotations

import math

from torch import Tensor

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
PREDICTION_TYPES = (EPSILON, V_PREDICTION)
# The data's standard deviation the v-parameterisation assumes: SDXL latents are scaled to 1.
SIGMA_DATA = 1.0


def _sqrt(value: float | Tensor) -> float | Tensor:
    return math.sqrt(value) if isinstance(value, (int, float)) else value.sqrt()


def input_scale(sigma: float | Tensor) -> float | Tensor:
    """The factor that brings a latent at noise level sigma to unit variance for the UNet."""
    return 1.0 / _sqrt(sigma * sigma + SIGMA_DATA**2)


def to_x0(prediction: str, x: Tensor, sigma: float | Tensor, output: Tensor) -> Tensor:
    """The x0-prediction of a model of kind `prediction` whose UNet answered `output` at (x, sigma)."""
    if prediction == EPSILON:
        return x - sigma * output
    if prediction == V_PREDICTION:
        variance = sigma * sigma + SIGMA_DATA**2
        return x * (SIGMA_DATA**2 / variance) - output * (sigma * SIGMA_DATA / _sqrt(variance))
    raise ValueError(f"unknown prediction type {prediction!r}; known: {', '.join(PREDICTION_TYPES)}")
