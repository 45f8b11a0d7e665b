"""A1111's prompt rules (t2i.prompts.a1111).

The first cases are the examples A1111 documents for its parser (`parse_prompt_attention`'s
docstring in modules/prompt_parser.py, and the wiki's emphasis cheat sheet), with the values
it documents, floats included. The others follow from A1111's documented rules as the module
docstring states them; where a weight is the product of several brackets it is written as
that product, in the order the brackets close, which is the float A1111 computes.
"""

import pytest

from t2i.errors import InvalidArgument
from t2i.prompts.a1111 import (
    BREAK,
    COMMA_BACKOFF,
    A1111Chunks,
    A1111Prompt,
    EmbeddingIndex,
    KnownEmbedding,
    LoraTag,
    chunk_a1111,
    parse_a1111,
    strip_comments,
    tokenize_segments,
)
from t2i.prompts.chunks import CHUNK_LENGTH, CHUNK_TOKENS, SpecialTokens, VectorRef
from t2i.prompts.parser import MAX_GROUP_DEPTH, WEIGHT_LIMIT

R = 1.1
S = 1 / 1.1


def segments(text, **options):
    return list(parse_a1111(text, **options).segments)


# ------------------------------------------------------------------ A1111's documented examples

DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # the wiki's cheat sheet
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.2100000000000002)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    ("anime_\\(character\\)", [("anime_(character)", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), DOCUMENTED, ids=[repr(c[0]) for c in DOCUMENTED])
def test_documented_examples(prompt, expected):
    assert segments(prompt) == expected


def test_documented_floats_are_exact():
    weights = dict(segments("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[1:2])
    assert weights["house"] == 1.5730000000000004 and weights["house"] != 1.573


# --------------------------------------------------------------------------------- attention

CASES = [
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("x()", [("x", 1.0)]),
    # nesting multiplies, explicit weights included
    ("((x:1.5))", [("x", 1.5 * R)]),
    ("((x):1.5)", [("x", 1.0 * R * 1.5)]),
    ("[[x]]", [("x", 1.0 * S * S)]),
    ("([x])", [("x", 1.0 * S * R)]),
    ("(a [b] c)", [("a ", R), ("b", 1.0 * S * R), (" c", R)]),
    # the float order is the closing order: [ closes, then :1.3), then the unclosed (
    ("(([x]:1.3)", [("x", 1.3000000000000003)]),
    # unclosed: all ( first, then all [
    ("[((x:1.3)", [("x", 1.3)]),
    ("[(x", [("x", 1.0 * R * S)]),
    # the weight counts only right before ")"
    ("(a:b:1.2)", [("a:b", 1.2)]),
    ("(a:1.2:1.3)", [("a:1.2", 1.3)]),
    ("(a: 1.2 )", [("a", 1.2)]),
    ("(a :1.2)", [("a ", 1.2)]),
    ("(a:+.5)", [("a", 0.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:1e-1)", [("a:1e-1", R)]),  # no exponent in A1111's weights
    ("(a:1.2 b)", [("a:1.2 b", R)]),
    ("(a:)", [("a:", R)]),
    ("(a:b)", [("a:b", R)]),
    ("(a:1.2]", [("a:1.2]", R)]),
    ("(ratio 16:9)", [("ratio 16", 9.0)]),
    ("a: b", [("a: b", 1.0)]),
    ("a:1.2) b", [("a:1.2) b", 1.0)]),  # no ( open: the weight is text
    # strays
    ("a) b]", [("a) b]", 1.0)]),
    ("(a))", [("a", R), (")", 1.0)]),
    ("([a)]", [("a", 1.0 * R * S)]),  # round and square brackets are counted apart
    # escapes; a backslash before anything else disappears
    ("\\[a\\]", [("[a]", 1.0)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("C:\\path", [("C:path", 1.0)]),
    ("(\\(a\\):1.3)", [("(a)", 1.3)]),
    # a piece left empty by a dropped backslash keeps its own weight and stops a merge
    ("a(\\:1.2)b", [("a", 1.0), ("", 1.2), ("b", 1.0)]),
    # unicode
    ("(café ✨:1.2), 少女", [("café ✨", 1.2), (", 少女", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), CASES, ids=[repr(c[0]) for c in CASES])
def test_attention(prompt, expected):
    assert segments(prompt) == expected


def test_equal_neighbours_are_joined_and_unequal_ones_are_not():
    assert segments("(a)(b)[c]") == [("ab", R), ("c", S)]
    assert segments("(a)b(c)") == [("a", R), ("b", 1.0), ("c", R)]


def test_weighted_flag():
    assert not parse_a1111("plain, text BREAK more").weighted
    assert parse_a1111("a [b]").weighted


# ------------------------------------------------------------------------------------- BREAK

BREAKS = [
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a, BREAK, b", [("a,", 1.0), BREAK, (", b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("BREAK a", [("", 1.0), BREAK, ("a", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    ("x:BREAK", [("x:", 1.0), BREAK, ("", 1.0)]),
    ("(a) BREAK (b)", [("a", R), ("", 1.0), BREAK, ("", 1.0), ("b", R)]),
    # not BREAK: lowercase, or part of a word
    ("a break b", [("a break b", 1.0)]),
    ("a Break b", [("a Break b", 1.0)]),
    ("BREAKfast", [("BREAKfast", 1.0)]),
    ("xBREAK", [("xBREAK", 1.0)]),
    ("BREAK_", [("BREAK_", 1.0)]),
    # inside brackets it still breaks (A1111 would make it the text "BREAK" at weight -1.1)
    ("(a BREAK b)", [("a", R), BREAK, ("b", R)]),
    ("(a BREAK b", [("a", R), BREAK, ("b", R)]),
]


@pytest.mark.parametrize(("prompt", "expected"), BREAKS, ids=[repr(c[0]) for c in BREAKS])
def test_break(prompt, expected):
    assert segments(prompt) == expected


# ----------------------------------------------------------------------------------- LoRA tags

LORAS = [
    ("<lora:foo:0.8>", LoraTag("foo", 0.8, 0.8)),
    ("<lora:foo>", LoraTag("foo", 1.0, 1.0)),
    ("<lora:detail-tweaker.v1.5:1.2>", LoraTag("detail-tweaker.v1.5", 1.2, 1.2)),
    ("<lora:my lora (v2):0.5>", LoraTag("my lora (v2)", 0.5, 0.5)),
    ("<lora:foo:-1>", LoraTag("foo", -1.0, -1.0)),
    ("<lora:foo: 0.5 >", LoraTag("foo", 0.5, 0.5)),
    ("<lora:foo:0>", LoraTag("foo", 0.0, 0.0)),
    # first number: text encoder; second: UNet (default: the first)
    ("<lora:foo:0.5:0.2>", LoraTag("foo", 0.5, 0.2)),
    ("<lora:foo:te=0.3>", LoraTag("foo", 0.3, 0.3)),
    ("<lora:foo:unet=0.3>", LoraTag("foo", 1.0, 0.3)),
    ("<lora:foo:0.5:unet=0.1>", LoraTag("foo", 0.5, 0.1)),
    ("<lora:foo:0.5:0.2:te=0.9>", LoraTag("foo", 0.9, 0.2)),
    ("<lyco:foo:0.7>", LoraTag("foo", 0.7, 0.7)),
]


@pytest.mark.parametrize(("prompt", "tag"), LORAS, ids=[c[0] for c in LORAS])
def test_lora_tags(prompt, tag):
    parsed = parse_a1111(f"a cat {prompt}, smiling")
    assert parsed.loras == (tag,)
    assert parsed.segments == (("a cat , smiling", 1.0),)


def test_lora_tags_keep_their_order_and_leave_nothing_behind():
    parsed = parse_a1111("<lora:b:0.5>(a <lora:a:1> cat:1.2)<lora:b:0.3>")
    assert parsed.loras == (LoraTag("b", 0.5, 0.5), LoraTag("a", 1.0, 1.0), LoraTag("b", 0.3, 0.3))
    assert parsed.segments == (("a  cat", 1.2),)


def test_a_lora_tag_in_a_comment_is_not_read():
    parsed = parse_a1111("a cat # <lora:foo:1>\nsmiling")
    assert parsed.loras == ()
    assert parsed.segments == (("a cat \nsmiling", 1.0),)


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("<hypernet:foo:1>", "<hypernet:...> tags are not supported"),
        ("<LORA:foo:1>", "<LORA:...> tags are not supported"),
        ("<lora::1>", "starts with the LoRA's name"),
        ("<lora:a=b:1>", "unknown LoRA setting a="),
        ("<lora:te=1>", "starts with the LoRA's name"),
        ("<lora:foo:abc>", "'abc' is not a number"),
        ("<lora:foo:1:x>", "'x' is not a number"),
        ("<lora:foo:te=x>", "'x' is not a number"),
        ("<lora:foo:inf>", "finite"),
        ("<lora:foo:nan>", "finite"),
        ("<lora:foo:1:1:8>", "DyLoRA"),
        ("<lora:foo:1:dyn=8>", "DyLoRA"),
        ("<lora:foo:1:lbw=1>", "unknown LoRA setting lbw="),
    ],
)
def test_lora_tags_refused(prompt, says):
    with pytest.raises(InvalidArgument) as raised:
        parse_a1111(f"x {prompt} y")
    assert raised.value.field == "prompt"
    assert raised.value.value == prompt
    assert says in raised.value.message


def test_lora_tags_in_the_negative_prompt_are_refused():
    with pytest.raises(InvalidArgument) as raised:
        parse_a1111("ugly, <lora:bad_hands:1>", "negativePrompt", negative=True)
    assert raised.value.field == "negativePrompt"
    assert "only from the prompt" in raised.value.message


# ------------------------------------------------------------------ editing and alternation

EDITING = [
    "[a:b:0.5]",
    "[a:b:5]",
    "[a::0.5]",
    "[:b:0.5]",
    "[a:0.5]",
    "[a: b :1]",
    "[a:b: 0.5 ]",
    "[a:b:.5]",
    "[a:b:1e-1]",
    "[a:b:-1]",
    "[(x:1.2):b:0.5]",
    "[[x]:b:0.5]",
    "[a\\:b:0.5]",  # any backslash escape is text to A1111's grammar: one colon left
    "[ratio 16:9]",  # A1111 reads this as adding "ratio 16" at step 9
    "x, ([a:b:0.5]:1.2), y",
    "[[a:b:0.5]]",
]


@pytest.mark.parametrize("prompt", EDITING)
@pytest.mark.parametrize(("field", "negative"), [("prompt", False), ("negativePrompt", True)])
def test_prompt_editing_is_refused(prompt, field, negative):
    with pytest.raises(InvalidArgument) as raised:
        parse_a1111(prompt, field, negative=negative)
    assert raised.value.field == field
    assert "prompt editing [from:to:when] is not supported on this API" in raised.value.message
    assert raised.value.value.startswith("[")


ALTERNATION = ["[a|b]", "[fe|]male", "[a|b|c]", "x ([cat|dog]:1.2)", "[a|b:0.5]", "[(a:1.2)|b]"]


@pytest.mark.parametrize("prompt", ALTERNATION)
def test_alternation_is_refused(prompt):
    with pytest.raises(InvalidArgument) as raised:
        parse_a1111(prompt, "negativePrompt", negative=True)
    assert raised.value.field == "negativePrompt"
    assert "alternation [a|b] is not supported on this API" in raised.value.message


NOT_EDITING = [
    ("[x]", [("x", S)]),
    ("[a:b]", [("a:b", S)]),
    ("[a:b:c]", [("a:b:c", S)]),
    ("[a:b:c:0.5]", [("a:b:c:0.5", S)]),  # three colons: not A1111's editing syntax
    ("[a:b:0.5x]", [("a:b:0.5x", S)]),
    ("[a:(0.5)]", [("a:", S), ("0.5", 1.0 * R * S)]),
    ("(x:1.2)", [("x", 1.2)]),
    ("a: b", [("a: b", 1.0)]),
    ("(a|b)", [("a|b", R)]),
    ("a|b", [("a|b", 1.0)]),
    ("\\[a:b:0.5\\]", [("[a:b:0.5]", 1.0)]),
    ("\\[a|b\\]", [("[a|b]", 1.0)]),
    ("[a:b:0.5, x", [("a:b:0.5, x", S)]),  # unclosed: A1111's grammar cannot make it a group
    ("[a (b:0.5]", [("a ", S), ("b:0.5", 1.0 * S * R)]),
    ("[x] (y:0.5)", [("x", S), (" ", 1.0), ("y", 0.5)]),
]


@pytest.mark.parametrize(("prompt", "expected"), NOT_EDITING, ids=[c[0] for c in NOT_EDITING])
def test_what_is_not_editing_is_read(prompt, expected):
    assert segments(prompt) == expected


# -------------------------------------------------------------------- composable diffusion

def test_and_is_refused_in_the_prompt_and_text_in_the_negative_prompt():
    with pytest.raises(InvalidArgument) as raised:
        parse_a1111("a cat AND a dog")
    assert raised.value.field == "prompt"
    assert "AND (A1111's composable diffusion" in raised.value.message
    assert segments("a cat AND a dog", negative=True) == [("a cat AND a dog", 1.0)]
    assert segments("a cat and a dog, ANDROID") == [("a cat and a dog, ANDROID", 1.0)]


@pytest.mark.parametrize("prompt", ["a cat:1.5", "a cat: 0.5 ", "a cat :2.", "a cat:-1", "a cat:.5"])
def test_a_final_weight_other_than_one_is_refused(prompt):
    with pytest.raises(InvalidArgument) as raised:
        parse_a1111(prompt)
    assert raised.value.field == "prompt"
    assert "weight in composable diffusion" in raised.value.message
    assert segments(prompt, negative=True) == [(prompt, 1.0)]


def test_a_final_weight_of_one_is_taken_off_the_text():
    assert segments("a cat :1") == [("a cat", 1.0)]
    assert segments("a cat:1.0 <lora:x:0.5>") == [("a cat", 1.0)]  # tags go first
    assert segments("(cat:1.5)") == [("cat", 1.5)]  # ends in ")": not a final weight
    assert segments("a cat:1e3") == [("a cat:1e3", 1.0)]


# ------------------------------------------------------------------------------------ comments

def test_comments():
    assert strip_comments("a, # note\nb #x") == "a, \nb "
    assert segments("a # (b:2)\n(c)") == [("a \n", 1.0), ("c", R)]
    assert segments("a #1", comments=False) == [("a #1", 1.0)]
    assert segments("#", negative=True) == [("", 1.0)]


# ------------------------------------------------------------------------------------- limits

@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("(x:11)", "from -10 to 10, got 11.0"),
        ("(x:-10.5)", "got -10.5"),
        ("(" * 25 + "x" + ")" * 25, "A1111 multiplies"),  # 1.1 ** 25 > 10
        ("(x:" + "9" * 400 + ")", "got inf"),
        ("(x:1.2.3)", "'1.2.3' is not a number"),
        ("(x:.)", "'.' is not a number"),
    ],
)
def test_bad_weights_are_refused(prompt, says):
    with pytest.raises(InvalidArgument) as raised:
        parse_a1111(prompt, "negativePrompt", negative=True)
    assert raised.value.field == "negativePrompt"
    assert says in raised.value.message


def test_weight_limit_is_inclusive():
    assert segments("(a:10)(b:-10)") == [("a", WEIGHT_LIMIT), ("b", -WEIGHT_LIMIT)]


def test_depth_is_capped_but_unclosed_brackets_alone_are_nothing():
    deep = "[" * MAX_GROUP_DEPTH + "x"
    assert segments(deep)[0][0] == "x"
    with pytest.raises(InvalidArgument) as raised:
        parse_a1111("[" + deep)
    assert f"at most {MAX_GROUP_DEPTH} deep" in raised.value.message
    assert segments("(" * 3000) == [("", 1.0)]


def test_a1111_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, t2i.prompts.a1111; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------------------- chunks

START, END, PAD = 1000, 1001, 0
SPECIAL = SpecialTokens(START, END, END)
COMMA = 9
W = 5  # any word


def chunk(pieces, **options):
    return chunk_a1111(pieces, SPECIAL, COMMA, **options)


CLIP_START, CLIP_END = 49406, 49407


def content(c):
    """The items between the start token and the end token that follows the content."""
    items = [item for item, _ in c]
    assert len(items) == CHUNK_LENGTH and items[0] in (START, CLIP_START)
    end_token = END if items[0] == START else CLIP_END
    body = items[1:]
    end = len(body)
    while end and body[end - 1] in (end_token, PAD):  # no test content holds either id
        end -= 1
    assert body[end] == end_token
    return body[:end]


def lengths(result):
    return [len(content(c)) for c in result.chunks]


def test_layout_and_padding():
    result = chunk([((W, W), 1.3)])
    (only,) = result.chunks
    assert only == ((START, 1.0), (W, 1.3), (W, 1.3), (END, 1.0)) + ((END, 1.0),) * (CHUNK_TOKENS - 2)
    other = chunk_a1111([((W,), 1.0)], SpecialTokens(START, END, PAD), COMMA).chunks[0]
    assert [item for item, _ in other] == [START, W, END] + [PAD] * (CHUNK_TOKENS - 1)
    assert isinstance(result, A1111Chunks) and result.tokens == 2 and result.weighted


def test_empty_prompt_is_one_chunk():
    assert lengths(chunk([])) == [0]
    assert lengths(chunk([((), 1.0)])) == [0]


def test_without_commas_chunks_are_cut_at_75():
    assert lengths(chunk([((W,) * 75, 1.0)])) == [75]
    assert lengths(chunk([((W,) * 76, 1.0)])) == [75, 1]
    assert lengths(chunk([((W,) * 151, 1.0)])) == [75, 75, 1]


def words_with_comma_at(place, total):
    ids = [W] * total
    ids[place] = COMMA
    return [(tuple(ids), 1.0)]


def test_comma_back_off():
    # comma at place 60 of the first chunk: the 14 tokens after it move on
    result = chunk(words_with_comma_at(60, 81))
    assert lengths(result) == [61, 20]
    assert content(result.chunks[0])[-1] == COMMA


@pytest.mark.parametrize(("place", "expected"), [(55, [56, 20]), (54, [75, 1]), (74, [75, 1])])
def test_comma_back_off_reaches_20_places(place, expected):
    # 75 - place <= 20 moves the tail; 54 is 21 places back. At 74 nothing is left to move.
    assert lengths(chunk(words_with_comma_at(place, 76))) == expected


def test_a_comma_that_would_be_76th_starts_the_next_chunk():
    result = chunk(words_with_comma_at(75, 80))
    assert lengths(result) == [75, 5]
    assert content(result.chunks[1])[0] == COMMA


def test_back_off_setting():
    assert lengths(chunk(words_with_comma_at(60, 81), backoff=0)) == [75, 6]
    assert lengths(chunk(words_with_comma_at(50, 81), backoff=25)) == [51, 30]
    assert lengths(chunk_a1111(words_with_comma_at(60, 81), SPECIAL, None)) == [75, 6]
    with pytest.raises(ValueError):
        chunk(words_with_comma_at(60, 81), backoff=75)


def test_moved_tokens_keep_their_weights():
    pieces = [((W,) * 60 + (COMMA,), 1.0), ((7,) * 14, 1.5), ((8,) * 6, 0.5)]
    result = chunk(pieces)
    assert lengths(result) == [61, 20]
    second = result.chunks[1][1:21]
    assert second == ((7, 1.5),) * 14 + ((8, 0.5),) * 6


def test_only_the_last_comma_counts_and_each_chunk_starts_afresh():
    ids = [W] * 160
    ids[40] = ids[60] = COMMA  # 60 is the last comma of chunk 1 (40 alone would be too far back)
    # chunk 2 (the 14 moved tokens, then more) has no comma of its own: it is cut at 75
    assert lengths(chunk([(tuple(ids), 1.0)])) == [61, 75, 24]


def test_break_pads_the_chunk():
    assert lengths(chunk([((W,) * 3, 1.0), BREAK, ((W,) * 2, 1.0)])) == [3, 2]
    assert lengths(chunk([BREAK, ((W,), 1.0)])) == [0, 1]
    assert lengths(chunk([((W,), 1.0), BREAK, BREAK, ((W,), 1.0)])) == [1, 0, 1]
    assert lengths(chunk([((W,), 1.0), BREAK])) == [1]
    assert lengths(chunk([BREAK])) == [0]


def test_break_forgets_the_last_comma():
    # a comma just before BREAK must not cause a back-off in the next chunk
    pieces = [((W,) * 70 + (COMMA,), 1.0), BREAK, ((W,) * 80, 1.0)]
    assert lengths(chunk(pieces)) == [71, 75, 5]


def test_too_many_chunks_are_refused():
    pieces = [((W,), 1.0), BREAK] * 3 + [((W,), 1.0)]
    assert len(chunk(pieces, max_chunks=4).chunks) == 4
    with pytest.raises(InvalidArgument) as raised:
        chunk(pieces, max_chunks=3, field="negativePrompt", prompt="w BREAK w BREAK w BREAK w")
    error = raised.value
    assert error.field == "negativePrompt"
    assert error.value == "w BREAK w BREAK w BREAK w"
    assert "take 4 chunks of 75" in error.message and "at most 3 chunks" in error.message


# -------------------------------------------------------------------------------- embeddings

EASY = KnownEmbedding("easy", (50, 51), 3)
EASY_PLUS = KnownEmbedding("easyplus", (50, 51, 52), 2)
ONE = KnownEmbedding("one", (60,), 1)
INDEX = EmbeddingIndex([EASY, EASY_PLUS, ONE])


def test_embeddings_are_found_by_token_ids_longest_first():
    result = chunk([((W, 50, 51, W, 50, 51, 52, 50, W, 60), 0.8)], embeddings=INDEX)
    items = content(result.chunks[0])
    v = VectorRef
    assert items == [W, v(0), v(1), v(2), W, v(3), v(4), 50, W, v(5)]
    assert result.embeddings == ("easy", "easyplus", "one")
    assert all(weight == 0.8 for _, weight in result.chunks[0][1:11])
    assert result.tokens == 10


def test_embedding_names_do_not_match_across_pieces():
    result = chunk([((W, 50), 1.0), ((51,), 1.2)], embeddings=INDEX)
    assert content(result.chunks[0]) == [W, 50, 51]
    assert result.embeddings == ()


def test_embeddings_are_never_split():
    result = chunk([((W,) * 73 + (50, 51), 1.0)], embeddings=INDEX)
    assert lengths(result) == [73, 3]
    assert content(result.chunks[1]) == [VectorRef(0), VectorRef(1), VectorRef(2)]


def test_comma_back_off_moves_embedding_vectors_with_their_places():
    ids = (W,) * 60 + (COMMA,) + (W,) * 10 + (50, 51) + (W,) * 5
    result = chunk([(ids, 1.0)], embeddings=INDEX)
    assert lengths(result) == [61, 18]
    assert content(result.chunks[1])[10:13] == [VectorRef(0), VectorRef(1), VectorRef(2)]
    assert not any(isinstance(item, VectorRef) for item, _ in result.chunks[0])


def test_same_ids_first_given_wins():
    index = EmbeddingIndex([KnownEmbedding("B", (70,), 1), KnownEmbedding("a", (70,), 2)])
    assert chunk([((70,), 1.0)], embeddings=index).embeddings == ("B",)
    with pytest.raises(ValueError):
        EmbeddingIndex([KnownEmbedding("x", (1,), 0)])


# ------------------------------------------------------------------- on the real CLIP vocabulary

def real(tokenizer, text, embeddings=None, **options):
    def tokenize(texts):
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    special = SpecialTokens(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    index = EmbeddingIndex.build(embeddings, tokenize) if embeddings else None
    prompt = parse_a1111(text, **options)
    return chunk_a1111(tokenize_segments(prompt.segments, tokenize), special, comma, embeddings=index), prompt


def test_real_vocabulary_comma_back_off(clip_tokenizers):
    first, second = clip_tokenizers
    assert first.convert_tokens_to_ids(",</w>") == 267
    # five one-token words and a comma, 15 times: 89 tokens, commas at places 5, 11, ... 71, 77;
    # place 75 holds a word, so the 3 words after the comma at 71 move to the second chunk
    text = ", ".join(["one two three four five"] * 15)
    for tokenizer in (first, second):
        result, _ = real(tokenizer, text)
        assert result.tokens == 89
        assert lengths(result) == [72, 17]
        assert content(result.chunks[0])[-1] == 267
        assert content(result.chunks[1])[:3] == content(result.chunks[0])[:3]  # "one two three"


def test_real_vocabulary_embeddings_match_case_insensitively(clip_tokenizers):
    first, _ = clip_tokenizers
    counts = {"EasyNegative": 2, "bad_prompt_v2": 3}
    result, _ = real(first, "(easynegative:1.2), bad_prompt_v2, bad prompt v2, easynegatives", counts)
    assert result.embeddings == ("EasyNegative", "bad_prompt_v2")
    items = content(result.chunks[0])
    assert items[:2] == [VectorRef(0), VectorRef(1)]
    assert [w for _, w in result.chunks[0][1:3]] == [1.2, 1.2]


def test_real_vocabulary_break_and_loras(clip_tokenizers):
    first, _ = clip_tokenizers
    result, prompt = real(first, "a cat <lora:x:0.5> BREAK (a dog:1.3)")
    # the empty text after BREAK stays a piece of its own, as in A1111
    expected = A1111Prompt((("a cat", 1.0), BREAK, ("", 1.0), ("a dog", 1.3)), (LoraTag("x", 0.5, 0.5),))
    assert prompt == expected
    assert len(result.chunks) == 2
    assert [w for _, w in result.chunks[1][1:3]] == [1.3, 1.3]
