"""The weight parser against docs/prompts.md, sections 1 and 5.

Every expected value below was worked out by hand from the rules on that page; weights are
written as the arithmetic the rules prescribe (1.0 * 1.1 * 1.1), which is exactly what the
page says the floating-point result is (1.2100000000000002 for two levels).
"""

import pytest

from t2i.errors import InvalidArgument
from t2i.prompts.parser import MAX_GROUP_DEPTH, WEIGHT_LIMIT, EmbeddingSegment, TextSegment, parse_prompt


def T(text, weight=1.0):
    return TextSegment(text, weight)


def E(name, weight=1.0):
    return EmbeddingSegment(name, weight)


G1 = 1.0 * 1.1
G2 = 1.0 * 1.1 * 1.1
G3 = 1.0 * 1.1 * 1.1 * 1.1

CASES = [
    # plain text
    ("a cat", [T("a cat")]),
    ("", []),
    ("masterpiece, 1girl", [T("masterpiece, 1girl")]),
    # groups multiply by 1.1 per level
    ("(a)", [T("a", G1)]),
    ("((a))", [T("a", 1.2100000000000002)]),
    ("(((a)))", [T("a", G3)]),
    ("x ((a)) y", [T("x "), T("a", G2), T(" y")]),
    ("(a)(b)", [T("a", G1), T("b", G1)]),
    ("(a) (b)", [T("a", G1), T(" "), T("b", G1)]),
    # a number after the last colon replaces the weight
    ("(a:1.5)", [T("a", 1.5)]),
    ("((a:1.5))", [T("a", 1.5)]),
    ("(((a:0.7)))", [T("a", 0.7)]),
    ("((a:1.5) b)", [T("a", 1.5), T(" b", G1)]),
    ("(a (b:0.5) c)", [T("a ", G1), T("b", 0.5), T(" c", G1)]),
    ("((a) b:0.5)", [T("a", 0.5 * 1.1), T(" b", 0.5)]),
    ("(a:1.5:2)", [T("a:1.5", 2.0)]),
    # Python float() syntax
    ("(a: 0.8 )", [T("a", 0.8)]),
    ("(a:-0.5)", [T("a", -0.5)]),
    ("(a:1e-1)", [T("a", 0.1)]),
    ("(a:+.5)", [T("a", 0.5)]),
    ("(a:5.)", [T("a", 5.0)]),
    ("(a:1_0)", [T("a", 10.0)]),
    ("(a:0)", [T("a", 0.0)]),
    # a colon that does not parse stays text, and the x1.1 stands
    ("(a:b)", [T("a:b", G1)]),
    ("(a:)", [T("a:", G1)]),
    ("(a:0x10)", [T("a:0x10", G1)]),
    ("(a:1.5x)", [T("a:1.5x", G1)]),
    ("(ratio 16:9)", [T("ratio 16", 9.0)]),  # any number replaces, even one meant as text
    ("(:1.5)", [T(":1.5", G1)]),  # colon at position 0 is not a weight
    # escapes
    ("\\(a\\)", [T("(a)")]),
    ("hatsune miku \\(vocaloid\\), (smile:1.2)", [T("hatsune miku (vocaloid), "), T("smile", 1.2)]),
    ("(\\(a\\):1.3)", [T("(a)", 1.3)]),
    ("(a\\)b)", [T("a)b", G1)]),
    ("\\[a\\]", [T("\\[a\\]")]),  # only \( and \) are escapes
    ("a\\\\(b)", [T("a\\(b)")]),  # \\( is a backslash and an escaped (, then a stray )
    ("\x00\x01 a", [T("\x00\x01 a")]),  # ComfyUI's own markers are just text here
    ("\ue000\ue001 \\(a\\)", [T("\ue000\ue001 (a)")]),
    # stray ) and unclosed (
    ("a) (b)", [T("a) (b)")]),
    ("a) ((b))", [T("a) ("), T("b", G1), T(")")]),
    ("(a))", [T("a", G1), T(")")]),
    ("(a", [T("(a")]),
    ("a (b", [T("a "), T("(b")]),
    ("((a)", [T("(a", G1)]),
    # unclosed but ending in ")": a group by the rule, whose colon belongs to the outer level
    ("(a (b:1.5)", [T("a ", 1.5), T("(b", 1.5)]),
    # square brackets are plain text
    ("[a]", [T("[a]")]),
    ("([a]:1.2)", [T("[a]", 1.2)]),
    ("[(a)]", [T("["), T("a", G1), T("]")]),
    # empty groups
    ("()", []),
    ("(())", []),
    ("a () b", [T("a "), T(" b")]),
    ("( )", [T(" ", G1)]),
    ("(:1.5:2)", [T(":1.5", 2.0)]),
    # unicode
    ("(café ✨:1.2), 少女", [T("café ✨", 1.2), T(", 少女")]),
    ("(🎨)", [T("🎨", G1)]),
    # embeddings: at the start, after a space or a newline; NAME ends at whitespace
    ("embedding:foo", [E("foo")]),
    ("a embedding:foo b", [T("a"), E("foo"), T(" b")]),
    ("a\nembedding:foo", [T("a"), E("foo")]),
    ("embedding:foo, bar", [E("foo"), T(", bar")]),
    ("embedding:foo,,", [E("foo"), T(",,")]),
    ("embedding:foo.safetensors x", [E("foo.safetensors"), T(" x")]),
    ("embedding:foo embedding:bar", [E("foo"), E("bar")]),
    ("xembedding:foo", [T("xembedding:foo")]),
    ("a,embedding:foo", [T("a,embedding:foo")]),
    ("a\tembedding:foo", [T("a\tembedding:foo")]),
    ("(embedding:foo:1.2)", [E("foo", 1.2)]),
    ("(embedding:foo)", [E("foo", G1)]),
    ("(a embedding:foo)", [T("a", G1), E("foo", G1)]),
    ("Embedding:foo", [T("Embedding:foo")]),
]


