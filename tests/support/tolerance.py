"""Tolerances for comparing two floating-point computations of the same mathematics.

Two such computations differ only by rounding, and how much depends on the machine: other CPU
kernels (AVX2, AVX-512, AMX), batch sizes and thread counts sum in other orders. A tolerance
observed on one machine says nothing about another, so the tests derive theirs from the
magnitudes involved and the precision, with the bound below, and show separately that the
differences they must detect are far larger.
"""

from __future__ import annotations

import math

import torch
from torch import nn

EPS16 = torch.finfo(torch.float16).eps  # 2**-10
EPS32 = torch.finfo(torch.float32).eps  # 2**-23: rounding one result errs by at most EPS32 / 2 of it
EPS64 = torch.finfo(torch.float64).eps  # 2**-52


def reduction_bound(*, eps: float, magnitude: float, terms: int, depth: int = 1, worst_case: bool = False) -> float:
    """How far two evaluations of a chain of `depth` reductions (sums of up to `terms` terms)
    may differ when each sums in its own order.

    One sum of n terms in any order is within (n - 1) * u * sum|terms| of the exact sum, with
    u = eps / 2 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 4.4), so
    two evaluations are within (n - 1) * eps * sum|terms| of each other (`worst_case`). That
    bound assumes every rounding errs fully and in the same direction; the rounding errors of
    real kernels behave like independent random variables, and a sum of n terms then errs by
    about sqrt(n) * u (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019), which is the default.
    Errors of chained stages add to first order: `depth` times one stage's.

    `magnitude` stands for sum|terms| of a stage. The networks compared here normalise their
    activations (GroupNorm, LayerNorm) and their outputs carry the largest values, so the
    largest absolute value of the result is used for it."""
    per_sum = terms - 1 if worst_case else math.sqrt(terms)
    return depth * per_sum * eps * magnitude


def elementwise_bound(*, eps: float, magnitude: float, operations: int) -> float:
    """How far two evaluations of the same elementwise arithmetic (no long sums) may differ when
    they order their operations differently: each of `operations` steps errs by at most one unit
    in the last place of a value no larger than `magnitude` (IEEE +, -, *, / and sqrt by half of
    one, exp, log and expm1 by at most one), and the two sides' errors add."""
    return 2 * operations * eps * magnitude


def network_reductions(*modules: nn.Module, positions: int) -> tuple[int, int]:
    """(depth, terms) of one forward of `modules`, counted from their layers.

    depth counts every Linear, Conv2d, GroupNorm and LayerNorm, and two per attention (scores,
    weighted sum): all of them, not only those on the longest path, so it bounds the chain from
    above. terms is the longest single reduction: a layer's fan-in, a norm's group, or the
    `positions` (text tokens or latent pixels) that attention sums over."""
    depth, terms = 0, positions
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                depth, terms = depth + 1, max(terms, m.in_features)
            elif isinstance(m, nn.Conv2d):
                depth, terms = depth + 1, max(terms, m.in_channels // m.groups * math.prod(m.kernel_size))
            elif isinstance(m, nn.GroupNorm):
                depth, terms = depth + 1, max(terms, m.num_channels // m.num_groups * positions)
            elif isinstance(m, nn.LayerNorm):
                depth, terms = depth + 1, max(terms, math.prod(m.normalized_shape))
            elif type(m).__name__.endswith("Attention"):
                depth += 2
    return depth, terms


def max_abs(*tensors: torch.Tensor) -> float:
    return max(t.abs().max().item() for t in tensors)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def text_tolerance(encoders, *encoded: torch.Tensor, weight: float = 1.0) -> float:
    """How far two float32 encodings may differ when the encoders sum in other orders (another
    batch, another copy): the encoders' reduction bound (tests/support/tolerance.py). A weight w
    gives z_empty + w * (z - z_empty), which scales the encodings' errors by |1 - w| + |w| and
    adds three roundings of values up to (1 + 2|w|) times the encodings' magnitude."""
    depth, terms = network_reductions(*encoders, positions=77)  # a CLIP window
    magnitude = max_abs(*encoded)
    encoding = reduction_bound(eps=EPS32, magnitude=magnitude, terms=terms, depth=depth)
    return (abs(1 - weight) + abs(weight)) * encoding + 3 * (1 + 2 * abs(weight)) * magnitude * EPS32 / 2
