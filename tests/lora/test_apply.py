"""The batched unmerged application equals merging each row's LoRAs into a copy of the weights.

The oracle (tests/lora/factory.merged_copy) merges W + s * (alpha / r) * up @ down from the
factors the test itself generated, into a deep copy of the module, and runs that copy; the
library's code path (placement, loading, hooks) is what is under test.
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

from .factory import KOHYA_DIFFUSERS, KOHYA_SGM, PEFT, make_lora, merged_copy

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def register(tmp_path, index, name, fake):
    path = fake.save(tmp_path / f"{name}.safetensors")
    info = inspect_file(path, name, index)
    return info, load_weights(info, index, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def loras(demo_model, index, tmp_path_factory):
    """Three LoRAs in three formats: kohya SGM with text encoders, a LoCon with lora_mid on the
    3x3 convs (kohya, diffusers names, no text encoders), and a PEFT file."""
    tmp = tmp_path_factory.mktemp("loras")
    fakes = {
        "style": make_lora(demo_model, seed=1, rank=4, alpha=2.0, naming=KOHYA_SGM),
        "locon": make_lora(
            demo_model, seed=2, rank=3, alpha=1.5, naming=KOHYA_DIFFUSERS, locon_mid=True, text_encoders=False
        ),
        "peft": make_lora(
            demo_model, seed=3, rank=2, naming=PEFT, unet=lambda path, module: "attentions" in path
        ),
    }
    return {name: (fake, *register(tmp, index, name, fake)) for name, fake in fakes.items()}


def unet_inputs(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(rows, 4, 16, 16, generator=g),
        timestep=torch.tensor([999.0, 999.0, 600.0, 600.0, 300.0, 300.0, 20.0, 20.0][:rows]),
        encoder_hidden_states=torch.randn(rows, 77, 96, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(rows, 64, generator=g),
            "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * rows),
        },
    )


def run_unet(unet, inputs):
    with torch.inference_mode():
        return unet(**inputs).sample


# Four requests, each two rows (cond, uncond): different LoRAs, strengths, a stack and none.
REQUESTS = [
    [("style", 1.0)],
    [],
    [("style", 0.5), ("locon", 0.8), ("peft", 1.3)],
    [("locon", -0.7)],
]


def loaded(loras, request, clip_strength=None):
    return [
        LoadedLora(loras[name][2], strength, strength if clip_strength is None else clip_strength)
        for name, strength in request
    ]


@pytest.mark.parametrize("strategy", ["auto", "group", "stack"])
def test_unet_rows_equal_merged_weights_per_request(demo_model, loras, strategy):
    inputs = unet_inputs(8)
    rows = unet_rows([loaded(loras, r) for r in REQUESTS])
    with batched_loras(demo_model.unet, UNET, rows, strategy=strategy) as active:
        batched = run_unet(demo_model.unet, inputs)
    assert active.layers == 134 and active.groups == 3
    base = run_unet(demo_model.unet, inputs)
    for i, request in enumerate(REQUESTS):
        merged = merged_copy(demo_model.unet, "unet", [(loras[name][0], s) for name, s in request])
        expected = run_unet(merged, inputs)
        torch.testing.assert_close(batched[2 * i : 2 * i + 2], expected[2 * i : 2 * i + 2], **TOLERANCE)
        if request:  # the check has teeth: each LoRA moves its rows well past the tolerance
            assert (batched[2 * i : 2 * i + 2] - base[2 * i : 2 * i + 2]).abs().max() > 0.05
    # The request without LoRAs is the base model's output, bit for bit.
    assert torch.equal(batched[2:4], base[2:4])


def test_auto_stacks_only_layers_where_the_stack_is_small(demo_model, loras):
    """"auto" stacks a layer's LoRAs where their factors are at most STACK_SHARE of its weight
    and groups them elsewhere; a second batch with the same LoRAs reuses the stacks, another
    set builds new ones."""
    inputs = unet_inputs(8)
    rows = unet_rows([loaded(loras, r) for r in REQUESTS])
    apply.remove_dispatchers(demo_model.unet)  # a clean slate: no stacks from earlier tests
    with batched_loras(demo_model.unet, UNET, rows):
        run_unet(demo_model.unet, inputs)
    stacked = {m: entry for m, entry in apply._stacks.items() if any(m is n for n in demo_model.unet.modules())}
    assert stacked, "no layer was stacked"
    for module, (layers, stack) in stacked.items():
        assert len(layers) > 1
        assert stack.up.numel() + stack.down.numel() <= apply.STACK_SHARE * module.weight.numel()
    # Layers with several LoRAs whose stack would be too large stayed grouped (say, the 32-wide convs).
    shared = {
        m for m in demo_model.unet.modules()
        if sum(m in apply._layers_by_module(loras[name][2], UNET, demo_model.unet) for name in ("style", "locon", "peft")) > 1
    }
    assert set(stacked) < shared
    with batched_loras(demo_model.unet, UNET, rows):
        run_unet(demo_model.unet, inputs)
    assert all(apply._stacks[m][1] is stack for m, (_, stack) in stacked.items())
    fewer = unet_rows([loaded(loras, [("style", 1.0), ("locon", 1.0)])])
    with batched_loras(demo_model.unet, UNET, fewer):
        run_unet(demo_model.unet, unet_inputs(2))
    # Where the PEFT LoRA was in the stack, the set changed: a new stack, or none (one LoRA left).
    changed = {m for m, (layers, _) in stacked.items() if len(layers) == 3}
    assert changed and all(m not in apply._stacks or apply._stacks[m][1] is not stacked[m][1] for m in changed)


def test_stacks_beyond_their_byte_budget_are_not_kept(demo_model, loras, monkeypatch):
    inputs = unet_inputs(8)
    rows = unet_rows([loaded(loras, r) for r in REQUESTS])
    apply.remove_dispatchers(demo_model.unet)
    with batched_loras(demo_model.unet, UNET, rows):
        expected = run_unet(demo_model.unet, inputs)
    kept = [stack.nbytes for m, (_, stack) in apply._stacks.items() if any(m is n for n in demo_model.unet.modules())]
    assert len(kept) > 2
    apply.remove_dispatchers(demo_model.unet)
    budget = apply.stack_bytes() + sum(sorted(kept)[:2])  # room for the two smallest stacks, not all
    monkeypatch.setattr(apply, "STACK_CACHE_BYTES", budget)
    with batched_loras(demo_model.unet, UNET, rows):
        out = run_unet(demo_model.unet, inputs)
    assert torch.equal(out, expected)  # a stack that is not kept still serves its forward
    assert 1 <= len([m for m in apply._stacks if any(m is n for n in demo_model.unet.modules())]) < len(kept)
    assert apply.stack_bytes() <= budget


def test_kept_stacks_do_not_keep_a_dropped_lora_alive(demo_model, index, tmp_path):
    """The LoRA cache frees an evicted LoRA by dropping it: a stack kept for the next step must
    not hold the LoRA's own layers (which hold their modules, the stack cache's keys)."""
    import gc
    import weakref

    weights = [
        register(tmp_path, index, f"small{i}", make_lora(demo_model, seed=10 + i, rank=2, naming=PEFT))[1]
        for i in range(3)
    ]
    rows = unet_rows([[LoadedLora(w, 1.0, 1.0)] for w in weights])
    with batched_loras(demo_model.unet, UNET, rows):
        run_unet(demo_model.unet, unet_inputs(6))
    assert any(len(layers) == 3 for layers, _ in apply._stacks.values())  # they were stacked
    layer = weakref.ref(next(iter(weights[0].layers[UNET].values())))
    del weights, rows
    gc.collect()
    assert layer() is None


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


def test_same_lora_at_two_strengths_in_one_batch(demo_model, loras):
    """One LoRA at different strengths for different requests shares one pass but keeps each
    request's strength (what PEFT's global per-adapter scale cannot do)."""
    inputs = unet_inputs(4)
    rows = unet_rows([loaded(loras, [("style", 0.3)]), loaded(loras, [("style", 1.7)])])
    with batched_loras(demo_model.unet, UNET, rows) as active:
        out = run_unet(demo_model.unet, inputs)
    assert active.groups == 1
    for i, strength in enumerate((0.3, 1.7)):
        expected = run_unet(merged_copy(demo_model.unet, "unet", [(loras["style"][0], strength)]), inputs)
        torch.testing.assert_close(out[2 * i : 2 * i + 2], expected[2 * i : 2 * i + 2], **TOLERANCE)


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
    # Equal up to the reduction order of another thread count; the LoRA itself moves it far more.
    assert torch.allclose(seen["out"], base, atol=1e-5)
    assert (patched - base).abs().max() > 1e-2


def encode(encoder, ids):
    with torch.inference_mode():
        output = encoder(ids, output_hidden_states=True)
    return output.hidden_states[-2], getattr(output, "text_embeds", None)


@pytest.mark.parametrize("component", [TE1, TE2])
def test_text_encoder_rows_are_prompt_windows(demo_model, loras, component):
    """Request 0 has two 77-token windows, request 1 one, request 2 two: each window row gets its
    request's LoRAs at strength_clip (here different from strength_model)."""
    encoder = demo_model.text_encoders[0 if component == TE1 else 1]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 400, (5, 77), generator=g)
    requests = [
        loaded(loras, [("style", 9.0)], clip_strength=0.8),
        [],
        loaded(loras, [("style", 1.0), ("peft", 1.0)], clip_strength=-0.6),
    ]
    windows = [2, 1, 2]
    with batched_loras(encoder, component, text_rows(requests, windows)) as active:
        hidden, pooled = encode(encoder, ids)
    assert active.groups == 2
    base_hidden, _ = encode(encoder, ids)
    expectations = [
        (slice(0, 2), [("style", 0.8)]),
        (slice(2, 3), []),
        (slice(3, 5), [("style", -0.6), ("peft", -0.6)]),
    ]
    for rows, merges in expectations:
        merged = merged_copy(encoder, component, [(loras[name][0], s) for name, s in merges])
        expected_hidden, expected_pooled = encode(merged, ids)
        torch.testing.assert_close(hidden[rows], expected_hidden[rows], **TOLERANCE)
        if pooled is not None:
            torch.testing.assert_close(pooled[rows], expected_pooled[rows], **TOLERANCE)
        if merges:
            assert (hidden[rows] - base_hidden[rows]).abs().max() > 0.05