@pytest.mark.parametrize(("prompt", "expected"), CASES, ids=[repr(c[0]) for c in CASES])
def test_parse(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_two_levels_is_exactly_the_documented_float():
    (segment,) = parse_prompt("((x))")
    assert segment.weight == 1.2100000000000002
    assert segment.weight != 1.21


def test_bare_nesting_up_to_the_limit():
    depth = 24  # 1.1 ** 24 = 9.85, the deepest bare nesting within WEIGHT_LIMIT
    expected = 1.0
    for _ in range(depth):
        expected *= 1.1
    assert expected <= WEIGHT_LIMIT < expected * 1.1
    assert parse_prompt("(" * depth + "x" + ")" * depth) == [T("x", expected)]
    with pytest.raises(InvalidArgument):
        parse_prompt("(" * (depth + 1) + "x" + ")" * (depth + 1))


@pytest.mark.parametrize(
    ("prompt", "part"),
    [
        ("(x:inf)", "(x:inf)"),
        ("(x:-inf)", "(x:-inf)"),
        ("(x:nan)", "(x:nan)"),
        ("(x:Infinity)", "(x:Infinity)"),
        ("(x:1e400)", "(x:1e400)"),  # float() overflows to inf
        ("(x:10.5)", "(x:10.5)"),
        ("(x:-11)", "(x:-11)"),
        ("a, (b (c:inf) d), e", "(c:inf)"),
        ("((x:9.5))", None),  # allowed: replaced, not multiplied
    ],
)
def test_weights_out_of_range_are_refused_naming_the_group(prompt, part):
    if part is None:
        assert parse_prompt(prompt) == [T("x", 9.5)]
        return
    with pytest.raises(InvalidArgument) as raised:
        parse_prompt(prompt, "negativePrompt")
    error = raised.value
    assert error.field == "negativePrompt"
    assert error.value == part
    assert f"from {-WEIGHT_LIMIT:g} to {WEIGHT_LIMIT:g}" in error.message
    assert error.message.startswith(f"invalid negativePrompt {part!r}")


def test_limits_are_inclusive():
    assert parse_prompt("(a:10)(b:-10)") == [T("a", 10.0), T("b", -10.0)]


def test_a_long_group_is_quoted_by_both_ends():
    group = "(" + "word " * 30 + ":inf)"
    with pytest.raises(InvalidArgument) as raised:
        parse_prompt(group)
    value = raised.value.value
    assert len(value) <= 60 and value.startswith("(word") and value.endswith(":inf)")


def test_nesting_depth_is_capped():
    prompt = "x"
    for _ in range(MAX_GROUP_DEPTH):
        prompt = f"({prompt}:1)"
    assert parse_prompt(prompt) == [T("x", 1.0)]
    with pytest.raises(InvalidArgument) as raised:
        parse_prompt(f"({prompt}:1)")
    assert f"at most {MAX_GROUP_DEPTH} deep" in raised.value.message


def test_deep_unclosed_brackets_are_cheap_plain_text():
    prompt = "(" * 3000
    assert parse_prompt(prompt) == [T(prompt)]


@pytest.mark.parametrize("prompt", ["embedding:", "a embedding: foo", "embedding:,"])
def test_embedding_without_a_name_is_refused(prompt):
    with pytest.raises(InvalidArgument) as raised:
        parse_prompt(prompt)
    assert raised.value.field == "prompt"
    assert "embedding:NAME" in raised.value.message


def test_parser_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, t2i.prompts.parser, t2i.prompts.chunks; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
