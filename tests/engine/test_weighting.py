"""Weights and embeddings on the demo model's real encoders, against a direct computation.

Every expected value is computed here straight from the encoders (penultimate hidden states of
hand-built id rows), then compared with what t2i.engine.text produces.
"""

import copy
import dataclasses
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

from t2i.engine.text import encode_prompts, prepare_prompt
from t2i.errors import InvalidArgument
from t2i.prompts.embeddings import load_embeddings

from ..support.tolerance import max_diff
from ..support.tolerance import text_tolerance

START, END = 49406, 49407
PADS = (END, 0)  # CLIP-L pads with the end token, CLIP-G with "!"


def row(tokens, pad):
    """A 77-token chunk: start, tokens, end, padding."""
    return [START, *tokens, END] + [pad] * (75 - len(tokens))


def hidden(encoder, rows):
    with torch.inference_mode():
        output = encoder(torch.tensor(rows), output_hidden_states=True)
    return output.hidden_states[-2], getattr(output, "text_embeds", None)


def token_ids(model, text):
    return model.tokenizers[0](text, add_special_tokens=False, verbose=False)["input_ids"]


def encode(model, *texts, **options):
    return encode_prompts(model, [prepare_prompt(model, t) for t in texts], **options)


def split(model, context):
    width = model.text_encoders[0].config.hidden_size
    return context[0, :, :width], context[0, :, width:]


def test_weights_interpolate_against_the_empty_prompt(demo_model):
    words, rest = token_ids(demo_model, "masterpiece"), token_ids(demo_model, ", 1girl")
    tokens = words + rest
    (result,) = encode(demo_model, "(masterpiece:1.3), 1girl")
    for encoder, pad, got in zip(demo_model.text_encoders, PADS, split(demo_model, result.context)):
        z, _ = hidden(encoder, [row(tokens, pad)])
        z_empty, _ = hidden(encoder, [row([], pad)])
        expected = z[0].clone()
        for j in range(1, 1 + len(words)):
            expected[j] = z_empty[0, j] + 1.3 * (z[0, j] - z_empty[0, j])
        tolerance = text_tolerance([encoder], z, z_empty, weight=1.3)
        assert max_diff(got, expected) <= tolerance
        assert max_diff(got, z[0]) > 100 * tolerance  # the weight did something
        # Positions of weight 1 are exactly as encoded.
        unweighted = [0, *range(1 + len(words), 77)]
        assert torch.equal(got[unweighted], z[0, unweighted])


def test_weight_zero_gives_the_empty_prompt_and_negative_weights_extrapolate(demo_model):
    word = token_ids(demo_model, "smile")
    (zero, negative) = encode(demo_model, "(smile:0)", "(smile:-0.5)")
    encoder = demo_model.text_encoders[0]
    z, _ = hidden(encoder, [row(word, END)])
    z_empty, _ = hidden(encoder, [row([], END)])
    first = split(demo_model, zero.context)[0]
    assert max_diff(first[1], z_empty[0, 1]) <= text_tolerance([encoder], z, z_empty, weight=0.0)
    extrapolated = z_empty[0, 1] - 0.5 * (z[0, 1] - z_empty[0, 1])
    assert max_diff(split(demo_model, negative.context)[0][1], extrapolated) <= text_tolerance(
        [encoder], z, z_empty, weight=-0.5
    )


def test_weights_in_a_later_chunk_use_the_same_position_of_the_empty_chunk(demo_model):
    x = token_ids(demo_model, "x")[0]
    (result,) = encode(demo_model, "x " * 75 + "(x x:0.5)")
    for encoder, pad, got in zip(demo_model.text_encoders, PADS, split(demo_model, result.context)):
        z, _ = hidden(encoder, [row([x] * 75, pad), row([x, x], pad)])
        z_empty, _ = hidden(encoder, [row([], pad)])
        assert got.shape[0] == 154
        assert torch.equal(got[:77], z[0])
        for j in (1, 2):
            expected = z_empty[0, j] + 0.5 * (z[1, j] - z_empty[0, j])
            assert max_diff(got[77 + j], expected) <= text_tolerance([encoder], z, z_empty, weight=0.5)
        assert torch.equal(got[80:], z[1, 3:])


