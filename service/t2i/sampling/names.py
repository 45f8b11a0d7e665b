"""The public sampler and scheduler names (ComfyUI KSampler's), in the documented order."""

from __future__ import annotations

from collections.abc import Collection

SAMPLER_NAMES: tuple[str, ...] = (
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "dpm_2",
    "dpm_2_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
)

SCHEDULER_NAMES: tuple[str, ...] = (
    "normal",
    "karras",
    "exponential",
    "sgm_uniform",
    "simple",
    "ddim_uniform",
    "beta",
)


class UnknownNameError(ValueError):
    """A sampler or scheduler name that does not exist; the message lists the valid ones."""

    def __init__(self, kind: str, name: object, valid: Collection[str]) -> None:
        self.kind = kind
        self.name = name
        self.valid = tuple(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s are: {', '.join(self.valid)}")


def check_name(kind: str, name: object, valid: Collection[str]) -> None:
    if name not in valid:
        raise UnknownNameError(kind, name, valid)
