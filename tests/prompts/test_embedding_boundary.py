"""An embedding at a 75-token chunk boundary (docs/prompts.md, "Long prompts").

ComfyUI builds chunks from token groups without asking whether a group is text or an
embedding's vectors: 8 or more vectors that do not fit are split (what fits fills the chunk,
the rest goes on in the next one), fewer move whole to the next chunk. Checked on the chunks
and on the demo model's real encoders, against an encoder whose vocabulary holds the vectors.
"""

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from t2i.engine.text import encode_prompts, prepare_prompt
from t2i.prompts.chunks import SpecialTokens, VectorRef, chunk_segments
from t2i.prompts.parser import parse_prompt

from tests.support.tolerance import text_tolerance

START, END = 49406, 49407
X = 343  # "x</w>"
PADS = (END, 0)  # CLIP-L pads with the end token, CLIP-G with "!"
FIRST_EXTRA = 49408  # the first id past the CLIP vocabulary


def chunks_of(tokenizer, prompt, counts):
    def tokenize(texts):
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    special = SpecialTokens(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return chunk_segments(parse_prompt(prompt), tokenize, special, counts)


@pytest.mark.parametrize("count", [8, 10])
def test_an_embedding_of_8_or_more_vectors_is_split_at_the_boundary(clip_tokenizers, count):
    first, second = clip_tokenizers
    for tokenizer, pad in zip((first, second), PADS):
        chunks = chunks_of(tokenizer, "x " * 70 + "(embedding:long:1.3) x", {"long": count})
        assert len(chunks) == 2
        # The first five vectors fill the chunk, with the group's weight; then its end token.
        assert chunks[0] == ((START, 1.0), *((X, 1.0),) * 70, *((VectorRef(i), 1.3) for i in range(5)), (END, 1.0))
        # The rest continue the next chunk, still weighted, and the text after them follows.
        rest = count - 5
        assert chunks[1][: 1 + rest + 2] == ((START, 1.0), *((VectorRef(i), 1.3) for i in range(5, count)), (X, 1.0), (END, 1.0))
        assert chunks[1][1 + rest + 2 :] == ((pad, 1.0),) * (75 - rest - 1)


def test_an_embedding_of_7_vectors_moves_whole_to_the_next_chunk(clip_tokenizers):
    first, second = clip_tokenizers
    for tokenizer, pad in zip((first, second), PADS):
        chunks = chunks_of(tokenizer, "x " * 70 + "(embedding:short:0.8)", {"short": 7})
        assert len(chunks) == 2
        # The chunk closes after the 70 x's: end token, then padding over the five free places.
        assert chunks[0] == ((START, 1.0), *((X, 1.0),) * 70, (END, 1.0), *((pad, 1.0),) * 5)
        assert chunks[1][:9] == ((START, 1.0), *((VectorRef(i), 0.8) for i in range(7)), (END, 1.0))


@pytest.fixture(scope="module")
def with_long_embedding(demo_model, tmp_path_factory):
    """The demo model with 'ten', an embedding of 10 random vectors per encoder."""
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(11)
    vectors = [torch.randn(10, e.config.hidden_size, generator=generator) for e in demo_model.text_encoders]
    save_file({"clip_l": vectors[0], "clip_g": vectors[1]}, str(folder / "ten.safetensors"))
    from t2i.prompts.embeddings import load_embeddings

    embeddings = load_embeddings(folder, demo_model.text_encoders, demo_model.device, torch.float32)
    return dataclasses.replace(demo_model, embeddings=embeddings), vectors


def extended(encoder, extra):
    """A copy of `encoder` whose vocabulary has the rows `extra` appended (ids 49408, ...)."""
    clone = copy.deepcopy(encoder)
    table = clone.get_input_embeddings()
    grown = torch.nn.Embedding(table.num_embeddings + extra.shape[0], table.embedding_dim)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([table.weight, extra]))
    clone.set_input_embeddings(grown)
    return clone


def penultimate(encoder, rows):
    with torch.inference_mode():
        return encoder(torch.tensor(rows), output_hidden_states=True).hidden_states[-2]


def test_a_split_embedding_feeds_its_vectors_at_both_sides_of_the_boundary(with_long_embedding):
    model, vectors = with_long_embedding
    (result,) = encode_prompts(model, [prepare_prompt(model, "x " * 70 + "(embedding:ten:1.3)")])
    widths = [e.config.hidden_size for e in model.text_encoders]
    assert result.context.shape == (1, 154, sum(widths))
    parts = result.context[0].split(widths, dim=-1)
    ids = [FIRST_EXTRA + i for i in range(10)]
    for k, (encoder, pad, got) in enumerate(zip(model.text_encoders, PADS, parts)):
        first = [START, *[X] * 70, *ids[:5], END]
        second = [START, *ids[5:], END, *[pad] * 70]
        z = penultimate(extended(encoder, vectors[k]), [first, second]).reshape(154, -1)
        z_empty = penultimate(encoder, [[START, END, *[pad] * 75]])[0]
        # Vectors 0-4 at positions 71-75 of the first chunk, 5-9 at positions 1-5 of the second,
        # each weighted against the empty prompt's state at its position in its chunk.
        weighted = [*range(71, 76), *range(77 + 1, 77 + 6)]
        # Float32 rounding of another batch (tests/engine/test_text.text_tolerance): weighted
        # positions carry the weight's scaling of it, the others the encoder's bound alone.
        weighted_bound = text_tolerance([encoder], z, z_empty, weight=1.3)
        plain_bound = text_tolerance([encoder], z, z_empty)
        for position in weighted:
            j = position % 77
            expected = z_empty[j] + 1.3 * (z[position] - z_empty[j])
            assert (got[position] - expected).abs().max() <= weighted_bound
            assert (z[position] - expected).abs().max() > 100 * weighted_bound  # the weight shows
        others = [p for p in range(154) if p not in weighted]
        assert (got[others] - z[others]).abs().max() <= plain_bound
