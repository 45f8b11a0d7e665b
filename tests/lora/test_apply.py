"""The batched unmerged application equals merging each row's LoRAs into a copy of the weights.

The oracle (tests/lora/factory.merged_copy) merges W + s * (alpha / r) * up @ down from the
factors the test itself generated, into a deep copy of the module, and runs that copy; the
library's code path (placement, loading, hooks) is what is under test.

The comparisons run in float64 (the demo model converted, LoRAs with factors on an exact grid,
see factory.on_grid): both sides then differ by float64 rounding alone, bounded by
tests/support/tolerance.reduction_bound in its worst case, while a wrong strength, a missing
LoRA or a swapped row moves the result by more than 100 times that bound
(test_the_comparison_with_the_merged_oracle_can_fail).
"""

from __future__ import annotations

import threading

import pytest
import torch

from t2i.lora import (
    TE1,
    TE2,
    UNET,
    LoadedLora,
    LoraBatchError,
    batched_loras,
    inspect_file,
    load_weights,
    text_rows,
    unet_rows,
)
from t2i.lora import apply
from t2i.lora.apply import text_encoder_wrapper

from tests.support.tolerance import EPS32, EPS64, max_abs, max_diff, network_reductions, reduction_bound

from .factory import KOHYA_DIFFUSERS, KOHYA_SGM, PEFT, make_lora, merged_copy

LATENT = 16  # unet_inputs' latent side: attention and norms sum over LATENT**2 positions
TOKENS = 77  # a text encoder's window


def tolerance64(module, positions: int, *expected: torch.Tensor) -> float:
    """Worst-case float64 rounding bound for one forward of `module` on these outputs."""
    depth, terms = network_reductions(module, positions=positions)
    return reduction_bound(eps=EPS64, magnitude=max_abs(*expected), terms=terms, depth=depth, worst_case=True)