def test_pooled_is_the_first_chunk_unweighted(demo_model):
    weighted, plain = encode(demo_model, "((masterpiece)), 1girl, " + "x " * 80, "masterpiece, 1girl, " + "x " * 80)
    _, pooled = hidden(demo_model.text_encoders[1], [row(token_ids(demo_model, "masterpiece, 1girl, " + "x " * 70), 0)])
    tolerance = text_tolerance(demo_model.text_encoders[1:], pooled)
    assert max_diff(weighted.pooled, pooled) <= tolerance
    assert max_diff(weighted.pooled, plain.pooled) <= tolerance
    weighted_tolerance = text_tolerance(demo_model.text_encoders, plain.context, weight=1.21)
    assert max_diff(weighted.context, plain.context) > 100 * weighted_tolerance


@pytest.fixture(scope="module")
def with_embeddings(demo_model, tmp_path_factory):
    """The demo model with two embeddings: 'tri' (3 vectors) and 'one' (1 vector)."""
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(7)
    vectors = {}
    for name, count in (("tri", 3), ("one", 1)):
        vectors[name] = [torch.randn(count, e.config.hidden_size, generator=generator) for e in demo_model.text_encoders]
        save_file({"clip_l": vectors[name][0], "clip_g": vectors[name][1]}, str(folder / f"{name}.safetensors"))
    embeddings = load_embeddings(folder, demo_model.text_encoders, demo_model.device, torch.float32)
    return dataclasses.replace(demo_model, embeddings=embeddings), vectors


def extended(encoder, extra):
    """A copy of `encoder` whose vocabulary has the rows `extra` appended (ids 49408, ...):
    an independent way to feed embedding vectors through the real model."""
    clone = copy.deepcopy(encoder)
    table = clone.get_input_embeddings()
    grown = torch.nn.Embedding(table.num_embeddings + extra.shape[0], table.embedding_dim)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([table.weight, extra]))
    clone.set_input_embeddings(grown)
    return clone


def test_embedding_vectors_replace_token_embeddings(with_embeddings):
    model, vectors = with_embeddings
    a, b = token_ids(model, "a"), token_ids(model, "b")
    (result,) = encode(model, "a embedding:tri b")
    for k, (encoder, pad, got) in enumerate(zip(model.text_encoders, PADS, split(model, result.context))):
        clone = extended(encoder, vectors["tri"][k])
        z, pooled = hidden(clone, [row([*a, 49408, 49409, 49410, *b], pad)])
        assert max_diff(got, z[0]) <= text_tolerance([encoder], z)
        if k == 1:
            assert max_diff(result.pooled, pooled) <= text_tolerance([encoder], pooled)
    # The vectors changed the encoding: compare with the bare text.
    (bare,) = encode(model, "a b")
    tolerance = text_tolerance(model.text_encoders, bare.context)
    assert max_diff(result.context[:, :3], bare.context[:, :3]) > 100 * tolerance


def test_embeddings_carry_their_weight(with_embeddings):
    model, vectors = with_embeddings
    (result,) = encode(model, "(embedding:one:1.4)")
    for k, (encoder, pad, got) in enumerate(zip(model.text_encoders, PADS, split(model, result.context))):
        z, _ = hidden(extended(encoder, vectors["one"][k]), [row([49408], pad)])
        z_empty, _ = hidden(encoder, [row([], pad)])
        expected = z_empty[0, 1] + 1.4 * (z[0, 1] - z_empty[0, 1])
        assert max_diff(got[1], expected) <= text_tolerance([encoder], z, z_empty, weight=1.4)
        assert torch.equal(got[2:], z[0, 2:])


def test_an_embedding_moves_whole_to_the_next_chunk(with_embeddings):
    model, vectors = with_embeddings
    x = token_ids(model, "x")[0]
    (result,) = encode(model, "x " * 73 + "embedding:tri")
    for k, (encoder, pad, got) in enumerate(zip(model.text_encoders, PADS, split(model, result.context))):
        z, _ = hidden(extended(encoder, vectors["tri"][k]), [row([x] * 73, pad), row([49408, 49409, 49410], pad)])
        assert max_diff(got, z.reshape(-1, z.shape[-1])) <= text_tolerance([encoder], z)


