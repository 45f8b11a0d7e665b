"""Chunks of 77 on the real CLIP vocabulary (docs/prompts.md, sections 2 and 3)."""

import pytest

from t2i.errors import InvalidArgument
from t2i.prompts.chunks import CHUNK_LENGTH, SpecialTokens, VectorRef, chunk_segments
from t2i.prompts.parser import EmbeddingSegment, TextSegment, parse_prompt

START, END = 49406, 49407
A = 320  # "a</w>" in the CLIP vocabulary
X = 343  # "x</w>"


def chunks_of(tokenizer, source, counts=None, **options):
    def tokenize(texts):
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    special = SpecialTokens(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    segments = parse_prompt(source) if isinstance(source, str) else source
    return chunk_segments(segments, tokenize, special, counts or {}, **options)


def ids(chunk):
    return [item for item, _ in chunk]


def weights(chunk):
    return [weight for _, weight in chunk]


def text_ids(chunk):
    """The ids between the start token and the first end token."""
    items = ids(chunk)
    return items[1 : items.index(END)]


def test_the_vocabulary_is_clip(clip_tokenizers):
    first, second = clip_tokenizers
    assert (first.bos_token_id, first.eos_token_id, first.pad_token_id) == (START, END, END)
    assert second.pad_token_id == 0 and second.convert_ids_to_tokens(0) == "!"
    assert first("a photo of a cat", add_special_tokens=False)["input_ids"] == [320, 1125, 539, 320, 2368]
    assert first.convert_ids_to_tokens(first("masterpiece", add_special_tokens=False)["input_ids"]) == ["masterpiece</w>"]


def test_empty_prompt_is_one_chunk_padded_per_tokenizer(clip_tokenizers):
    first, second = clip_tokenizers
    assert [ids(c) for c in chunks_of(first, "")] == [[START, END] + [END] * 75]
    assert [ids(c) for c in chunks_of(second, "")] == [[START, END] + [0] * 75]
    assert all(w == 1.0 for w in weights(chunks_of(first, "")[0]))


def test_unweighted_text_is_cut_at_exactly_75(clip_tokenizers):
    first, second = clip_tokenizers
    chunks = chunks_of(first, "x " * 200)  # one segment of 200 tokens
    assert [len(c) for c in chunks] == [CHUNK_LENGTH] * 3
    assert [ids(c) for c in chunks[:2]] == [[START] + [X] * 75 + [END]] * 2
    assert ids(chunks[2]) == [START] + [X] * 50 + [END] + [END] * 25
    assert ids(chunks_of(second, "x " * 200)[2])[-25:] == [0] * 25


def test_exactly_75_tokens_is_one_chunk(clip_tokenizers):
    first, _ = clip_tokenizers
    assert [ids(c) for c in chunks_of(first, "x " * 75)] == [[START] + [X] * 75 + [END]]
    assert len(chunks_of(first, "x " * 76)) == 2


def test_a_segment_under_8_tokens_moves_whole(clip_tokenizers):
    first, _ = clip_tokenizers
    seven = first("b c d e f g h", add_special_tokens=False)["input_ids"]
    assert len(seven) == 7
    chunks = chunks_of(first, "a " * 72 + "(b c d e f g h:1.2)")
    assert len(chunks) == 2
    # The first chunk closes after the 72 a's: end token, then padding over the 3 free places.
    assert ids(chunks[0]) == [START] + [A] * 72 + [END] + [END] * 3
    assert text_ids(chunks[1]) == seven
    assert weights(chunks[1])[1:8] == [1.2] * 7
    assert weights(chunks[1])[0] == weights(chunks[1])[8] == 1.0  # start and end


def test_a_segment_of_8_tokens_is_split(clip_tokenizers):
    first, _ = clip_tokenizers
    eight = first("b c d e f g h i", add_special_tokens=False)["input_ids"]
    assert len(eight) == 8
    chunks = chunks_of(first, "a " * 72 + "(b c d e f g h i:1.2)")
    assert text_ids(chunks[0]) == [A] * 72 + eight[:3]
    assert weights(chunks[0])[73:76] == [1.2] * 3
    assert text_ids(chunks[1]) == eight[3:]
    assert ids(chunks[1])[7:] == [END] * 70


def test_a_long_segment_continues_over_several_chunks(clip_tokenizers):
    first, _ = clip_tokenizers
    chunks = chunks_of(first, "a " * 70 + "(" + "x " * 160 + ":0.9)")
    assert text_ids(chunks[0]) == [A] * 70 + [X] * 5
    assert text_ids(chunks[1]) == [X] * 75
    assert text_ids(chunks[2]) == [X] * 75
    assert text_ids(chunks[3]) == [X] * 5
    assert len(chunks) == 4 and all(w == 0.9 for w in weights(chunks[3])[1:6])


def test_a_full_chunk_then_a_short_segment_starts_a_new_chunk(clip_tokenizers):
    first, _ = clip_tokenizers
    chunks = chunks_of(first, "x " * 75 + "(a:1.3)")
    assert len(chunks) == 2
    assert text_ids(chunks[0]) == [X] * 75
    assert chunks[1][1] == (A, 1.3)


def test_whole_moves_can_take_more_chunks_than_the_token_count_needs(clip_tokenizers):
    first, _ = clip_tokenizers
    # 11 segments of 7 tokens = 77 tokens: one 75-token cut would need 2 chunks; moving whole
    # segments puts 10 in the first chunk (70 tokens) and the 11th in a second.
    prompt = "".join("(a b c d e f g:1.1)" for _ in range(11))
    chunks = chunks_of(first, prompt)
    assert len(chunks) == 2 and len(text_ids(chunks[0])) == 70 and len(text_ids(chunks[1])) == 7


def test_embeddings_take_their_positions_and_move_whole(clip_tokenizers):
    first, _ = clip_tokenizers
    segments = [TextSegment("a " * 73, 1.0), EmbeddingSegment("three", 0.8), TextSegment(" x", 1.0)]
    chunks = chunks_of(first, segments, {"three": 3})
    assert ids(chunks[0]) == [START] + [A] * 73 + [END] + [END] * 2
    assert chunks[1][1:4] == tuple((VectorRef(i), 0.8) for i in range(3))
    assert chunks[1][4] == (X, 1.0)


def test_vector_indices_run_over_all_references(clip_tokenizers):
    first, _ = clip_tokenizers
    segments = [EmbeddingSegment("two", 1.0), TextSegment("a", 1.0), EmbeddingSegment("two", 1.0), EmbeddingSegment("one", 1.0)]
    (chunk,) = chunks_of(first, segments, {"two": 2, "one": 1})
    assert ids(chunk)[1:7] == [VectorRef(0), VectorRef(1), A, VectorRef(2), VectorRef(3), VectorRef(4)]


def test_both_tokenizers_give_the_same_tokens(clip_tokenizers):
    first, second = clip_tokenizers
    prompt = "masterpiece, (1girl:1.2), ((pink hair)), " + "detailed " * 90
    one, two = chunks_of(first, prompt), chunks_of(second, prompt)
    assert [text_ids(c) for c in one] == [text_ids(c) for c in two]
    assert [weights(c) for c in one] == [weights(c) for c in two]


def test_the_chunk_cap(clip_tokenizers):
    first, _ = clip_tokenizers
    assert len(chunks_of(first, "x " * 600, max_chunks=8)) == 8
    prompt = "x " * 601
    with pytest.raises(InvalidArgument) as raised:
        chunks_of(first, prompt, max_chunks=8, field="negativePrompt", prompt=prompt)
    error = raised.value
    assert error.field == "negativePrompt" and error.value == prompt
    assert "601 CLIP tokens" in error.message
    assert "9 chunks" in error.message
    assert "at most 8 chunks (600 tokens)" in error.message
    with pytest.raises(InvalidArgument, match="at most 2 chunks"):
        chunks_of(first, "x " * 151, max_chunks=2)