def assert_within(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    difference = max_diff(got, expected)
    assert difference <= tolerance, f"max |difference| {difference:.3e} over the rounding bound {tolerance:.3e}"


def register(tmp_path, index, name, fake):
    path = fake.save(tmp_path / f"{name}.safetensors")
    info = inspect_file(path, name, index)
    return info, load_weights(info, index, torch.device("cpu"), torch.float32)


def three_loras(model, index, folder, dtype, exact=False):
    """Three LoRAs in three formats: kohya SGM with text encoders, a LoCon with lora_mid on the
    3x3 convs (kohya, diffusers names, no text encoders), and a PEFT file. Their alpha / r are
    0.5, 0.5 and 1: powers of two, so folding them into `up` is exact on exact factors."""
    fakes = {
        "style": make_lora(model, seed=1, rank=4, alpha=2.0, naming=KOHYA_SGM, exact=exact),
        "locon": make_lora(
            model, seed=2, rank=3, alpha=1.5, naming=KOHYA_DIFFUSERS, locon_mid=True, text_encoders=False, exact=exact
        ),
        "peft": make_lora(
            model, seed=3, rank=2, naming=PEFT, unet=lambda path, module: "attentions" in path, exact=exact
        ),
    }
    result = {}
    for name, fake in fakes.items():
        info = inspect_file(fake.save(folder / f"{name}.safetensors"), name, index)
        result[name] = (fake, info, load_weights(info, index, torch.device("cpu"), dtype))
    return result


@pytest.fixture(scope="module")
def loras(demo_model, index, tmp_path_factory):
    """The three LoRAs on the float32 demo model (for the tests that compare bit for bit)."""
    return three_loras(demo_model, index, tmp_path_factory.mktemp("loras"), torch.float32)


@pytest.fixture(scope="module")
def loras64(demo_model64, index64, tmp_path_factory):
    """The three LoRAs, exact, on the float64 demo model (for the comparisons with the oracle)."""
    return three_loras(demo_model64, index64, tmp_path_factory.mktemp("loras64"), torch.float64, exact=True)


def unet_inputs(rows: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(rows, 4, LATENT, LATENT, generator=g).to(dtype),
        timestep=torch.tensor([999.0, 999.0, 600.0, 600.0, 300.0, 300.0, 20.0, 20.0][:rows]),
        encoder_hidden_states=torch.randn(rows, TOKENS, 96, generator=g).to(dtype),
        added_cond_kwargs={
            "text_embeds": torch.randn(rows, 64, generator=g).to(dtype),
            "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * rows, dtype=dtype),
        },
    )


def run_unet(unet, inputs):
    with torch.inference_mode():
        return unet(**inputs).sample


# Four requests, each two rows (cond, uncond): different LoRAs, strengths, a stack and none.
# Strengths have at most 3 significant bits, so scaling exact factors by them is exact in any
# precision the code under test may choose (factory.on_grid).
REQUESTS = [
    [("style", 1.0)],
    [],
    [("style", 0.5), ("locon", 0.75), ("peft", 1.25)],
    [("locon", -0.75)],
]


def loaded(loras, request, clip_strength=None):
    return [
        LoadedLora(loras[name][2], strength, strength if clip_strength is None else clip_strength)
        for name, strength in request
    ]


def merged_unet_output(model, loras, request, inputs):
    return run_unet(merged_copy(model.unet, "unet", [(loras[name][0], s) for name, s in request]), inputs)


@pytest.mark.parametrize("strategy", apply.STRATEGIES)
def test_unet_rows_equal_merged_weights_per_request(demo_model64, loras64, strategy):
    model, loras = demo_model64, loras64
    inputs = unet_inputs(8, dtype=torch.float64)
    rows = unet_rows([loaded(loras, r) for r in REQUESTS])
    with batched_loras(model.unet, UNET, rows, strategy=strategy) as active:
        batched = run_unet(model.unet, inputs)
    assert active.layers == 134
    base = run_unet(model.unet, inputs)
    for i, request in enumerate(REQUESTS):
        expected = merged_unet_output(model, loras, request, inputs)[2 * i : 2 * i + 2]
        assert_within(batched[2 * i : 2 * i + 2], expected, tolerance64(model.unet, LATENT**2, expected))
        if request:  # each LoRA moves its rows well past the tolerance
            assert max_diff(batched[2 * i : 2 * i + 2], base[2 * i : 2 * i + 2]) > 0.05
    # The request without LoRAs is the base model's output, bit for bit.
    assert torch.equal(batched[2:4], base[2:4])


def test_the_comparison_with_the_merged_oracle_can_fail(demo_model64, loras64):
    """An oracle 1% off in one strength, missing one LoRA, or for another request's rows is
    more than 100 times the tolerance away from the batched result: the tests above would see
    any of these mistakes in the code under test."""
    model, loras = demo_model64, loras64
    inputs = unet_inputs(8, dtype=torch.float64)
    with batched_loras(model.unet, UNET, unet_rows([loaded(loras, r) for r in REQUESTS])):
        batched = run_unet(model.unet, inputs)
    stacked = REQUESTS[2]  # style 0.5, locon 0.75, peft 1.25
    wrong = {
        "strength 1% off": [(name, s * 1.01 if name == "locon" else s) for name, s in stacked],
        "a LoRA missing": [(name, s) for name, s in stacked if name != "peft"],
    }
    rows = slice(4, 6)
    right = merged_unet_output(model, loras, stacked, inputs)[rows]
    tolerance = tolerance64(model.unet, LATENT**2, right)
    assert max_diff(batched[rows], right) <= tolerance
    for mistake, request in wrong.items():
        expected = merged_unet_output(model, loras, request, inputs)[rows]
        assert max_diff(batched[rows], expected) > 100 * tolerance, mistake
    # A swapped row: request 0's rows computed with request 3's LoRAs.
    other = merged_unet_output(model, loras, REQUESTS[3], inputs)
    assert max_diff(batched[0:2], other[0:2]) > 100 * tolerance64(model.unet, LATENT**2, other[0:2])


def test_auto_stacks_a_sets_loras_only_where_the_stack_is_small(demo_model, loras):
    """"auto" stacks the LoRAs of one row set on a layer where their factors are at most
    STACK_SHARE of its weight, and runs them one by one elsewhere. A stack holds that set's LoRAs
    only (never a batch-mate's), the next forward with the same set reuses it, and another set
    (here the same files at other strengths) gets stacks of its own."""
    inputs = unet_inputs(8)
    rows = unet_rows([loaded(loras, r) for r in REQUESTS])
    apply._stacks.clear()  # a clean slate: no stacks from earlier tests
    with batched_loras(demo_model.unet, UNET, rows, strategy="auto"):
        run_unet(demo_model.unet, inputs)
    three = [loras[name][2] for name, _ in REQUESTS[2]]  # request 2's set: style, locon, peft
    stacked = {}
    for module in demo_model.unet.modules():
        path = _path_of(demo_model.unet, module)
        layers = [w.layers[UNET][path] for w in three if path in w.layers[UNET]]
        kept = apply._stacks.of(module)
        if len(layers) < 2:
            assert not kept  # one LoRA of the set on this layer: nothing to stack
            continue
        cheap = apply._stack_is_cheap(module, [(layer, 1.0) for layer in layers])
        assert len(kept) == (1 if cheap else 0), _path_of(demo_model.unet, module)
        if kept:
            (stack,) = kept
            assert stack.rank == sum(layer.rank for layer in layers)  # the set's own ranks, nobody else's
            stacked[module] = stack
    assert stacked, "no layer was stacked"
    assert len(stacked) < sum(1 for m in demo_model.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))), (
        "every layer was stacked: the size rule was not applied")
    with batched_loras(demo_model.unet, UNET, rows, strategy="auto"):
        run_unet(demo_model.unet, inputs)
    assert all(apply._stacks.of(m) == [stack] for m, stack in stacked.items())  # reused, not rebuilt
    other = unet_rows([loaded(loras, [("style", 1.0), ("locon", 1.0), ("peft", 1.0)])])
    with batched_loras(demo_model.unet, UNET, other, strategy="auto"):
        run_unet(demo_model.unet, unet_inputs(2))
    assert all(len(apply._stacks.of(m)) == 2 for m in stacked)  # its own stacks, beside the first set's


