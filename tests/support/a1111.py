"""A reader of A1111's "parameters" text, written from its format rules (not from its code):

    <prompt, one or more lines>
    Negative prompt: <negative prompt, one or more lines>      (absent when empty)
    Key: value, Key: value, ...                                  (the last line)

A value with a comma, colon or quote is a JSON string."""

from __future__ import annotations

import json
import re

# key: value, where value is a JSON string or runs to the next comma
PARAM = re.compile(r'\s*([\w][\w /+.-]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    lines = text.split("\n")
    *body, last = lines
    settings: dict[str, str] = {}
    for match in PARAM.finditer(last):
        key, value = match.group(1), match.group(2).strip()
        settings[key] = json.loads(value) if value.startswith('"') else value
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").lstrip()
        (negative if in_negative else prompt).append(line)
    settings["prompt"], settings["negative"] = "\n".join(prompt), "\n".join(negative)
    return settings
