"""Per-row LoRAs inside one batched forward, without touching the model's weights.

Every engine step runs ONE UNet forward for many requests, and each request brings its own
LoRAs and strengths. Merging into the weights would serialise requests; instead, for each
patched Linear/Conv2d layer, a forward hook adds to row b of the base output

    y_b = W x_b + sum_l s_bl * (alpha_l / r_l) * up_l(down_l(x_b))

where the base layer has already run once for the whole batch. Rows are samples: in the UNet
each request has two (cond and uncond) that both get the request's LoRAs; in a CLIP encoder
they are the prompt windows of each request (see `unet_rows` and `text_rows`).

How rows are grouped ("group", the default). Per layer, the rows that use one LoRA file (the
same LoraWeights object, whatever their strengths) form one group: its down factor runs once on
those rows, the rank-r activations are scaled per row by the strengths (alpha / r is already in
`up`), up runs, and the result is added back. Rows are taken and added through views when they
are consecutive (a request's rows always are; the whole batch needs no gather at all), else by
`index_select` / `index_add_`. Several LoRAs on one request are several groups containing that
row: their deltas add, exactly like ComfyUI's merged sum. A row with no LoRA is in no group and
costs nothing; a strength of 0 means the LoRA is absent.

Hooks. Each module some LoRA patches gets one forward hook (a dispatcher) the first time it is
needed, and keeps it; entering `batched_loras` only records the batch's plan for the current
thread, and the dispatcher applies the plans active on the thread that runs the forward.
Registering the hooks per step instead (~800 on the full SDXL UNet, with 8 LoRAs) measured
10 ms a step with the garbage collector frozen and 45 ms without, all Python; recording a plan
takes ~0.1 ms. An idle dispatcher costs a few microseconds per call (torch's hook path):
`remove_dispatchers` takes them off a model that will run without LoRAs for a while. A forward
on another thread (say, a text encode without LoRAs) sees no plan at all.

"stack" concatenates, per layer, the down and up factors of every LoRA in the batch into one
rank stack and masks it with a (rows x total rank) strength matrix: one down and one up per
layer whatever the number of LoRAs, but every row pays for every LoRA's rank (LoCon mid is
folded into down for it). The stack of a layer is kept for the next batch with the same LoRAs
on it (one stack per module, the latest: consecutive steps of a running batch reuse it), and the
mask is built once per batch for all layers that share it. With one LoRA on a layer both
strategies run the same code.

"auto" (the default) picks per layer: "stack" when the layer has several LoRAs and the stacked
factors hold at most STACK_SHARE times the base weight's elements, else "group". Per row, both
strategies cost FLOPs in proportion to the factors they run, so the rule bounds what "stack"
can add at STACK_SHARE of the base layer's own work. It stacks where one pair of calls instead
of one pair per LoRA is the larger saving, which is at small total ranks, where a "group" pass
is mostly fixed cost per call. Rank 32 on the demo UNet's 32-64 channels stays grouped.
Measured with benchmarks/lora.py (8 requests, 8 different LoRAs, images/s against no LoRA):
rank 2 was 0.55x with share 0.25, 0.65x with 1.0 and 0.67x with everything stacked; rank 32 was
0.45x, 0.45x and 0.21x. On SDXL, 5 rank-32 LoRAs on a 320-wide layer sit at the 1.0 mark;
whether a GPU wants a larger or a smaller share is not measured.

Measured on the demo UNet (benchmarks/lora_layers.py; CPU fp32 on this 2-core machine while
other work ran on it, so read the ratios; 8 requests x 2 rows, latent 16x16, rank 32 on all
134 Linear/Conv2d layers; median ms per forward with 2 torch threads / with 1):

    case                            plain model   "group"      "stack"      PEFT mixed batch
    (a) no LoRA                     58 / 72       56 / 74 *                 72 / 90 (all `__base__`)
    (b) one LoRA on every row                     97 / 125     109 / 136    143 / 183
    (c) 8 LoRAs, one per request                  174 / 191    286 / 380    292 / 307
    * the model with the idle hooks that earlier LoRAs left on it

At rank 32 "group" beats "stack" in (c) by 1.6-2x. The reason is that "stack" makes every row
pay for every LoRA's rank, and that is why "auto" leaves such layers grouped. The table is from
before stacks were kept between batches. Rank 32 is a large share of the demo UNet's 32-64
channels; on SDXL's 320-1280 channels the LoRA share of a forward is much smaller.

PEFT's mixed-adapter batch (`adapter_names=`, `LoraLayer._mixed_batch_forward`) is the same
grouping idea, slower in every case above (its wrapped layers cost even rows without an
adapter, and it gathers rows with Python lists), and it does not fit this service: it allows
ONE adapter per row (stacking 2-5 LoRAs per request would need a merged adapter per
combination); its scale is per adapter and global (`scaling[adapter]`, `set_scale`) while
strengths here are per request (one file at 0.6 and at 1.0 in the same batch would need two
copies); it has no LoCon `lora_mid`; and its adapters live inside the model's modules
(injecting and deleting one mutates the shared model while other requests run), where here
the weights stay outside the model and a batch's plan exists for one forward.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .keys import TEXT_ENCODERS, UNET
from .weights import LayerLora, LoraWeights

Adapter = tuple[LoraWeights, float]  # a LoRA file's weights and the strength one row uses it at
STRATEGIES = ("auto", "group", "stack")
# "auto": a layer's LoRAs are stacked when their factors hold at most this share of the base
# weight's elements (the extra work "stack" can cost a row, against the layer's own).
STACK_SHARE = 1.0


class LoraBatchError(RuntimeError):
    """A patched layer saw a batch that does not match the rows it was given."""


@dataclass(frozen=True)
class LoadedLora:
    """One of a request's LoRAs with its weights on the device: what the engine holds per request."""

    weights: LoraWeights
    strength_model: float = 1.0
    strength_clip: float = 1.0