def _path_of(tree, module) -> str:
    for path, candidate in tree.named_modules():
        if candidate is module:
            return path
    raise LookupError(module)


def test_stacks_beyond_their_byte_budget_are_not_kept(demo_model, loras, monkeypatch):
    """Stacks are kept under STACK_CACHE_BYTES: what does not fit serves its forward only, and a
    new set's stacks push out the least recently used ones that the current forward does not use."""
    inputs = unet_inputs(8)
    rows = unet_rows([loaded(loras, r) for r in REQUESTS])
    apply._stacks.clear()
    with batched_loras(demo_model.unet, UNET, rows, strategy="auto"):
        expected = run_unet(demo_model.unet, inputs)
    everything = apply.stack_bytes()
    count = len(apply._stacks)
    assert count > 2
    apply._stacks.clear()
    monkeypatch.setattr(apply, "STACK_CACHE_BYTES", everything // 2)
    with batched_loras(demo_model.unet, UNET, rows, strategy="auto"):
        out = run_unet(demo_model.unet, inputs)
    assert torch.equal(out, expected)  # a stack that is not kept still serves its forward, unchanged
    assert 1 <= len(apply._stacks) < count and apply.stack_bytes() <= everything // 2
    first_set = set(apply._stacks._entries)
    # Another set (other strengths): its stacks evict the first set's, which this forward does not use.
    other = unet_rows([loaded(loras, [(name, 0.5) for name, _ in REQUESTS[2]])])
    with batched_loras(demo_model.unet, UNET, other, strategy="auto"):
        run_unet(demo_model.unet, unet_inputs(2))
    assert apply.stack_bytes() <= everything // 2
    assert not first_set & set(apply._stacks._entries)


def test_a_dropped_lora_takes_its_stacks_and_hooks_with_it(data_dir, tmp_path):
    """The LoRA cache frees an evicted LoRA by dropping it: nothing here may keep it alive (a kept
    stack holds no reference to its layers), its stacks go with it, and so do the forward hooks of
    the modules no other live LoRA patches. A model with no LoRA alive runs without hooks."""
    import gc
    import weakref

    from t2i.lora import LayerIndex, hooked_modules
    from t2i.models.demo import demo_spec
    from t2i.models.loader import load_model

    model = load_model(demo_spec(data_dir), torch.device("cpu"))  # its own: no other test's LoRAs on it
    index = LayerIndex.from_model(model)
    weights = [
        register(tmp_path, index, f"small{i}", make_lora(model, seed=10 + i, rank=2, naming=PEFT))[1]
        for i in range(3)
    ]
    inputs = unet_inputs(2)
    before = run_unet(model.unet, inputs)
    rows = unet_rows([[LoadedLora(w, 1.0, 1.0) for w in weights]])  # one request with all three
    with batched_loras(model.unet, UNET, rows, strategy="auto"):
        first = run_unet(model.unet, inputs)
    patched = len(weights[0].layers[UNET])
    assert hooked_modules(model.unet) == patched
    assert any(apply._stacks.of(module) for module in model.unet.modules())  # they were stacked
    layer = weakref.ref(next(iter(weights[0].layers[UNET].values())))
    del weights, rows
    gc.collect()
    assert layer() is None
    assert not any(apply._stacks.of(module) for module in model.unet.modules())
    assert hooked_modules(model.unet) == 0
    assert not any(module._forward_hooks for module in model.unet.modules())
    assert torch.equal(run_unet(model.unet, inputs), before)
    # New weights of the same files put the hooks back, and the result is the same.
    again = [register(tmp_path, index, f"small{i}", make_lora(model, seed=10 + i, rank=2, naming=PEFT))[1]
             for i in range(3)]
    with batched_loras(model.unet, UNET, unet_rows([[LoadedLora(w, 1.0, 1.0) for w in again]]), strategy="auto"):
        assert torch.equal(run_unet(model.unet, inputs), first)
    assert hooked_modules(model.unet) == patched


def test_nothing_is_applied_after_the_block(demo_model, loras):
    inputs = unet_inputs(2)
    before = run_unet(demo_model.unet, inputs)
    with batched_loras(demo_model.unet, UNET, unet_rows([loaded(loras, [("style", 1.0)])])):
        inside = run_unet(demo_model.unet, inputs)
    assert not torch.equal(inside, before)
    assert torch.equal(run_unet(demo_model.unet, inputs), before)  # the weights were never touched


def test_strength_zero_is_no_lora(demo_model, loras):
    inputs = unet_inputs(4)
    base = run_unet(demo_model.unet, inputs)
    rows = unet_rows([loaded(loras, [("style", 0.0)]), loaded(loras, [("locon", 0.0), ("peft", 0.0)])])
    with batched_loras(demo_model.unet, UNET, rows) as active:
        out = run_unet(demo_model.unet, inputs)
    assert active.layers == 0
    assert torch.equal(out, base)


def test_same_lora_at_two_strengths_in_one_batch(demo_model64, loras64):
    """One LoRA at different strengths for different requests shares one pass but keeps each
    request's strength (what PEFT's global per-adapter scale cannot do)."""
    model, loras = demo_model64, loras64
    inputs = unet_inputs(4, dtype=torch.float64)
    strengths = (0.375, 1.75)  # few significant bits, as in REQUESTS
    rows = unet_rows([loaded(loras, [("style", s)]) for s in strengths])
    with batched_loras(model.unet, UNET, rows):
        out = run_unet(model.unet, inputs)
    for i, strength in enumerate(strengths):
        expected = merged_unet_output(model, loras, [("style", strength)], inputs)[2 * i : 2 * i + 2]
        assert_within(out[2 * i : 2 * i + 2], expected, tolerance64(model.unet, LATENT**2, expected))


def test_rows_must_match_the_batch(demo_model, loras):
    rows = unet_rows([loaded(loras, [("style", 1.0)])])  # 2 rows
    message = "unet layer time_embedding.linear_1 got a batch of 4 rows but the LoRA rows given were 2"
    with pytest.raises(LoraBatchError, match=message), batched_loras(demo_model.unet, UNET, rows):
        run_unet(demo_model.unet, unet_inputs(4))
    run_unet(demo_model.unet, unet_inputs(4))  # the failed block left no plan behind


def test_other_threads_do_not_see_the_loras(demo_model, loras):
    inputs = unet_inputs(2)
    base = run_unet(demo_model.unet, inputs)
    seen = {}
    with batched_loras(demo_model.unet, UNET, unet_rows([loaded(loras, [("style", 1.0)])])):
        worker = threading.Thread(target=lambda: seen.setdefault("out", run_unet(demo_model.unet, inputs)))
        worker.start()
        worker.join()
        patched = run_unet(demo_model.unet, inputs)
    # Equal up to the reduction order of another thread count (float32, one forward); the LoRA
    # itself moves it more than 100 times as far.
    depth, terms = network_reductions(demo_model.unet, positions=LATENT**2)
    tolerance = reduction_bound(eps=EPS32, magnitude=max_abs(base), terms=terms, depth=depth)
    assert max_diff(seen["out"], base) <= tolerance
    assert max_diff(patched, base) > 100 * tolerance


def encode(encoder, ids):
    with torch.inference_mode():
        output = encoder(ids, output_hidden_states=True)
    return output.hidden_states[-2], getattr(output, "text_embeds", None)


@pytest.mark.parametrize("component", [TE1, TE2])
def test_text_encoder_rows_are_prompt_windows(demo_model64, loras64, component):
    """Request 0 has two 77-token windows, request 1 one, request 2 two: each window row gets its
    request's LoRAs at strength_clip (here different from strength_model)."""
    loras = loras64
    encoder = demo_model64.text_encoders[0 if component == TE1 else 1]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 400, (5, 77), generator=g)
    requests = [
        loaded(loras, [("style", 9.0)], clip_strength=0.75),
        [],
        loaded(loras, [("style", 1.0), ("peft", 1.0)], clip_strength=-0.625),
    ]
    windows = [2, 1, 2]
    with batched_loras(encoder, component, text_rows(requests, windows)) as active:
        hidden, pooled = encode(encoder, ids)
    assert active.layers > 0
    base_hidden, _ = encode(encoder, ids)
    expectations = [
        (slice(0, 2), [("style", 0.75)]),
        (slice(2, 3), []),
        (slice(3, 5), [("style", -0.625), ("peft", -0.625)]),
    ]
    for rows, merges in expectations:
        merged = merged_copy(encoder, component, [(loras[name][0], s) for name, s in merges])
        expected_hidden, expected_pooled = encode(merged, ids)
        assert_within(hidden[rows], expected_hidden[rows], tolerance64(encoder, TOKENS, expected_hidden[rows]))
        if pooled is not None:
            assert_within(pooled[rows], expected_pooled[rows], tolerance64(encoder, TOKENS, expected_pooled[rows]))
        if merges:
            assert (hidden[rows] - base_hidden[rows]).abs().max() > 0.05


