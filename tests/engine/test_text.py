"""Prompt encoding: chunks of 75 tokens, never truncated, both encoders, pooled from the first chunk."""

import math

import pytest
import torch

from t2i.edge.launcher import DOCUMENTED_EXAMPLE
from t2i.engine.text import CHUNK, WINDOW, encode_prompts, prepare_prompt

from ..support.tolerance import max_diff, text_tolerance

DOCUMENTED_PROMPT = DOCUMENTED_EXAMPLE["prompt"]  # about 130 CLIP tokens


def encode(model, *prompts):
    return encode_prompts(model, [prepare_prompt(model, p) for p in prompts])


def chunk_ids(model, text, tokenizer_index=0):
    return [[item for item, _ in chunk] for chunk in prepare_prompt(model, text).chunks[tokenizer_index]]


def test_chunks_have_start_end_and_padding(demo_model):
    tokenizer, tokenizer_2 = demo_model.tokenizers
    ids = tokenizer(DOCUMENTED_PROMPT, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(ids) > WINDOW, "the documented prompt must need more than one chunk"
    chunks = chunk_ids(demo_model, DOCUMENTED_PROMPT)
    # No brackets: one segment, cut at exactly every 75 tokens.
    assert len(chunks) == math.ceil(len(ids) / CHUNK)
    assert all(len(c) == WINDOW for c in chunks)
    assert all(c[0] == tokenizer.bos_token_id for c in chunks)
    flattened = [t for c in chunks for t in c[1 : 1 + CHUNK]]
    assert flattened[: len(ids)] == ids  # every token kept, in order
    # The last chunk ends its text with the end token, then pads (tokenizer 2 pads with "!").
    tail = len(ids) - CHUNK * (len(chunks) - 1)
    assert chunks[-1][1 + tail] == tokenizer.eos_token_id
    chunks_2 = chunk_ids(demo_model, DOCUMENTED_PROMPT, 1)
    assert chunks_2[-1][-1] == tokenizer_2.convert_tokens_to_ids("!") != tokenizer.eos_token_id
    assert chunk_ids(demo_model, "") == [[tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * CHUNK]


def test_the_saved_tokenizers_are_clip(demo_model):
    tokenizer, tokenizer_2 = demo_model.tokenizers
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer_2.pad_token_id == 0
    assert tokenizer("a photo of a cat", add_special_tokens=False)["input_ids"] == [320, 1125, 539, 320, 2368]
    assert all(e.get_input_embeddings().num_embeddings == 49408 for e in demo_model.text_encoders)


def test_long_prompts_are_not_truncated(demo_model):
    base = encode(demo_model, DOCUMENTED_PROMPT)[0]
    changed_end = encode(demo_model, DOCUMENTED_PROMPT.replace("the viewer.", "the moon."))[0]
    chunks = base.context.shape[1] // WINDOW
    assert chunks >= 2 and base.context.shape[1] == chunks * WINDOW
    hidden = sum(e.config.hidden_size for e in demo_model.text_encoders)
    assert base.context.shape[2] == hidden
    # The end of the prompt lives in the last chunk: changing it changes that chunk only.
    last = slice((chunks - 1) * WINDOW, chunks * WINDOW)
    tolerance = text_tolerance(demo_model.text_encoders, base.context)
    assert max_diff(base.context[:, last], changed_end.context[:, last]) > 100 * tolerance
    assert torch.equal(base.context[:, :WINDOW], changed_end.context[:, :WINDOW])
    # The pooled embedding comes from the first chunk.
    assert torch.equal(base.pooled, changed_end.pooled)


def test_batched_encoding_equals_one_by_one(demo_model):
    prompts = [DOCUMENTED_PROMPT, "", "1girl, masterpiece", "x " * 200, "(masterpiece:1.2), ((1girl))"]
    together = encode(demo_model, *prompts)
    for prompt, joint in zip(prompts, together):
        alone = encode(demo_model, prompt)[0]
        assert joint.context.shape == alone.context.shape
        # The largest weight in these prompts is 1.21, ((1girl)).
        tolerance = text_tolerance(demo_model.text_encoders, alone.context, alone.pooled, weight=1.21)
        assert max_diff(joint.context, alone.context) <= tolerance
        assert max_diff(joint.pooled, alone.pooled) <= tolerance


def test_penultimate_hidden_states_are_used(demo_model):
    ids = torch.tensor(chunk_ids(demo_model, "1girl"))
    output = demo_model.text_encoders[0](ids, output_hidden_states=True)
    context = encode(demo_model, "1girl")[0].context
    first_width = demo_model.text_encoders[0].config.hidden_size
    penultimate = output.hidden_states[-2][0]
    tolerance = text_tolerance(demo_model.text_encoders[:1], penultimate)
    assert max_diff(context[0, :, :first_width], penultimate) <= tolerance
    assert max_diff(context[0, :, :first_width], output.last_hidden_state[0]) > 100 * tolerance


def test_brackets_are_weights_not_tokens(demo_model):
    tokenizer = demo_model.tokenizers[0]
    bracket_ids = set(tokenizer("( ) :", add_special_tokens=False)["input_ids"])
    (chunk,) = prepare_prompt(demo_model, "(masterpiece:1.2), ((smile))").chunks[0]
    assert not bracket_ids & {item for item, _ in chunk}
    escaped = prepare_prompt(demo_model, "hatsune miku \\(vocaloid\\)").chunks[0][0]
    assert bracket_ids & {item for item, _ in escaped}


@pytest.mark.parametrize("prompt", ["über café ✨ 🎨", "\x00\x01 control", "a" * 3000, "((((((", "))))((((", "[[x]]"])
def test_unusual_text_encodes(demo_model, prompt):
    conditioning = encode(demo_model, prompt)[0]
    assert torch.isfinite(conditioning.context).all()