def unet_rows(
    requests: Sequence[Sequence[LoadedLora]], rows_per_request: int | Sequence[int] = 2
) -> list[list[Adapter]]:
    """UNet rows in denoise.evaluate's order: each request's cond rows, then its uncond rows
    (`rows_per_request` in all, one count for all or one per request), all with the request's
    LoRAs at strength_model."""
    return repeat_rows(
        [[(lora.weights, lora.strength_model) for lora in request] for request in requests], rows_per_request
    )


def text_rows(requests: Sequence[Sequence[LoadedLora]], windows: Sequence[int]) -> list[list[Adapter]]:
    """Text-encoder rows: request i's LoRAs at strength_clip for each of its `windows[i]` 77-token
    windows, in the order the windows are stacked into the encoder's batch."""
    return repeat_rows(
        [[(lora.weights, lora.strength_clip) for lora in request] for request in requests], windows
    )


def text_encoder_wrapper(loras_by_owner: Mapping[Hashable, Sequence[LoadedLora]]):
    """A `wrap_forward(index, encoder, row_owners)` for engine/text.encode_prompts: every row
    (prompt window, or empty-prompt row) gets its owner's LoRAs at strength_clip on encoder
    `index` (0: CLIP-L, "te1"; 1: CLIP-G, "te2"). Owners not in the mapping get none."""

    def wrap(index: int, encoder: nn.Module, row_owners: Sequence[Hashable]):
        rows = [
            [(lora.weights, lora.strength_clip) for lora in loras_by_owner.get(owner, ())]
            for owner in row_owners
        ]
        return batched_loras(encoder, TEXT_ENCODERS[index], rows)

    return wrap


def repeat_rows(per_item: Sequence[Sequence[Adapter]], counts: int | Sequence[int]) -> list[list[Adapter]]:
    """Row sets for items that each occupy `counts[i]` consecutive rows (or `counts` each)."""
    if isinstance(counts, int):
        counts = [counts] * len(per_item)
    if len(counts) != len(per_item):
        raise ValueError(f"{len(per_item)} LoRA sets but {len(counts)} row counts; give one count per set")
    return [list(adapters) for adapters, count in zip(per_item, counts) for _ in range(count)]


