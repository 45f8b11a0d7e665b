"""Sampling core: KSampler-compatible schedulers and samplers (docs/sampling.md).

Pure PyTorch: no gRPC, no diffusers. The engine drives `SamplingRun`s; scripts and tests use
`get_sigmas` and `sample`.
"""

from .guidance import Guidance, guide, rescale_cfg
from .names import SAMPLER_NAMES, SCHEDULER_NAMES, UnknownNameError
from .noise import AncestralNoise, initial_noise, latent_shape, resolve_seed, starting_latent
from .prediction import EPSILON, PREDICTION_TYPES, V_PREDICTION, input_scale, to_x0
from .run import SamplingRun
from .samplers import count_evaluations
from .sampling import get_sigmas, sample
from .schedulers import compute_sigmas
from .sigma_table import SigmaTable, rescale_zero_terminal_snr, scaled_linear_betas

__all__ = [
    "EPSILON",
    "PREDICTION_TYPES",
    "SAMPLER_NAMES",
    "SCHEDULER_NAMES",
    "V_PREDICTION",
    "AncestralNoise",
    "Guidance",
    "SamplingRun",
    "SigmaTable",
    "UnknownNameError",
    "compute_sigmas",
    "count_evaluations",
    "get_sigmas",
    "guide",
    "initial_noise",
    "input_scale",
    "latent_shape",
    "rescale_cfg",
    "rescale_zero_terminal_snr",
    "resolve_seed",
    "sample",
    "scaled_linear_betas",
    "starting_latent",
    "to_x0",
]