def test_text_encoder_wrapper_maps_row_owners(demo_model, loras):
    """The wrap_forward text.py calls: (encoder index, encoder, owner of every row)."""
    by_owner = {"a": loaded(loras, [("style", 1.0)], clip_strength=0.5), "b": []}
    wrap = text_encoder_wrapper(by_owner)
    encoder = demo_model.text_encoders[1]
    ids = torch.randint(0, 400, (3, 77), generator=torch.Generator().manual_seed(6))
    with wrap(1, encoder, ["a", "b", "a"]):
        hidden, _ = encode(encoder, ids)
    expected, _ = encode(merged_copy(encoder, TE2, [(loras["style"][0], 0.5)]), ids)
    base, _ = encode(encoder, ids)
    torch.testing.assert_close(hidden[[0, 2]], expected[[0, 2]], **TOLERANCE)
    assert torch.equal(hidden[1], base[1])


def test_a_lora_without_text_encoder_parts_leaves_the_encoder_alone(demo_model, loras):
    encoder = demo_model.text_encoders[0]
    ids = torch.randint(0, 400, (1, 77), generator=torch.Generator().manual_seed(8))
    base, _ = encode(encoder, ids)
    with batched_loras(encoder, TE1, text_rows([loaded(loras, [("locon", 1.0)])], [1])) as active:
        hidden, _ = encode(encoder, ids)
    assert active.layers == 0 and active.groups == 0
    assert torch.equal(hidden, base)