def test_text_encoder_wrapper_maps_row_owners(demo_model64, loras64):
    """The wrap_forward text.py calls: (encoder index, encoder, owner of every row)."""
    loras = loras64
    by_owner = {"a": loaded(loras, [("style", 1.0)], clip_strength=0.5), "b": []}
    wrap = text_encoder_wrapper(by_owner)
    encoder = demo_model64.text_encoders[1]
    ids = torch.randint(0, 400, (3, 77), generator=torch.Generator().manual_seed(6))
    with wrap(1, encoder, ["a", "b", "a"]):
        hidden, _ = encode(encoder, ids)
    expected, _ = encode(merged_copy(encoder, TE2, [(loras["style"][0], 0.5)]), ids)
    base, _ = encode(encoder, ids)
    assert_within(hidden[[0, 2]], expected[[0, 2]], tolerance64(encoder, TOKENS, expected[[0, 2]]))
    assert max_diff(hidden[[0, 2]], base[[0, 2]]) > 0.05
    assert torch.equal(hidden[1], base[1])


def test_a_lora_without_text_encoder_parts_leaves_the_encoder_alone(demo_model, loras):
    encoder = demo_model.text_encoders[0]
    ids = torch.randint(0, 400, (1, 77), generator=torch.Generator().manual_seed(8))
    base, _ = encode(encoder, ids)
    with batched_loras(encoder, TE1, text_rows([loaded(loras, [("locon", 1.0)])], [1])) as active:
        hidden, _ = encode(encoder, ids)
    assert active.layers == 0 and active.loras == 0 and active.sets == 0
    assert torch.equal(hidden, base)


