"""Prompt encoding: 75-token windows, never truncated, both encoders, pooled from the first window."""

import math

import pytest
import torch

from t2i.edge.launcher import DOCUMENTED_EXAMPLE
from t2i.engine.text import CHUNK, WINDOW, encode_prompts, window_ids

DOCUMENTED_PROMPT = DOCUMENTED_EXAMPLE["prompt"]  # about 150 CLIP tokens


def encode(model, *prompts):
    return encode_prompts(model.tokenizers, model.text_encoders, list(prompts), model.device)


def test_windows_have_start_end_and_padding(demo_model):
    tokenizer, tokenizer_2 = demo_model.tokenizers
    ids = tokenizer(DOCUMENTED_PROMPT, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(ids) > WINDOW, "the documented prompt must need more than one window"
    windows = window_ids(tokenizer, DOCUMENTED_PROMPT)
    assert len(windows) == math.ceil(len(ids) / CHUNK)
    assert all(len(w) == WINDOW for w in windows)
    assert all(w[0] == tokenizer.bos_token_id for w in windows)
    flattened = [t for w in windows for t in w[1 : 1 + CHUNK]]
    assert flattened[: len(ids)] == ids  # every token kept, in order
    # The last window ends its text with the end token, then pads (tokenizer 2 pads with "!").
    tail = len(ids) - CHUNK * (len(windows) - 1)
    assert windows[-1][1 + tail] == tokenizer.eos_token_id
    windows_2 = window_ids(tokenizer_2, DOCUMENTED_PROMPT)
    assert windows_2[-1][-1] == tokenizer_2.convert_tokens_to_ids("!") != tokenizer.eos_token_id
    assert window_ids(tokenizer, "") == [[tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * CHUNK]


def test_long_prompts_are_not_truncated(demo_model):
    base = encode(demo_model, DOCUMENTED_PROMPT)[0]
    changed_end = encode(demo_model, DOCUMENTED_PROMPT.replace("the viewer.", "the moon."))[0]
    windows = base.context.shape[1] // WINDOW
    assert windows >= 2 and base.context.shape[1] == windows * WINDOW
    hidden = sum(e.config.hidden_size for e in demo_model.text_encoders)
    assert base.context.shape[2] == hidden
    # The end of the prompt lives in the last window: changing it changes that window only.
    last = slice((windows - 1) * WINDOW, windows * WINDOW)
    assert not torch.allclose(base.context[:, last], changed_end.context[:, last])
    assert torch.equal(base.context[:, :WINDOW], changed_end.context[:, :WINDOW])
    # The pooled embedding comes from the first window.
    assert torch.equal(base.pooled, changed_end.pooled)


def test_batched_encoding_equals_one_by_one(demo_model):
    prompts = [DOCUMENTED_PROMPT, "", "1girl, masterpiece", "x " * 200]
    together = encode(demo_model, *prompts)
    for prompt, joint in zip(prompts, together):
        alone = encode(demo_model, prompt)[0]
        assert joint.context.shape == alone.context.shape
        assert torch.allclose(joint.context, alone.context, atol=1e-5)
        assert torch.allclose(joint.pooled, alone.pooled, atol=1e-5)


def test_penultimate_hidden_states_are_used(demo_model):
    tokenizer, _ = demo_model.tokenizers
    ids = torch.tensor(window_ids(tokenizer, "1girl"))
    output = demo_model.text_encoders[0](ids, output_hidden_states=True)
    context = encode(demo_model, "1girl")[0].context
    first_width = demo_model.text_encoders[0].config.hidden_size
    assert torch.allclose(context[0, :, :first_width], output.hidden_states[-2][0], atol=1e-6)
    assert not torch.allclose(context[0, :, :first_width], output.last_hidden_state[0], atol=1e-3)


@pytest.mark.parametrize("prompt", ["über café ✨ 🎨", "\x00\x01 control", "a" * 3000])
def test_unusual_text_encodes(demo_model, prompt):
    conditioning = encode(demo_model, prompt)[0]
    assert torch.isfinite(conditioning.context).all()
