"""Prompts read by A1111's rules on the demo model's real encoders, against a direct computation.

The expected values are computed here from the encoders (penultimate hidden states of hand-built
id rows) and A1111's documented rules: Original emphasis per chunk and per encoder, BREAK, an
empty negative prompt as zeros, <lora:> tags as LoRAs. A request whose prompt has no A1111-only
syntax and no weights encodes exactly as the ComfyUI reading does.
"""

import dataclasses

import pytest
import torch

from t2i.domain import GenerateRequest, LoraSpec
from t2i.engine.engine import with_lora_tags
from t2i.engine.text import encode_prompts, prepare_prompt
from t2i.errors import InvalidArgument
from t2i.prompts.a1111 import LoraTag

from ..support.tolerance import max_diff, text_tolerance
from .test_weighting import PADS, hidden, row, split, token_ids, with_embeddings  # noqa: F401 (a fixture)


def a1111(model, *texts, field="prompt"):
    return encode_prompts(model, [prepare_prompt(model, t, field, syntax="a1111") for t in texts])


def test_round_brackets_scale_and_restore_the_mean(demo_model):
    word, rest = token_ids(demo_model, "masterpiece"), token_ids(demo_model, ", 1girl")
    (result,) = a1111(demo_model, "(masterpiece), 1girl")
    for encoder, pad, got in zip(demo_model.text_encoders, PADS, split(demo_model, result.context)):
        z, _ = hidden(encoder, [row(word + rest, pad)])
        z = z[0].float()
        w = torch.ones(77)
        w[1 : 1 + len(word)] = 1.1
        weighted = z * w[:, None]
        expected = weighted * (z.mean() / weighted.mean())
        tolerance = text_tolerance([encoder], z, z, weight=1.1)
        assert max_diff(got, expected) <= tolerance
        # Not ComfyUI's rule: the unweighted positions move too (the mean is restored), by
        # (ratio - 1) of their size; here one word of 77 positions is weighted, so it is small.
        ratio = z.mean() / weighted.mean()
        moved = (ratio - 1).abs() * z[1 + len(word) :].abs().max()
        assert moved > 2 * tolerance
        assert max_diff(got[1 + len(word) :], z[1 + len(word) :]) > moved - tolerance


def test_unweighted_prompt_is_the_comfyui_encoding_bit_for_bit(demo_model):
    text = "1girl, solo, looking at viewer"
    (ours,) = a1111(demo_model, text)
    (comfy,) = encode_prompts(demo_model, [prepare_prompt(demo_model, text)])
    assert torch.equal(ours.context, comfy.context) and torch.equal(ours.pooled, comfy.pooled)


def test_break_starts_a_new_chunk_and_each_chunk_keeps_its_own_mean(demo_model):
    first, second = token_ids(demo_model, "red hair"), token_ids(demo_model, "blue eyes")
    (result,) = a1111(demo_model, "red hair BREAK (blue eyes:1.5)")
    assert result.tokens == 2 * 77
    encoder, pad = demo_model.text_encoders[0], PADS[0]
    got = split(demo_model, result.context)[0]
    z, _ = hidden(encoder, [row(first, pad), row(second, pad)])
    z = z.float()
    # The first chunk has no weights: exactly as encoded.
    assert torch.equal(got[:77], z[0].to(got.dtype))
    w = torch.ones(77)
    w[1 : 1 + len(second)] = 1.5
    weighted = z[1] * w[:, None]
    expected = weighted * (z[1].mean() / weighted.mean())
    assert max_diff(got[77:], expected) <= text_tolerance([encoder], z, z, weight=1.5)


def test_empty_negative_prompt_is_zeros_and_a_weighted_one_is_not(demo_model):
    (empty,) = a1111(demo_model, "", field="negativePrompt")
    assert empty.tokens == 77
    assert not empty.context.any() and not empty.pooled.any()
    (text,) = a1111(demo_model, "lowres", field="negativePrompt")
    assert text.context.abs().sum() > 0 and text.pooled.abs().sum() > 0
    # The ComfyUI reading encodes the empty negative prompt as text.
    (comfy,) = encode_prompts(demo_model, [prepare_prompt(demo_model, "", "negativePrompt")])
    assert comfy.context.abs().sum() > 0


def test_mixed_batch_gives_each_prompt_its_own_rule(demo_model):
    texts = ["(smile:1.3), 1girl", "(smile:1.3), 1girl", "", "(cat)"]
    prepared = [
        prepare_prompt(demo_model, texts[0], syntax="a1111"),
        prepare_prompt(demo_model, texts[1]),
        prepare_prompt(demo_model, texts[2], "negativePrompt", syntax="a1111"),
        prepare_prompt(demo_model, texts[3], syntax="a1111"),
    ]
    together = encode_prompts(demo_model, prepared)
    alone = [encode_prompts(demo_model, [p])[0] for p in prepared]
    for one, other in zip(together, alone):
        tolerance = text_tolerance(demo_model.text_encoders, other.context, other.context)
        assert max_diff(one.context, other.context) <= tolerance
        assert max_diff(one.pooled, other.pooled) <= tolerance
    # The same text by the two rules is two different conditionings.
    assert max_diff(together[0].context, together[1].context) > 0


def test_prompt_editing_is_refused_naming_the_field(demo_model):
    with pytest.raises(InvalidArgument) as refused:
        prepare_prompt(demo_model, "a [cat:dog:0.5]", syntax="a1111")
    assert refused.value.field == "prompt"
    with pytest.raises(InvalidArgument) as refused:
        prepare_prompt(demo_model, "a [cat|dog]", "negativePrompt", syntax="a1111")
    assert refused.value.field == "negativePrompt"


def test_lora_tags_are_taken_out_of_the_text_and_become_loras(demo_model):
    with_tag = prepare_prompt(demo_model, "1girl <lora:style:0.8:0.6>", syntax="a1111")
    plain = prepare_prompt(demo_model, "1girl ", syntax="a1111")
    assert with_tag.chunks == plain.chunks
    assert with_tag.lora_tags == (LoraTag("style", 0.8, 0.6),)
    request = GenerateRequest(prompt="1girl <lora:style:0.8:0.6>", prompt_syntax="a1111",
                              loras=(LoraSpec("other", 0.5),))
    merged = with_lora_tags(request, with_tag.lora_tags)
    assert merged.loras == (LoraSpec("other", 0.5), LoraSpec("style", strength=0.6, strength_clip=0.8))
    with pytest.raises(InvalidArgument, match="a second time"):
        with_lora_tags(dataclasses.replace(request, loras=(LoraSpec("style"),)), with_tag.lora_tags)


def test_textual_inversion_by_plain_name(with_embeddings):
    """A1111 finds an embedding by its file name in the token ids; unweighted, that is the same
    conditioning as ComfyUI's `embedding:NAME`, bit for bit."""
    model, _ = with_embeddings
    by_name = prepare_prompt(model, "a tri b", syntax="a1111")
    assert [e.name for e in by_name.embeddings] == ["tri"]
    (ours,) = encode_prompts(model, [by_name])
    (comfy,) = encode_prompts(model, [prepare_prompt(model, "a embedding:tri b")])
    assert torch.equal(ours.context, comfy.context)
    (as_text,) = encode_prompts(model, [prepare_prompt(model, "a tri b")])
    assert not torch.equal(ours.context, as_text.context)