@dataclass(eq=False)
class _Group:
    """One LoRA file's rows in this batch and their strengths."""

    # Which rows: None for every row; a slice when they are consecutive (a request's rows
    # always are), which reads and adds through views; else an index tensor.
    rows: slice | Tensor | None
    strengths: Tensor | float  # per row (shape (n,)), or one value for all its rows
    _views: dict[int, Tensor] = field(default_factory=dict)

    def scale(self, ndim: int) -> Tensor | float:
        """The strengths shaped to broadcast over rank activations with `ndim` dimensions."""
        if isinstance(self.strengths, float):
            return self.strengths
        view = self._views.get(ndim)
        if view is None:
            view = self._views[ndim] = self.strengths.view(-1, *([1] * (ndim - 1)))
        return view

    def gather(self, x: Tensor) -> Tensor:
        if self.rows is None:
            return x
        if isinstance(self.rows, slice):
            return x[self.rows]
        return x.index_select(0, self.rows)

    def add_into(self, output: Tensor, delta: Tensor) -> Tensor:
        if self.rows is None:
            return output.add_(delta)
        if isinstance(self.rows, slice):
            output[self.rows].add_(delta)
            return output
        return output.index_add_(0, self.rows, delta)


@dataclass
class ActiveLoras:
    """What a `batched_loras` context applies (for logs, metrics and tests)."""

    rows: int
    component: str
    layers: int  # patched layers
    groups: int  # distinct LoRA files


@dataclass(eq=False)
class _Plan:
    """One context's work: for each LoRA in the batch, its layers by module and its rows."""

    component: str
    batch: int
    strategy: str
    groups: list[tuple[dict[nn.Module, LayerLora], _Group]]
    # What each module does in this plan, decided at its first forward: ("group", entries) or
    # ("stack", stacked factors, mask); and the masks, shared by layers with the same entries.
    routes: dict[nn.Module, tuple] = field(default_factory=dict)
    masks: dict[tuple, Tensor] = field(default_factory=dict)

    def route(self, module: nn.Module) -> tuple:
        route = self.routes.get(module)
        if route is None:
            entries = [(by_module[module], group) for by_module, group in self.groups if module in by_module]
            stacked = len(entries) > 1 and (
                self.strategy == "stack" or (self.strategy == "auto" and _stack_is_cheap(module, entries))
            )
            route = self.routes[module] = ("stack", _stack_of(module, entries), self._mask(entries)) if stacked else (
                "group", entries
            )
        return route

    def _mask(self, entries: list[tuple[LayerLora, _Group]]) -> Tensor:
        """The (rows, total rank) strengths of a stack: column block k is LoRA k's rows."""
        key = tuple((id(group), layer.rank) for layer, group in entries)
        mask = self.masks.get(key)
        if mask is None:
            first = entries[0][0]
            columns = []
            for layer, group in entries:
                column = torch.zeros(self.batch, dtype=first.down.dtype, device=first.down.device)
                column[slice(None) if group.rows is None else group.rows] = group.strengths
                columns.append(column.unsqueeze(1).expand(self.batch, layer.rank))
            mask = self.masks[key] = torch.cat(columns, dim=1)
        return mask


# Per thread, the plans of the contexts it is inside: the dispatchers read them, so a forward on
# another thread sees none.
_local = threading.local()
_install_lock = threading.Lock()
# One dispatcher per patched module, installed the first time a LoRA needs the module and kept:
# registering ~800 hooks per step on the full SDXL UNet (and the garbage their handles make)
# costs 10-45 ms a step on a CPU, where an idle dispatcher costs a few microseconds a call.
_dispatchers: weakref.WeakKeyDictionary[nn.Module, _Dispatcher] = weakref.WeakKeyDictionary()
# LoraWeights -> component -> (dispatcher generation, {module: layer}), resolved once per weights
# and again after remove_dispatchers (which starts a new generation).
_by_module: weakref.WeakKeyDictionary[LoraWeights, dict[str, tuple[int, dict[nn.Module, LayerLora]]]] = (
    weakref.WeakKeyDictionary()
)
_generation = 0
# module -> (weak references to the LoRA layers stacked, in order; their stack): the latest stack
# per module, so a running batch's steps reuse it. The references are weak because a LayerLora
# holds its module (the key) and the LoRA cache must be able to free an evicted LoRA. The stacks
# are copies of LoRA factors outside the LoRA cache's byte budget, so they have their own: past
# STACK_CACHE_BYTES a new stack serves its batch's step only (built again the next step).
STACK_CACHE_BYTES = 256 * 2**20
_stacks: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[weakref.ref[LayerLora], ...], LayerLora]] = (
    weakref.WeakKeyDictionary()
)


