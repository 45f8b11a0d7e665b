"""Per-row LoRAs inside one batched forward, without touching the model's weights.

Every engine step runs ONE UNet forward for many requests, and each request brings its own
LoRAs and strengths. Merging into the weights would serialise requests; instead, for each
patched Linear/Conv2d layer, a forward hook adds to row b of the base output

    y_b = W x_b + sum_l s_bl * (alpha_l / r_l) * up_l(down_l(x_b))

where the base layer has already run once for the whole batch. Rows are samples: in the UNet
each request has two (cond and uncond) that both get the request's LoRAs; in a CLIP encoder
they are the prompt windows of each request (see `unet_rows` and `text_rows`).

A row's arithmetic depends on its own LoRAs only. Rows are grouped by their LoRA *set* (the
ordered list of (LoRA file, strength) a row uses, zero strengths dropped): rows with equal sets
share each call, and everything a row's deltas go through (which factors, in which order,
stacked or not) is decided from its set and the layer, never from what else is in the batch.
Grouping by LoRA file across sets, or stacking every LoRA of the batch into one factor pair,
would make a row's sums run over its batch-mates' ranks or in an order they decide, so the
same request gave another image in another batch. (The base layers themselves are one matmul
for the batch; CPU and GPU kernels may round a row differently at another batch size, which
no per-row rule can change.) A request's rows are consecutive, so a set's rows are read and
added through views; rows spread over the batch go through `index_select` / `index_add_`.

Strategies, per (layer, set) with several LoRAs on the layer:
- "each" (the default): one down/up pair per LoRA, added in the set's order (a LoCon's mid
  stays a separate conv, which is cheaper than its folded kernel);
- "stack": the set's factors concatenated into one rank stack with the strengths folded into
  `up`: one down/up pair per layer whatever the number of LoRAs, at the cost of a copy of the
  factors per set (kept for the next steps, see below);
- "auto": "stack" when the stacked factors hold at most STACK_SHARE of the base weight's
  elements, else "each".
A layer with one LoRA of the set runs one pair either way. On an SDXL-size UNet on a CPU the
three are within run-to-run noise of each other (`benchmarks/lora_sdxl.py`, docs/benchmarks.md
section "lora-sdxl"), so the default is the one that copies nothing; stacking saves kernel
calls, which may pay on a GPU, where that has not been measured yet.

Hooks. Each module a resident LoRA patches gets one forward hook (a dispatcher), installed when
a LoRA file's weights are first applied and removed when the last live LoRA patching the module
is freed (the LoRA cache evicted it and no request holds it), so a model with no LoRA resident
runs with no hooks at all. Entering `batched_loras` only records the batch's plan for the
current thread; the dispatcher applies the plans active on the thread that runs the forward,
so a forward on another thread (a text encode without LoRAs, say) sees none. Registering ~800
hooks per step instead costs 10-45 ms on a CPU; an idle dispatcher costs a few microseconds.

Stacks are kept between steps (a running batch's next step reuses them) under their own byte
budget, STACK_CACHE_BYTES, with a running count: a new stack evicts the least recently used
stacks that the current forward does not use; when it still does not fit it serves this
forward only. Stacks hold no reference to the LoRA layers they were built from (a LoRA the
cache evicts is freed at once, and its stacks with it).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .keys import TEXT_ENCODERS, UNET
from .weights import LayerLora, LoraWeights

Adapter = tuple[LoraWeights, float]  # a LoRA file's weights and the strength one row uses it at
STRATEGIES = ("auto", "each", "stack")
DEFAULT_STRATEGY = "each"  # measured: see the module docstring
# "auto": a layer's LoRAs (of one set) are stacked when their factors hold at most this share of
# the base weight's elements (the extra work a stack can cost, against the layer's own).
STACK_SHARE = 1.0
# Bytes of stacks kept between steps (copies of LoRA factors, outside the LoRA cache's budget).
STACK_CACHE_BYTES = 256 * 2**20


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


@dataclass(frozen=True)
class ActiveLoras:
    """What a `batched_loras` context applies (for logs, metrics and tests)."""

    rows: int
    component: str
    layers: int  # patched layers
    loras: int  # distinct LoRA files
    sets: int  # distinct LoRA sets (rows with equal sets share every call)


@dataclass(eq=False)
class _RowSet:
    """Rows that use the same LoRAs at the same strengths, and those LoRAs by module."""

    # None for every row; a slice when they are consecutive (a request's rows always are), which
    # reads and adds through views; else an index tensor.
    rows: slice | Tensor | None
    adapters: tuple[tuple[dict[nn.Module, LayerLora], float], ...]  # (layers by module, strength), the set's order

    def gather(self, x: Tensor) -> Tensor:
        if self.rows is None:
            return x
        if isinstance(self.rows, slice):
            return x[self.rows]
        return x.index_select(0, self.rows)

    def add_into(self, output: Tensor, delta: Tensor, alpha: float = 1.0) -> Tensor:
        if self.rows is None:
            return output.add_(delta, alpha=alpha)
        if isinstance(self.rows, slice):
            output[self.rows].add_(delta, alpha=alpha)
            return output
        return output.index_add_(0, self.rows, delta, alpha=alpha)


@dataclass(eq=False)
class _Plan:
    """One context's work: its row sets, and what each module does for each of them (decided at
    the module's first forward under this plan)."""

    component: str
    batch: int
    strategy: str
    sets: list[_RowSet]
    serial: int  # which forward this is, for the stack cache's recency
    routes: dict[nn.Module, list[tuple[_RowSet, str, object]]] = field(default_factory=dict)

    def route(self, module: nn.Module) -> list[tuple[_RowSet, str, object]]:
        """[(row set, "one" | "each" | "stack", what to apply)] for the sets that patch `module`."""
        route = self.routes.get(module)
        if route is None:
            route = []
            for row_set in self.sets:
                entries = [(by_module[module], s) for by_module, s in row_set.adapters if module in by_module]
                if not entries:
                    continue
                if len(entries) == 1:
                    route.append((row_set, "one", entries[0]))
                elif self.strategy == "stack" or (self.strategy == "auto" and _stack_is_cheap(module, entries)):
                    route.append((row_set, "stack", _stacks.get(module, entries, self.serial)))
                else:
                    route.append((row_set, "each", entries))
            self.routes[module] = route
        return route


