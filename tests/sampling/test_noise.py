import math

import pytest
import torch

from t2i.sampling import AncestralNoise, SigmaTable, get_sigmas, initial_noise, latent_shape, resolve_seed, starting_latent
from t2i.sampling.noise import MAX_SEED

TABLE = SigmaTable.sdxl()


def test_initial_noise_is_a_function_of_the_seed_alone():
    a = initial_noise(42, latent_shape(128, 96))
    torch.manual_seed(999)  # the global RNG must not matter
    torch.randn(10)
    b = initial_noise(42, latent_shape(128, 96))
    assert a.shape == (1, 4, 16, 12) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, initial_noise(43, latent_shape(128, 96)))
    expected = torch.randn((1, 4, 16, 12), generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, expected)


def test_start_uses_sqrt_one_plus_sigma_squared_at_sigma_max():
    noise = torch.ones(1, 4, 2, 2)
    # Unit noise times the scale: one rounding to float32, half an ulp. (The two candidate
    # scales, sqrt(1 + s^2) and s, differ by about 1 / (2 s^2), over 2e-3 here.)
    rel = torch.finfo(torch.float32).eps / 2
    s0 = float(get_sigmas("normal", 10)[0])  # interpolated: within 1e-5 of sigma_max
    assert s0 != TABLE.sigma_max
    assert starting_latent(noise, s0, TABLE.sigma_max)[0, 0, 0, 0].item() == pytest.approx(math.sqrt(1 + s0**2), rel=rel)
    s0 = float(get_sigmas("ddim_uniform", 28)[0])  # starts below sigma_max
    assert starting_latent(noise, s0, TABLE.sigma_max)[0, 0, 0, 0].item() == pytest.approx(s0, rel=rel)
    above = TABLE.sigma_max * 1.5
    assert starting_latent(noise, above, TABLE.sigma_max)[0, 0, 0, 0].item() == pytest.approx(math.sqrt(1 + above**2), rel=rel)


def test_ancestral_noise_is_per_request_and_in_x_dtype():
    like = torch.zeros((1, 4, 3, 3), dtype=torch.float64)
    a, b = AncestralNoise(5, like), AncestralNoise(5, like)
    first = a()
    assert first.dtype == torch.float64 and first.shape == like.shape
    other = AncestralNoise(6, like)
    other()  # drawing from another request's generator must not move ours
    assert torch.equal(first, b())
    assert torch.equal(a(), b())


@pytest.mark.parametrize("seed", [0, 1, 12345, MAX_SEED])
def test_resolve_seed_keeps_explicit_seeds(seed):
    assert resolve_seed(seed) == seed


def test_resolve_seed_picks_random_seeds_for_minus_one():
    seeds = {resolve_seed(-1) for _ in range(20)}
    assert len(seeds) > 15
    assert all(0 <= s <= MAX_SEED for s in seeds)


@pytest.mark.parametrize("seed", [-2, MAX_SEED + 1])
def test_resolve_seed_rejects_out_of_range(seed):
    with pytest.raises(ValueError, match="seed"):
        resolve_seed(seed)