def test_unknown_embeddings_and_the_cap_are_refused_before_encoding(with_embeddings, demo_model):
    model, _ = with_embeddings
    with pytest.raises(InvalidArgument) as raised:
        prepare_prompt(model, "a, embedding:missing", "negativePrompt")
    assert raised.value.field == "negativePrompt" and "available: one, tri" in raised.value.message
    assert demo_model.spec.max_prompt_chunks == 8
    with pytest.raises(InvalidArgument, match="601 CLIP tokens.*at most 8 chunks"):
        prepare_prompt(demo_model, "x " * 601, "prompt")
    with pytest.raises(InvalidArgument, match=r"invalid prompt '\(x:inf\)'"):
        prepare_prompt(demo_model, "(x:inf)", "prompt")


@contextmanager
def counting_forwards(model):
    calls = []
    handles = [
        encoder.register_forward_pre_hook(lambda module, args, kwargs, k=k: calls.append((k, args[0].shape[0])), with_kwargs=True)
        for k, encoder in enumerate(model.text_encoders)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def test_a_mixed_batch_equals_each_prompt_alone_in_one_forward_per_encoder(with_embeddings):
    model, _ = with_embeddings
    prompts = [
        "(masterpiece:1.2), ((1girl)), pink hair",
        "",
        "1girl, masterpiece",
        "x " * 160,
        "a embedding:tri, (embedding:one:0.7) " + "detailed " * 80,
        "(worst quality:1.4), " + "y " * 100,
        "embedding:tri",
    ]
    prepared = [prepare_prompt(model, p) for p in prompts]
    with counting_forwards(model) as calls:
        together = encode_prompts(model, prepared)
    chunks = sum(len(p.chunks[0]) for p in prepared)
    # One forward per encoder, with one empty-prompt row for all the weighted prompts.
    assert calls == [(0, chunks + 1), (1, chunks + 1)]
    for prompt, joint in zip(prompts, together):
        (alone,) = encode(model, prompt)
        assert joint.context.shape == alone.context.shape
        # 1.4 is the largest weight in these prompts.
        tolerance = text_tolerance(model.text_encoders, alone.context, alone.pooled, weight=1.4)
        assert max_diff(joint.context, alone.context) <= tolerance, prompt
        assert max_diff(joint.pooled, alone.pooled) <= tolerance, prompt


def test_plain_prompts_add_no_encoder_work(with_embeddings):
    model, _ = with_embeddings
    prepared = [prepare_prompt(model, p) for p in ["1girl", "x " * 100, "a embedding:tri"]]
    assert [p.weighted for p in prepared] == [False, False, False]
    with counting_forwards(model) as calls:
        encode_prompts(model, prepared)
    assert calls == [(0, 4), (1, 4)]  # 1 + 2 + 1 chunks, no empty row


def test_the_forward_can_be_wrapped_with_the_owner_of_every_row(demo_model):
    texts = ["(a:1.2)", "x " * 80, "(b:0.8)", "c"]
    prepared = [prepare_prompt(demo_model, t) for t in texts]
    seen = []

    @contextmanager
    def wrap(index, encoder, row_owners):
        seen.append((index, encoder, list(row_owners), "entered"))
        yield
        seen.append("left")

    with counting_forwards(demo_model) as calls:
        results = encode_prompts(demo_model, prepared, owners=["r1", "r2", "r3", "r1"], wrap_forward=wrap)
    rows = ["r1", "r2", "r2", "r3", "r1", "r1", "r3"]  # chunks in order, then one empty row per weighted owner
    assert seen == [(0, demo_model.text_encoders[0], rows, "entered"), "left", (1, demo_model.text_encoders[1], rows, "entered"), "left"]
    assert calls == [(0, 7), (1, 7)]
    alone = encode(demo_model, *texts)
    for r, a in zip(results, alone):  # 1.2 is the largest weight in these prompts
        assert max_diff(r.context, a.context) <= text_tolerance(demo_model.text_encoders, a.context, weight=1.2)