# Per thread, the plans of the contexts it is inside: the dispatchers read them, so a forward on
# another thread sees none.
_local = threading.local()
# Dispatchers are installed and removed under this lock (loads, requests and frees may come
# from several threads); reentrant because a weakref callback may run inside it.
_install_lock = threading.RLock()
_dispatchers: weakref.WeakKeyDictionary[nn.Module, _Dispatcher] = weakref.WeakKeyDictionary()
# LoraWeights -> component -> {module: layer}: resolved once per live weights object; while it
# is in here, it counts as a user of each of those modules' dispatchers.
_by_module: weakref.WeakKeyDictionary[LoraWeights, dict[str, dict[nn.Module, LayerLora]]] = (
    weakref.WeakKeyDictionary()
)
_serials = itertools.count()


@contextmanager
def batched_loras(
    tree: nn.Module, component: str, rows: Sequence[Sequence[Adapter]], *, strategy: str = DEFAULT_STRATEGY
) -> Iterator[ActiveLoras]:
    """Apply each row's LoRAs during forwards of `tree` on this thread inside the block.

    `tree` is the module the weights' `component` ("unet", "te1" or "te2") was placed on;
    `rows[b]` lists (LoraWeights, strength) for row b of every batch the patched layers see
    (the same LoRA twice in a row adds its strengths); `strategy` is one of STRATEGIES (the
    module docstring). Nothing happens when no row has a LoRA for this component."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    batch = len(rows)
    by_set: dict[tuple, list[int]] = {}
    adapters_of: dict[tuple, list[tuple[LoraWeights, float]]] = {}
    for b, adapters in enumerate(rows):
        strengths: dict[int, list] = {}  # id(weights) -> [weights, summed strength], in first-use order
        for weights, strength in adapters:
            if weights.layers.get(component):
                strengths.setdefault(id(weights), [weights, 0.0])[1] += float(strength)
        row_set = [(weights, s) for weights, s in strengths.values() if s != 0.0]  # strength 0: absent
        if row_set:
            key = tuple((id(weights), s) for weights, s in row_set)
            by_set.setdefault(key, []).append(b)
            adapters_of[key] = row_set
    if not by_set:
        yield ActiveLoras(batch, component, 0, 0, 0)
        return
    sets = [
        _RowSet(_rows(members, batch, adapters_of[key][0][0].device),
                tuple((_layers_by_module(weights, component, tree), s) for weights, s in adapters_of[key]))
        for key, members in by_set.items()
    ]
    plan = _Plan(component, batch, strategy, sets, next(_serials))
    plans = _local.__dict__.setdefault("plans", [])
    plans.append(plan)
    try:
        patched = {id(by_module): by_module for row_set in sets for by_module, _ in row_set.adapters}
        layers = len(set().union(*patched.values()))
        yield ActiveLoras(batch, component, layers, len(patched), len(sets))
    finally:
        plans.remove(plan)


def _rows(members: list[int], batch: int, device: torch.device) -> slice | Tensor | None:
    if len(members) == batch:
        return None
    if members == list(range(members[0], members[-1] + 1)):
        return slice(members[0], members[-1] + 1)
    return torch.tensor(members, dtype=torch.long, device=device)


def _layers_by_module(weights: LoraWeights, component: str, tree: nn.Module) -> dict[nn.Module, LayerLora]:
    root = weights.roots.get(component)
    if root is not None and root is not tree:
        raise ValueError(
            f"LoRA {weights.name!r}: its {component} layers were placed on another module tree than the one given"
        )
    resolved = _by_module.get(weights)
    by_module = resolved.get(component) if resolved is not None else None
    if by_module is not None:
        return by_module
    with _install_lock:
        resolved = _by_module.get(weights)
        if resolved is None:
            resolved = _by_module[weights] = {}
            # When the weights are freed, their modules lose a user (and, the last one, the hook).
            weakref.finalize(weights, _release_modules, resolved)
        if component not in resolved:
            by_module = {}
            for path, layer in weights.layers[component].items():
                module = layer.module if layer.module is not None else tree.get_submodule(path)
                by_module[module] = layer
                dispatcher = _dispatchers.get(module)
                if dispatcher is None:
                    dispatcher = _dispatchers[module] = _Dispatcher(module, path)
                dispatcher.users += 1
            resolved[component] = by_module
        return resolved[component]


def _release_modules(resolved: dict[str, dict[nn.Module, LayerLora]]) -> None:
    """A LoRA's weights were freed: each module it patched has one user less; the last takes the hook."""
    with _install_lock:
        for by_module in resolved.values():
            for module in by_module:
                dispatcher = _dispatchers.get(module)
                if dispatcher is None:
                    continue
                dispatcher.users -= 1
                if dispatcher.users <= 0:
                    dispatcher.handle.remove()
                    del _dispatchers[module]
        resolved.clear()


