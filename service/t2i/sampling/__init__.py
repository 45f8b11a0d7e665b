"""Sampling core: KSampler-compatible schedulers and samplers (docs/sampling.md).

Pure PyTorch: no gRPC, no diffusers. The engine drives `SamplingRun`s; scripts and tests use
`get_sigmas` and `sample`.
"""

from .names import SAMPLER_NAMES, SCHEDULER_NAMES, UnknownNameError
from .noise import AncestralNoise, initial_noise, latent_shape, resolve_seed, starting_latent
from .run import SamplingRun
from .samplers import count_evaluations, guide
from .sampling import get_sigmas, sample
from .schedulers import compute_sigmas
from .sigma_table import SigmaTable, scaled_linear_betas

__all__ = [
    "SAMPLER_NAMES",
    "SCHEDULER_NAMES",
    "AncestralNoise",
    "SamplingRun",
    "SigmaTable",
    "UnknownNameError",
    "compute_sigmas",
    "count_evaluations",
    "get_sigmas",
    "guide",
    "initial_noise",
    "latent_shape",
    "resolve_seed",
    "sample",
    "scaled_linear_betas",
    "starting_latent",
]
