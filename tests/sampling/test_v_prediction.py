"""The zero-terminal-SNR sigma table, the v-prediction x0 and RescaleCFG against their formulas
(docs/sampling.md), each computed independently here in float64."""

import math

import numpy as np
import pytest
import torch

from t2i.sampling import EPSILON, V_PREDICTION, Guidance, SigmaTable, guide, rescale_cfg, starting_latent, to_x0
from t2i.sampling.prediction import input_scale

from ..support.tolerance import EPS32, EPS64, elementwise_bound, reduction_bound

F64 = torch.float64
LAST_ALPHA_BAR = 4.8973451890853435e-08


def formula_table() -> np.ndarray:
    """docs/sampling.md: the SDXL betas, their sigmas, then zero terminal SNR, in numpy float64."""
    t = np.arange(1000, dtype=np.float64)
    betas = (math.sqrt(0.00085) + t * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
    alpha_bar = np.cumprod(1 - betas)
    sigma = np.sqrt((1 - alpha_bar) / alpha_bar)
    s = np.sqrt(1 / (sigma**2 + 1))
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    alpha_bar = s**2
    alpha_bar[-1] = LAST_ALPHA_BAR
    return np.sqrt((1 - alpha_bar) / alpha_bar)


def test_the_zero_terminal_snr_table_matches_the_formula_at_every_index():
    table = SigmaTable.sdxl(zero_terminal_snr=True)
    expected = formula_table()
    ours = table.sigmas.numpy().astype(np.float64)
    assert table.sigmas.dtype == torch.float32 and len(ours) == 1000
    # The table is the float64 result rounded once to float32 (half a float32 spacing, EPS32 / 2
    # of the value). Before that rounding the two float64 computations differ by their own
    # rounding: the cumulative product errs by one rounding per factor (t + 1 of them), the
    # shift s - s_last multiplies relative errors by (s + s_last) / (s - s_last), and
    # sigma = sqrt((1 - a) / a) by 1 / (1 - a) where a is near 1 (small sigmas); a dozen more
    # operations each; both sides err, hence the 2.
    s = np.sqrt(1 / (expected**2 + 1))
    s[-1] = math.sqrt(LAST_ALPHA_BAR)
    s_last = s[-1]
    shift = np.where(np.arange(1000) < 999, (s + s_last) / np.maximum(s - s_last, 1e-300), 1.0)
    a = s**2
    near_one = 1 / np.maximum(1 - a, 1e-300)
    float64_relative = 2 * (np.arange(1000) + 1 + 12) * EPS64 * shift * near_one
    bound = np.abs(expected) * (EPS32 / 2 + float64_relative)
    assert np.all(float64_relative < EPS32 / 100)  # the float32 rounding dominates: a tight check
    assert np.all(np.abs(ours - expected) <= bound), np.argmax(np.abs(ours - expected) / bound)
    # The facts the rest relies on: sigma_max of about 4.5e3, sigma_min unchanged.
    assert table.sigma_max == pytest.approx(4518.76, rel=1e-5)
    assert table.sigma_min == SigmaTable.sdxl().sigma_min
    assert table.zero_terminal_snr and not SigmaTable.sdxl().zero_terminal_snr


def test_the_table_comparison_can_fail():
    expected = formula_table()
    plain = SigmaTable.sdxl().sigmas.numpy().astype(np.float64)
    # Without the rescale the table differs everywhere but at t = 0, by far more than rounding.
    assert np.all(np.abs(plain[1:] - expected[1:]) > 1e-4 * expected[1:])


def test_the_timestep_lookup_and_the_start_noise_rule_use_the_zero_terminal_snr_table():
    table, plain = SigmaTable.sdxl(zero_terminal_snr=True), SigmaTable.sdxl()
    assert table.timestep(table.sigma_max) == 999
    assert table.timestep(float(table.sigmas[500])) == 500
    assert plain.timestep(float(table.sigmas[500])) != 500  # the tables disagree there
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    s0 = table.sigma_max
    assert torch.equal(starting_latent(noise, s0, table.sigma_max), noise * math.sqrt(1 + s0 * s0))
    # sigma_max of the ordinary table is far below: a run there starts at sigma * noise.
    assert torch.equal(starting_latent(noise, plain.sigma_max, table.sigma_max), noise * plain.sigma_max)


SIGMAS = [0.0292, 0.5, 1.0, 14.6, 1124.55, 4518.76]


def column(values, like):
    return torch.tensor(values, dtype=like.dtype).view(-1, 1, 1, 1)


def test_v_prediction_x0_matches_the_formula_on_tensors():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(len(SIGMAS), 4, 8, 8, generator=generator, dtype=F64) * column(SIGMAS, torch.zeros(1, dtype=F64))
    v = torch.randn(x.shape, generator=generator, dtype=F64)
    sigma = column(SIGMAS, x)
    sigma_data = 1.0
    expected = x * sigma_data**2 / (sigma**2 + sigma_data**2) - v * sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    # About six roundings each side, on values no larger than |x| + |v|.
    bound = elementwise_bound(eps=EPS64, magnitude=(x.abs() + v.abs()).max().item(), operations=8)
    assert (to_x0(V_PREDICTION, x, sigma, v) - expected).abs().max().item() <= bound
    # A Python float sigma reads the same way (the sampling core passes floats).
    for row, s in enumerate(SIGMAS):
        assert (to_x0(V_PREDICTION, x[row], s, v[row]) - expected[row]).abs().max().item() <= bound
    # The epsilon reading is unchanged, and it is not the v one.
    assert torch.equal(to_x0(EPSILON, x, sigma, v), x - sigma * v)
    assert (to_x0(EPSILON, x, sigma, v) - expected).abs().max().item() > 1e6 * bound
    with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
        to_x0("sample", x, sigma, v)


def test_v_prediction_x0_recovers_the_clean_latent_a_velocity_was_made_from():
    """What the formula means: with x = x0 + sigma * eps, a perfect v-model outputs
    v = alpha * eps - sigma_vp * x0 (alpha = 1 / sqrt(sigma^2 + 1), sigma_vp = sigma * alpha),
    and the conversion gives x0 back."""
    generator = torch.Generator().manual_seed(4)
    x0 = torch.randn(len(SIGMAS), 4, 8, 8, generator=generator, dtype=F64)
    eps = torch.randn(x0.shape, generator=generator, dtype=F64)
    sigma = column(SIGMAS, x0)
    alpha = 1 / torch.sqrt(sigma**2 + 1)
    x = x0 + sigma * eps
    v = alpha * eps - sigma * alpha * x0
    # x carries |x0| + sigma |eps|, whose rounding the conversion scales by 1 / (sigma^2 + 1).
    bound = elementwise_bound(eps=EPS64, magnitude=(x0.abs() + eps.abs()).max().item(), operations=16)
    assert (to_x0(V_PREDICTION, x, sigma, v) - x0).abs().max().item() <= bound
    assert input_scale(3.0) == 1 / math.sqrt(10)


def formula_rescale(x, s, c, u, g, phi):
    """docs/sampling.md "RescaleCFG", transcribed: velocities of both predictions, guided,
    rescaled to the cond velocity's spread per image, mixed by phi, back to x0."""
    xs = x / (s**2 + 1)
    vc = (xs - c) * math.sqrt(s**2 + 1) / s
    vu = (xs - u) * math.sqrt(s**2 + 1) / s
    vg = vu + g * (vc - vu)
    out = []
    for i in range(x.shape[0]):
        ratio = vc[i].std() / vg[i].std()
        vf = phi * vg[i] * ratio + (1 - phi) * vg[i]
        out.append(xs[i] - vf * s / math.sqrt(s**2 + 1))
    return torch.stack(out), vc, vg


def pair(seed, sigma, images=2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 4, 8, 8, generator=generator, dtype=F64) * sigma
    c = torch.randn(x.shape, generator=generator, dtype=F64) * 0.6 + 0.3
    u = torch.randn(x.shape, generator=generator, dtype=F64) * 0.5 - 0.2
    return x, c, u


def rescale_bound(x, vc, vg, phi, g):
    """Elementwise rounding (about 25 operations on values up to the largest of x and the
    velocities, cfg-scaled), plus the two spreads' sums of C*H*W squares (relative
    reduction_bound each), which move the guided x0 by phi * |v_guided| times their errors."""
    magnitude = max(x.abs().max().item(), (1 + 2 * g) * max(vc.abs().max().item(), vg.abs().max().item()))
    spread = 2 * reduction_bound(eps=EPS64, magnitude=1.0, terms=vc[0].numel(), depth=2)
    return elementwise_bound(eps=EPS64, magnitude=magnitude, operations=25) + phi * vg.abs().max().item() * spread


@pytest.mark.parametrize("sigma", [0.0292, 1.0, 14.6, 4518.76])
@pytest.mark.parametrize("phi,g", [(0.7, 7.0), (1.0, 4.5), (0.3, 1.5)])
def test_rescale_cfg_matches_its_formula_on_tensors(sigma, phi, g):
    x, c, u = pair(5, sigma)
    expected, vc, vg = formula_rescale(x, sigma, c, u, g, phi)
    ours = rescale_cfg(x, sigma, c, u, g, phi)
    bound = rescale_bound(x, vc, vg, phi, g)
    assert (ours - expected).abs().max().item() <= bound
    assert torch.equal(Guidance(g, phi)(x, sigma, c, u), ours)
    # Teeth: plain cfg is far from it (the rescale does something at this spread).
    assert (guide(c, u, g) - expected).abs().max().item() > 1e3 * bound


def test_rescale_cfg_at_one_gives_the_guided_velocity_the_conds_spread_per_image():
    sigma, g = 2.0, 9.0
    x, c, u = pair(6, sigma, images=3)
    x0 = rescale_cfg(x, sigma, c, u, g, 1.0)
    k = math.sqrt(sigma**2 + 1) / sigma
    xs = x / (sigma**2 + 1)
    v_final, v_cond = (xs - x0) * k, (xs - c) * k
    for i in range(3):
        assert v_final[i].std().item() == pytest.approx(v_cond[i].std().item(), rel=1e-12)
    # Per image: an image's result does not depend on the others in its batch (up to the order
    # in which a batched reduction sums).
    alone = rescale_cfg(x[1:2], sigma, c[1:2], u[1:2], g, 1.0)
    velocities = (xs - u) * k * (1 - g) + v_cond * g
    assert (alone - x0[1:2]).abs().max().item() <= rescale_bound(x, v_cond, velocities, 1.0, g)
    other = rescale_cfg(x[1:2], sigma, c[1:2], u[1:2], g * 0.5, 1.0)
    assert (other - x0[1:2]).abs().max().item() > 1e3 * rescale_bound(x, v_cond, velocities, 1.0, g)


def test_rescale_cfg_reads_a_v_models_own_velocities():
    """On x0-predictions that came from velocities (to_x0), the velocities RescaleCFG works on
    are those velocities: what makes it the v-space rescale of the paper."""
    sigma, g = 3.0, 6.0
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(1, 4, 8, 8, generator=generator, dtype=F64) * sigma
    v_cond, v_uncond = (torch.randn(x.shape, generator=generator, dtype=F64) for _ in range(2))
    c, u = to_x0(V_PREDICTION, x, sigma, v_cond), to_x0(V_PREDICTION, x, sigma, v_uncond)
    v_guided = v_uncond + g * (v_cond - v_uncond)
    v_rescaled = v_guided * v_cond.std() / v_guided.std()
    expected = to_x0(V_PREDICTION, x, sigma, 0.7 * v_rescaled + 0.3 * v_guided)
    bound = rescale_bound(x, v_cond, v_guided, 0.7, g)
    assert (rescale_cfg(x, sigma, c, u, g, 0.7) - expected).abs().max().item() <= bound


def test_rescale_zero_is_plain_cfg():
    x, c, u = pair(7, 5.0)
    assert torch.equal(Guidance(6.0)(x, 5.0, c, u), guide(c, u, 6.0))
    assert torch.equal(Guidance(6.0, 0.0)(x, 5.0, c, u), guide(c, u, 6.0))