def hooked_modules(tree: nn.Module) -> int:
    """How many modules of `tree` carry a LoRA dispatcher now (0 once no LoRA for it is alive)."""
    with _install_lock:
        return sum(1 for module in tree.modules() if module in _dispatchers)


class _Dispatcher:
    """The forward hook of one patched module: adds the deltas of the plans active on this thread."""

    __slots__ = ("handle", "path", "users", "__weakref__")

    def __init__(self, module: nn.Module, path: str) -> None:
        self.path = path
        self.users = 0  # live LoRA weights that patch the module
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        plans = getattr(_local, "plans", None)
        if not plans:
            return None
        x = args[0]
        for plan in plans:
            route = plan.route(module)
            if route and x.shape[0] != plan.batch:
                raise LoraBatchError(
                    f"{plan.component} layer {self.path} got a batch of {x.shape[0]} rows but the LoRA rows given "
                    f"were {plan.batch}; give one LoRA set per row of the batch the module sees"
                )
            for row_set, kind, what in route:
                xs = row_set.gather(x)
                if kind == "stack":  # strengths are folded into the stack's up factor
                    output = row_set.add_into(output, _delta(what, xs, output.dtype))
                elif kind == "one":
                    layer, strength = what
                    output = row_set.add_into(output, _delta(layer, xs, output.dtype), strength)
                else:
                    for layer, strength in what:  # the set's order, whatever the batch holds
                        output = row_set.add_into(output, _delta(layer, xs, output.dtype), strength)
        return output


