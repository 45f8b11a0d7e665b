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