@contextmanager
def batched_loras(
    tree: nn.Module, component: str, rows: Sequence[Sequence[Adapter]], *, strategy: str = "auto"
) -> Iterator[ActiveLoras]:
    """Apply each row's LoRAs during forwards of `tree` on this thread inside the block.

    `tree` is the module the weights' `component` ("unet", "te1" or "te2") was placed on;
    `rows[b]` lists (LoraWeights, strength) for row b of every batch the patched layers see
    (the same LoRA twice in a row adds its strengths); `strategy` is one of STRATEGIES (the
    module docstring). Nothing happens when no row has a LoRA for this component."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    batch = len(rows)
    per_lora: dict[int, tuple[LoraWeights, dict[int, float]]] = {}
    for b, adapters in enumerate(rows):
        for weights, strength in adapters:
            if not weights.layers.get(component):
                continue
            entry = per_lora.setdefault(id(weights), (weights, {}))[1]
            entry[b] = entry.get(b, 0.0) + float(strength)
    groups: list[tuple[dict[nn.Module, LayerLora], _Group]] = []
    for weights, strengths in per_lora.values():
        active = {b: s for b, s in strengths.items() if s != 0.0}  # strength 0: the LoRA is absent
        if active:
            groups.append((_layers_by_module(weights, component, tree), _make_group(active, batch, weights)))
    if not groups:
        yield ActiveLoras(batch, component, 0, 0)
        return
    plan = _Plan(component, batch, strategy, groups)
    plans = _local.__dict__.setdefault("plans", [])
    plans.append(plan)
    try:
        layers = len(set().union(*(by_module for by_module, _ in groups)))
        yield ActiveLoras(batch, component, layers, len(groups))
    finally:
        plans.remove(plan)


def _layers_by_module(weights: LoraWeights, component: str, tree: nn.Module) -> dict[nn.Module, LayerLora]:
    root = weights.roots.get(component)
    if root is not None and root is not tree:
        raise ValueError(
            f"LoRA {weights.name!r}: its {component} layers were placed on another module tree than the one given"
        )
    cached = _by_module.setdefault(weights, {})
    generation, by_module = cached.get(component, (-1, {}))
    if generation != _generation:
        by_module = {}
        with _install_lock:
            for path, layer in weights.layers[component].items():
                module = layer.module if layer.module is not None else tree.get_submodule(path)
                by_module[module] = layer
                if module not in _dispatchers:
                    _dispatchers[module] = _Dispatcher(module, path)
            cached[component] = (_generation, by_module)
    return by_module


def remove_dispatchers(tree: nn.Module) -> int:
    """Take the LoRA hooks off every module of `tree`; returns how many were removed.

    For when no LoRA will run on the model for a while (say, the cache holds none), so that
    plain forwards lose the idle hooks' cost (a few microseconds per patched layer). Call it
    between forwards: a forward running meanwhile would lose its deltas. The next
    `batched_loras` puts back what it needs."""
    global _generation
    removed = 0
    with _install_lock:
        for module in tree.modules():
            dispatcher = _dispatchers.pop(module, None)
            if dispatcher is not None:
                dispatcher.handle.remove()
                removed += 1
            _stacks.pop(module, None)
        _generation += 1
    return removed


class _Dispatcher:
    """The forward hook of one patched module: adds the deltas of the plans active on this thread."""

    __slots__ = ("handle", "path")

    def __init__(self, module: nn.Module, path: str) -> None:
        self.path = path
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        plans = getattr(_local, "plans", None)
        if not plans:
            return None
        x = args[0]
        for plan in plans:
            route = plan.route(module)
            if route[0] == "stack":
                self._check(x, plan)
                stacked, mask = route[1], route[2]
                h = stacked.project_down(x.to(stacked.down.dtype))
                # Rank activations are (rows, ..., R) for a Linear and (rows, R, H, W) for a conv.
                h = h * (
                    mask[:, :, None, None] if stacked.is_conv else mask.view(plan.batch, *([1] * (h.ndim - 2)), -1)
                )
                output = output.add_(stacked.project_up(h).to(output.dtype))
                continue
            for layer, group in route[1]:
                self._check(x, plan)
                h = layer.project_down(group.gather(x).to(layer.down.dtype))
                h = h * group.scale(h.ndim)
                output = group.add_into(output, layer.project_up(h).to(output.dtype))
        return output

    def _check(self, x: Tensor, plan: _Plan) -> None:
        if x.shape[0] != plan.batch:
            raise LoraBatchError(
                f"{plan.component} layer {self.path} got a batch of {x.shape[0]} rows but the LoRA rows given "
                f"were {plan.batch}; give one LoRA set per row of the batch the module sees"
            )


def _stack_is_cheap(module: nn.Module, entries: list[tuple[LayerLora, _Group]]) -> bool:
    weight = getattr(module, "weight", None)
    if weight is None:
        return False
    factors = 0
    for layer, _ in entries:
        # The stack's down is mid folded into down for a LoCon layer: rank x in x kh x kw.
        down = layer.down.numel() if layer.mid is None else layer.rank * layer.down.shape[1] * layer.mid[0, 0].numel()
        factors += layer.up.numel() + down
    return factors <= STACK_SHARE * weight.numel()


def _folded_down(layer: LayerLora) -> Tensor:
    if layer.mid is None:
        return layer.down
    # One stacked conv needs one kernel per rank: fold mid into down (ComfyUI's merged factor).
    return torch.einsum("ojhw,ji->oihw", layer.mid.float(), layer.down.float().flatten(1)).to(layer.down.dtype)


def _stack_of(module: nn.Module, entries: list[tuple[LayerLora, _Group]]) -> LayerLora:
    """Every LoRA of a layer as one rank stack (the latest stack of the module, when its layers are the same)."""
    layers = tuple(layer for layer, _ in entries)
    cached = _stacks.get(module)
    if cached is not None and len(cached[0]) == len(layers) and all(ref() is layer for ref, layer in zip(cached[0], layers)):
        return cached[1]
    first = layers[0]
    stacked = LayerLora(
        down=torch.cat([_folded_down(layer) for layer in layers]),
        up=torch.cat([layer.up for layer in layers], dim=1),
        stride=first.stride,
        padding=first.padding,
        dilation=first.dilation,
    )
    with _install_lock:  # text encoders may run on other threads than the UNet
        _stacks.pop(module, None)
        if stack_bytes() + stacked.nbytes <= STACK_CACHE_BYTES:  # only on a miss, right after a cat
            _stacks[module] = (tuple(weakref.ref(layer) for layer in layers), stacked)
    return stacked


def stack_bytes() -> int:
    """Bytes of the stacks kept between steps."""
    return sum(stack.nbytes for _, stack in list(_stacks.values()))


def _make_group(strengths: dict[int, float], batch: int, weights: LoraWeights) -> _Group:
    order = sorted(strengths)
    values = [strengths[b] for b in order]
    rows: slice | Tensor | None
    if order == list(range(batch)):
        rows = None
    elif order == list(range(order[0], order[-1] + 1)):
        rows = slice(order[0], order[-1] + 1)
    else:
        rows = torch.tensor(order, dtype=torch.long, device=weights.device)
    if all(v == values[0] for v in values):
        return _Group(rows, values[0])
    return _Group(rows, torch.tensor(values, dtype=weights.dtype, device=weights.device))


__all__ = [
    "STRATEGIES",
    "TEXT_ENCODERS",
    "UNET",
    "ActiveLoras",
    "Adapter",
    "LoadedLora",
    "LoraBatchError",
    "batched_loras",
    "remove_dispatchers",
    "repeat_rows",
    "text_encoder_wrapper",
    "text_rows",
    "unet_rows",
]
