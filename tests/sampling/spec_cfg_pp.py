"""The CFG++ samplers of docs/sampling.md, transcribed independently of the service's code, as
the oracle for what k-diffusion does not have. `guided(x, s, c, u)` is the guided x0 from the
pair (c, u) evaluated at (x, s): plain cfg, or RescaleCFG; the unconditional prediction is also
used on its own, as it came from the model."""

from __future__ import annotations

import math

import torch


class SpecNoise:
    def __init__(self, x, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.x = x
        self.draws = 0

    def __call__(self):
        self.draws += 1
        return torch.randn(self.x.shape, generator=self.generator, dtype=self.x.dtype)


def plain_cfg(cfg):
    def guided(x, s, c, u):
        return u + cfg * (c - u)

    return guided


def spec_split(a, b):
    up = min(b, math.sqrt(b * b * (a * a - b * b) / (a * a)))
    return math.sqrt(b * b - up * up), up


def spec_euler_cfg_pp(denoiser, x, sigmas, guided, seed):
    for i in range(len(sigmas) - 1):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        c, u = denoiser(x, s)
        d = guided(x, s, c, u)
        x = d if s1 == 0 else d + s1 * (x - u) / s
    return x


def spec_euler_ancestral_cfg_pp(denoiser, x, sigmas, guided, seed):
    eps = SpecNoise(x, seed)
    for i in range(len(sigmas) - 1):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        c, u = denoiser(x, s)
        d = guided(x, s, c, u)
        if s1 == 0:
            x = d
        else:
            down, up = spec_split(s, s1)
            x = d + down * (x - u) / s + up * eps()
    return x


def spec_dpmpp_2s_ancestral_cfg_pp(denoiser, x, sigmas, guided, seed):
    eps = SpecNoise(x, seed)
    for i in range(len(sigmas) - 1):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        c, u = denoiser(x, s)
        d = guided(x, s, c, u)
        down, up = spec_split(s, s1) if s1 > 0 else (0.0, 0.0)
        if down == 0:
            x = d
            continue
        h = math.log(s) - math.log(down)
        s_s = math.sqrt(s * down)
        x2 = (s_s / s) * (x + d - u) - math.expm1(-h / 2) * d
        c2, u2 = denoiser(x2, s_s)
        d2 = guided(x2, s_s, c2, u2)
        x = (down / s) * (x + d - u2) - math.expm1(-h) * d2
        if s1 > 0:
            x = x + up * eps()
    return x


SPEC_CFG_PP = {
    "euler_cfg_pp": spec_euler_cfg_pp,
    "euler_ancestral_cfg_pp": spec_euler_ancestral_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": spec_dpmpp_2s_ancestral_cfg_pp,
}
