"""A row's LoRA deltas do not depend on its batch-mates, to the bit.

The base layers here have zero weights, so their output is exactly zero whatever the batch and
the kernels: all that is left in the output is the LoRA deltas, which must then be bit-identical
for a request alone and in a batch with other LoRA sets (other files, the same file at another
strength, sets in another order). With the base layers of a real model the same holds for the
delta arithmetic; what remains is how the base matmul's kernel rounds a row at another batch
size, which tests/engine/test_loras.py bounds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from t2i.lora import UNET, LayerLora, LoraWeights, batched_loras
from t2i.lora.apply import STRATEGIES

from tests.support.tolerance import EPS32, max_abs, max_diff, reduction_bound

WIDTH, RANK = 64, 8


class Tree(nn.Module):
    """A Linear over tokens, then a 3x3 conv: both kinds of patched layer, with zero weights."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        for parameter in self.parameters():
            nn.init.zeros_(parameter)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(tokens), self.conv(image)


def lora(tree: Tree, name: str, seed: int, rank: int = RANK) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    layers = {
        "proj": LayerLora(torch.randn(rank, WIDTH, generator=g), torch.randn(WIDTH, rank, generator=g), module=tree.proj),
        "conv": LayerLora(torch.randn(rank, 4, 3, 3, generator=g), torch.randn(4, rank, 1, 1, generator=g),
                          stride=(1, 1), padding=(1, 1), module=tree.conv),
    }
    return LoraWeights(name, f"{seed:064x}", {UNET: layers}, roots={UNET: tree})


def inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 77, WIDTH, generator=g), torch.randn(rows, 4, 16, 16, generator=g)


def run(tree, rows, x, strategy):
    with torch.inference_mode(), batched_loras(tree, UNET, rows, strategy=strategy):
        return tree(*x)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_rows_deltas_are_the_same_bits_alone_and_among_other_lora_sets(strategy):
    tree = Tree()
    a, b, c = lora(tree, "a", 1), lora(tree, "b", 2), lora(tree, "c", 3, rank=4)
    target = [(a, 1.0), (b, 0.5)]
    tokens, image = inputs(8)
    # The target's two rows alone, at the front of the batch.
    alone = run(tree, [target, target], (tokens[:2], image[:2]), strategy)
    assert alone[0].abs().max() > 1.0  # the deltas are there: a zero output would prove nothing
    mates = [
        [(b, 1.0), (c, 1.0)],  # the target's second LoRA first, and a file it does not use
        [(a, 0.3)],  # its first LoRA at another strength
        [(c, 0.7), (a, 1.0), (b, 0.5)],  # a superset, in another order
    ]
    for position in (0, 2, 6):  # the target at the front, in the middle, at the end
        rows = [m for mate in mates for m in (mate, mate)]
        rows[position:position] = [target, target]
        picks = list(range(2, 8))  # the mates' inputs; rows 0-1 of `tokens` are the target's
        picks[position:position] = [0, 1]
        batched = run(tree, rows, (tokens[picks], image[picks]), strategy)
        for got, want in zip(batched, alone):
            assert torch.equal(got[position : position + 2], want), (strategy, position)


def test_a_set_shared_by_two_requests_gives_each_its_own_deltas():
    """Equal sets share their calls; the result per row is still the set's."""
    tree = Tree()
    a = lora(tree, "a", 1)
    tokens, image = inputs(4)
    shared = run(tree, [[(a, 0.8)]] * 4, (tokens, image), "auto")
    for i in range(4):
        alone = run(tree, [[(a, 0.8)]], (tokens[i : i + 1], image[i : i + 1]), "auto")
        for got, want in zip(shared, alone):
            # The same down and up on fewer rows: equal up to how the kernels round a row at another
            # batch size, two chained sums (down over the layer's fan-in, up over the rank).
            bound = reduction_bound(eps=EPS32, magnitude=max_abs(want), terms=WIDTH, depth=2)
            assert max_diff(got[i : i + 1], want) <= bound
            assert max_abs(want) > 1000 * bound  # the deltas are far larger than the rounding
