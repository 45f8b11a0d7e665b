"""A1111's "Original" emphasis (t2i.prompts.emphasis) on small tensors."""

import pytest
import torch

from t2i.prompts.emphasis import original_emphasis


def chunks(rows=2, tokens=77, width=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # an offset keeps every mean clearly away from 0, as real hidden states' means are
    return torch.randn(rows, tokens, width, generator=generator) + 0.5


def test_the_formula():
    z = chunks()
    w = torch.ones(2, 77)
    w[0, 3:6] = 1.1**3
    w[1, 10:20] = 1 / 1.1
    w[1, 30] = -0.5
    out = original_emphasis(z, w)
    z64, w64 = z.double(), w.double()
    for row in range(2):
        scaled = z64[row] * w64[row, :, None]
        expected = scaled * (z64[row].mean() / scaled.mean())
        assert torch.allclose(out[row].double(), expected, rtol=1e-5, atol=1e-6)


def test_each_chunk_keeps_its_mean():
    z = chunks(rows=3)
    w = torch.ones(3, 77)
    w[:, 1:9] = 1.4
    w[2, 20:25] = 0.3
    out = original_emphasis(z, w)
    assert torch.allclose(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)), rtol=1e-5)
    assert not torch.allclose(out, z)


def test_weights_set_relative_sizes():
    z = chunks(rows=1)
    w = torch.ones(1, 77)
    w[0, 5] = 2.0
    out = original_emphasis(z, w)
    # every position is scaled by the same factor after weighting: position 5 by twice that factor
    factor = out[0, 0] / z[0, 0]
    assert torch.allclose(out[0, 5] / z[0, 5], 2 * factor, rtol=1e-5)
    assert torch.allclose(out[0, 6] / z[0, 6], factor, rtol=1e-5)
    assert not torch.allclose(factor, torch.ones_like(factor))


def test_weights_of_one_change_nothing():
    z = chunks(rows=2)
    assert torch.equal(original_emphasis(z, torch.ones(2, 77)), z)
    half = z.half()
    assert torch.equal(original_emphasis(half, torch.ones(2, 77)), half)


def test_a_chunk_does_not_depend_on_another():
    z = chunks(rows=2)
    w = torch.ones(2, 77)
    w[0, 4:7] = 1.3
    w[1, 2] = 0.2
    other = z.clone()
    other[1] = chunks(rows=1, seed=7)[0] * 3
    other_weights = w.clone()
    other_weights[1] = 2.0
    first = original_emphasis(z, w)[0]
    assert torch.equal(original_emphasis(other, other_weights)[0], first)
    assert torch.equal(original_emphasis(z[:1], w[:1])[0], first)


def test_leading_dimensions_and_dtype():
    z = chunks(rows=6).reshape(2, 3, 77, 8).to(torch.bfloat16)
    w = torch.full((2, 3, 77), 1.2)
    out = original_emphasis(z, w)
    assert out.shape == z.shape and out.dtype == torch.bfloat16
    # a uniform weight is undone by the mean restore
    assert torch.allclose(out.float(), z.float(), rtol=1e-2, atol=1e-2)


def test_shapes_must_fit():
    with pytest.raises(ValueError):
        original_emphasis(chunks(rows=2), torch.ones(2, 76))