def test_weights_placed_on_one_tree_are_refused_on_another(demo_model, loras):
    message = "LoRA 'style': its te1 layers were placed on another module tree"
    with (
        pytest.raises(ValueError, match=message),
        batched_loras(demo_model.text_encoders[1], TE1, [[(loras["style"][2], 1.0)]]),
    ):
        pass


def test_removing_the_dispatchers_and_coming_back(demo_model, loras):
    from t2i.lora.apply import remove_dispatchers

    inputs = unet_inputs(2)
    rows = unet_rows([loaded(loras, [("style", 1.0)])])
    with batched_loras(demo_model.unet, UNET, rows):
        first = run_unet(demo_model.unet, inputs)
    assert remove_dispatchers(demo_model.unet) == 134
    assert not any(module._forward_hooks for module in demo_model.unet.modules())
    with batched_loras(demo_model.unet, UNET, rows):
        again = run_unet(demo_model.unet, inputs)
    assert torch.equal(again, first)


def test_with_the_engines_prompt_encoder(demo_model, loras):
    """engine/text.encode_prompts with text_encoder_wrapper as its wrap_forward: each prompt's
    conditioning equals encoding it with that request's LoRAs merged into both encoders."""
    import dataclasses
    import inspect

    text = pytest.importorskip("t2i.engine.text")
    if "wrap_forward" not in inspect.signature(text.encode_prompts).parameters:
        pytest.skip("engine/text.encode_prompts has no wrap_forward hook yet")
    prompts = ["masterpiece, 1girl, pink hair " * 12, "worst quality", "sky clouds sunset"]  # 2, 1, 1 windows
    prepared = [text.prepare_prompt(demo_model, p) for p in prompts]
    by_owner = {
        "r0": loaded(loras, [("style", 1.0)], clip_strength=0.7),
        "r2": loaded(loras, [("peft", 1.0)], clip_strength=1.2),
    }
    owners = ["r0", "r1", "r2"]
    got = text.encode_prompts(
        demo_model, prepared, owners=owners, wrap_forward=text_encoder_wrapper(by_owner)
    )
    for i, owner in enumerate(owners):
        merges = [(loras[lora.weights.name][0], lora.strength_clip) for lora in by_owner.get(owner, [])]
        merged_model = dataclasses.replace(
            demo_model,
            text_encoders=tuple(
                merged_copy(encoder, component, merges)
                for encoder, component in zip(demo_model.text_encoders, (TE1, TE2))
            ),
        )
        (expected,) = text.encode_prompts(merged_model, [prepared[i]])
        torch.testing.assert_close(got[i].context, expected.context, **TOLERANCE)
        torch.testing.assert_close(got[i].pooled, expected.pooled, **TOLERANCE)
    plain = text.encode_prompts(demo_model, prepared)
    assert (got[0].context - plain[0].context).abs().max() > 0.05
    assert torch.equal(got[1].context, plain[1].context)
