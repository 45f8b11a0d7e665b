"""Load k-diffusion's sampling.py as an independent oracle, without its heavy package __init__.

k-diffusion (MIT) is installed with --no-deps (see Makefile). Its package __init__ imports
torchvision and training code; sampling.py only needs `utils.append_dims`, so we give it a
stub package whose `utils` provides exactly that. external.py (its model wrappers, the
v-prediction parameterisation among them) needs only sampling and that `utils` too.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

_PACKAGE = "_kdiffusion_oracle"


def _source(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed; `make test` installs it with --no-deps")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"


def load_kdiffusion_sampling() -> types.ModuleType:
    if f"{_PACKAGE}.sampling" in sys.modules:
        return sys.modules[f"{_PACKAGE}.sampling"]
    source = _source("sampling")

    package = types.ModuleType(_PACKAGE)
    package.__path__ = []
    utils = types.ModuleType(f"{_PACKAGE}.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules[_PACKAGE] = package
    sys.modules[f"{_PACKAGE}.utils"] = utils

    module_spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.sampling", source)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    package.sampling = module
    return module


def load_kdiffusion_external() -> types.ModuleType:
    """k-diffusion's external.py: VDenoiser and the discrete-schedule wrappers."""
    if f"{_PACKAGE}.external" in sys.modules:
        return sys.modules[f"{_PACKAGE}.external"]
    load_kdiffusion_sampling()
    module_spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.external", _source("external"))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


# Our sampler names -> k-diffusion's sampling functions. The CFG++ samplers have no k-diffusion
# counterpart (spec_cfg_pp.py transcribes them).
SAMPLER_FUNCTIONS = {
    "euler": "sample_euler",
    "euler_ancestral": "sample_euler_ancestral",
    "dpm_2": "sample_dpm_2",
    "dpm_2_ancestral": "sample_dpm_2_ancestral",
    "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral",
}
DETERMINISTIC = ("euler", "dpm_2")  # they draw no noise


def run_kdiffusion(name: str, model, x, sigmas, seed: int):
    """k-diffusion's sampler for our sampler `name` on `model(x, sigma) -> x0`, its ancestral
    noise drawn in order from a generator seeded with `seed` (as ours draws it)."""
    import torch

    generator = torch.Generator(device=x.device).manual_seed(seed)

    def noise_sampler(sigma, sigma_next):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    kwargs = {} if name in DETERMINISTIC else {"noise_sampler": noise_sampler}
    sampler = getattr(load_kdiffusion_sampling(), SAMPLER_FUNCTIONS[name])
    return sampler(model, x, sigmas, disable=True, **kwargs)