def _delta(layer: LayerLora, x: Tensor, dtype: torch.dtype) -> Tensor:
    return layer.project_up(layer.project_down(x.to(layer.down.dtype))).to(dtype)


def _stack_is_cheap(module: nn.Module, entries: list[tuple[LayerLora, float]]) -> bool:
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


def _build_stack(entries: list[tuple[LayerLora, float]]) -> LayerLora:
    first = entries[0][0]
    return LayerLora(
        down=torch.cat([_folded_down(layer) for layer, _ in entries]),
        # The set's strengths go into up: rows of one set share them, so the stack is the set's own.
        up=torch.cat([(layer.up.float() * strength).to(layer.up.dtype) for layer, strength in entries], dim=1),
        stride=first.stride,
        padding=first.padding,
        dilation=first.dilation,
    )


class _StackCache:
    """Stacks by (module, LoRA layers, strengths), least recently used first, under a byte budget.

    Entries hold weak references to the layers (a LayerLora holds its module, and the LoRA cache
    must be able to free an evicted LoRA); when one of them dies the entry goes with it."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple, tuple[LayerLora, int]] = OrderedDict()  # key -> (stack, last serial)
        self._refs: dict[tuple, tuple[weakref.ref, ...]] = {}
        self.bytes = 0
        self._lock = threading.RLock()

    def get(self, module: nn.Module, entries: list[tuple[LayerLora, float]], serial: int) -> LayerLora:
        key = (id(module), *((id(layer), strength) for layer, strength in entries))
        with self._lock:
            found = self._entries.get(key)
            if found is not None and all(ref() is layer for ref, (layer, _) in zip(self._refs[key], entries)):
                self._entries[key] = (found[0], serial)
                self._entries.move_to_end(key)
                return found[0]
            if found is not None:  # ids reused by new objects: a stale entry
                self._drop(key)
        stack = _build_stack(entries)
        with self._lock:
            self._make_room(stack.nbytes, serial)
            if self.bytes + stack.nbytes <= STACK_CACHE_BYTES:
                self._entries[key] = (stack, serial)
                self._refs[key] = tuple(weakref.ref(layer, lambda _, key=key: self._dead(key)) for layer, _ in entries)
                self.bytes += stack.nbytes
        return stack

    def _make_room(self, nbytes: int, serial: int) -> None:
        """Evict least recently used stacks that this forward does not use until `nbytes` fit."""
        for key in list(self._entries):
            if self.bytes + nbytes <= STACK_CACHE_BYTES:
                return
            if self._entries[key][1] != serial:
                self._drop(key)

    def _dead(self, key: tuple) -> None:
        with self._lock:
            if key in self._entries:
                self._drop(key)

    def _drop(self, key: tuple) -> None:
        stack, _ = self._entries.pop(key)
        self._refs.pop(key, None)
        self.bytes -= stack.nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def of(self, module: nn.Module) -> list[LayerLora]:
        """The stacks kept for `module` (for tests and debugging)."""
        with self._lock:
            return [stack for key, (stack, _) in self._entries.items() if key[0] == id(module)]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._refs.clear()
            self.bytes = 0


_stacks = _StackCache()


def stack_bytes() -> int:
    """Bytes of the stacks kept between steps."""
    return _stacks.bytes


__all__ = [
    "STRATEGIES",
    "TEXT_ENCODERS",
    "UNET",
    "ActiveLoras",
    "Adapter",
    "LoadedLora",
    "LoraBatchError",
    "batched_loras",
    "hooked_modules",
    "repeat_rows",
    "stack_bytes",
    "text_encoder_wrapper",
    "text_rows",
    "unet_rows",
]
