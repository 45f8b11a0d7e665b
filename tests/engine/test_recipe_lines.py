"""The A1111 `parameters` text an image carries gives an A1111-style reader the request's own
negative prompt and settings, whatever lines the prompts hold; the prompts are written the way
the text encoder reads them, so the recipe still makes the same image. Text fields with control
characters (NUL would end the PNG text chunk) are refused, naming the field."""

import pytest

from t2i.domain import GenerateRequest, ModelInfo
from t2i.engine.recipe import parameters
from t2i.engine.text import prepare_prompt
from t2i.errors import InvalidArgument
from t2i.validation import validate

from ..support.a1111 import parse_parameters

FORGED = "1girl\nNegative prompt: forged negative\nSteps: 99, Sampler: Forged, Seed: 7, Size: 8x8"
MODEL = ModelInfo(id=1, name="m", min_size=64, max_size=1024, max_steps=150, max_pixels=1024 * 1024, max_prompt_chunks=8)


def request(prompt: str, negative: str = "") -> GenerateRequest:
    return GenerateRequest(model_id=1, prompt=prompt, negative_prompt=negative, width=64, height=64, steps=12,
                           cfg_scale=6.0, seed=5, sampler="euler_ancestral", scheduler="karras")


def recipe(prompt: str, negative: str = "") -> str:
    return parameters(request(prompt, negative), 5, "model", "0123456789abcdef", {})


def a1111_lines(text: str) -> list[str]:
    """How A1111's reader cuts the text: stripped, split at line feeds, each line stripped."""
    return [line.strip() for line in text.strip().split("\n")]


@pytest.mark.parametrize("negative", ["worst quality\r\nSteps: 1, Sampler: Forged, Seed: 1", ""])
def test_line_breaks_in_the_prompts_forge_neither_the_negative_prompt_nor_the_settings(negative):
    text = recipe(FORGED, negative)
    read = parse_parameters(text)
    assert read["negative"] == negative.replace("\r\n", "  ")
    assert read["prompt"] == FORGED.replace("\n", " ")
    assert (read["Steps"], read["Sampler"], read["Seed"], read["Size"]) == ("12", "Euler a", "5", "64x64")
    # One line per part, for readers that split lines any way at all.
    assert len(text.splitlines()) == (3 if negative else 2)
    assert [line.startswith("Negative prompt:") for line in a1111_lines(text)] == ([False, True, False] if negative else [False, False])


@pytest.mark.parametrize("prompt", ["Negative prompt: forged", "  Negative prompt: forged", "x\nNegative prompt: forged"])
def test_a_prompt_line_starting_like_the_negative_label_is_not_read_as_one(prompt):
    read = parse_parameters(recipe(prompt, "real negative"))
    assert read["negative"] == "real negative"
    assert read["prompt"].lower() == prompt.replace("\n", " ").lower()
    assert [line.startswith("Negative prompt:") for line in a1111_lines(recipe(prompt))] == [False, False]


@pytest.mark.parametrize("prompt", [
    FORGED,
    "Negative prompt: (masterpiece:1.2),\r\n((smile))\u2028hatsune miku \\(vocaloid\\)\u2029 (x\n:0.5)",
])
def test_the_recipe_prompt_encodes_exactly_like_the_prompt_sent(demo_model, prompt):
    read = parse_parameters(recipe(prompt))["prompt"]
    assert read != prompt
    sent, written = prepare_prompt(demo_model, prompt), prepare_prompt(demo_model, read)
    assert written.chunks == sent.chunks and written.weighted == sent.weighted


@pytest.mark.parametrize("field, attribute", [("prompt", "prompt"), ("negativePrompt", "negative_prompt")])
@pytest.mark.parametrize("character", ["\x00", "\x0b", "\x1e", "\x7f", "\x85"])
def test_control_characters_in_text_fields_are_refused_naming_the_field(field, attribute, character):
    fields = {"prompt": "1girl", "negative_prompt": "lowres", attribute: f"ab{character}c"}
    with pytest.raises(InvalidArgument) as refused:
        validate(request(fields["prompt"], fields["negative_prompt"]), MODEL)
    assert refused.value.field == field and refused.value.value == f"ab{character}c"
    assert f"U+{ord(character):04X} at position 2" in refused.value.message
    assert "tab, line feed and carriage return" in refused.value.message


def test_tabs_and_line_breaks_are_fine():
    validate(request("1girl,\tsmile\r\nblue sky\n", "lowres\n"), MODEL)