def test_weights_placed_on_one_tree_are_refused_on_another(demo_model, loras):
    message = "LoRA 'style': its te1 layers were placed on another module tree"
    with (
        pytest.raises(ValueError, match=message),
        batched_loras(demo_model.text_encoders[1], TE1, [[(loras["style"][2], 1.0)]]),
    ):
        pass


def test_with_the_engines_prompt_encoder(demo_model64, loras64):
    """engine/text.encode_prompts with text_encoder_wrapper as its wrap_forward: each prompt's
    conditioning equals encoding it with that request's LoRAs merged into both encoders."""
    import dataclasses
    import inspect

    loras = loras64
    text = pytest.importorskip("t2i.engine.text")
    if "wrap_forward" not in inspect.signature(text.encode_prompts).parameters:
        pytest.skip("engine/text.encode_prompts has no wrap_forward hook yet")
    prompts = ["masterpiece, 1girl, pink hair " * 12, "worst quality", "sky clouds sunset"]  # 2, 1, 1 windows
    prepared = [text.prepare_prompt(demo_model64, p) for p in prompts]
    by_owner = {
        "r0": loaded(loras, [("style", 1.0)], clip_strength=0.75),
        "r2": loaded(loras, [("peft", 1.0)], clip_strength=1.25),
    }
    owners = ["r0", "r1", "r2"]
    got = text.encode_prompts(
        demo_model64, prepared, owners=owners, wrap_forward=text_encoder_wrapper(by_owner)
    )
    for i, owner in enumerate(owners):
        merges = [(loras[lora.weights.name][0], lora.strength_clip) for lora in by_owner.get(owner, [])]
        merged_model = dataclasses.replace(
            demo_model64,
            text_encoders=tuple(
                merged_copy(encoder, component, merges)
                for encoder, component in zip(demo_model64.text_encoders, (TE1, TE2))
            ),
        )
        (expected,) = text.encode_prompts(merged_model, [prepared[i]])
        # CLIP-L and CLIP-G run side by side; counting both encoders' reductions overcounts either's chain.
        depth, terms = network_reductions(*demo_model64.text_encoders, positions=TOKENS)
        for ours, theirs in ((got[i].context, expected.context), (got[i].pooled, expected.pooled)):
            bound = reduction_bound(eps=EPS64, magnitude=max_abs(theirs), terms=terms, depth=depth, worst_case=True)
            assert_within(ours, theirs, bound)
    plain = text.encode_prompts(demo_model64, prepared)
    assert (got[0].context - plain[0].context).abs().max() > 0.05
    assert torch.equal(got[1].context, plain[1].context)
