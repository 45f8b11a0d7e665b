"""Prompt weights as ComfyUI's CLIPTextEncode reads them (docs/prompts.md, sections 1 and 5).

A prompt becomes a list of segments, each plain text or an `embedding:NAME` reference, with a
weight. The rules, in order:

1. `\\(` and `\\)` are literal parentheses; no other escape exists.
2. A depth counter cuts the text into segments: `(` at depth 0 starts one, the `)` that brings
   the depth back to exactly 0 ends it. A stray `)` at depth 0 takes the counter to -1, and the
   brackets after it then stay plain text; this quirk is kept so prompts mean what they mean
   in ComfyUI.
3. A segment that starts with `(` and ends with `)` is a group: weight = current x 1.1, unless
   the text after its last colon (at a position > 0) reads as a Python float, which *replaces*
   the weight. The inner text is parsed again with the group's weight.
4. Everything else keeps the current weight; square brackets are plain text.
5. `embedding:NAME` at the start of a segment or after a space or newline names a textual
   inversion; NAME runs to the next whitespace, trailing commas go back to the text.

No torch here: the parser runs on the event loop before a request is queued.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import InvalidArgument

# Weights users write are 0.5..1.5 and sometimes negative; ComfyUI takes any float. Beyond
# +-10 the conditioning is far outside anything the UNet has seen, so such a weight is a typo
# (`(x:12)` for `(x:1.2)`) rather than intent. Ten also allows 24 levels of bare `((...))`.
WEIGHT_LIMIT = 10.0
# Groups are parsed by recursion and each level rescans its text; a 3000-character prompt of
# `((((...` would otherwise cost seconds on the event loop. No real prompt nests this deep.
MAX_GROUP_DEPTH = 50
EMBEDDING_PREFIX = "embedding:"
# An error message quotes this much of a group, keeping both ends (the weight is at the end).
_EXCERPT = 60

# ComfyUI splits a segment before " embedding:" and "\nembedding:", dropping the separator.
_EMBEDDING_SPLIT = re.compile(r"[ \n]" + re.escape(EMBEDDING_PREFIX))


@dataclass(frozen=True)
class TextSegment:
    text: str
    weight: float


@dataclass(frozen=True)
class EmbeddingSegment:
    name: str  # as written, trailing commas removed; resolved later against the model's files
    weight: float


Segment = TextSegment | EmbeddingSegment


def parse_prompt(text: str, field: str = "prompt") -> list[Segment]:
    """The weighted segments of `text`; InvalidArgument(field, ...) for weights out of range,
    nesting deeper than MAX_GROUP_DEPTH or `embedding:` without a name."""
    markers = _Markers(text)
    weighted = _weigh(markers.escape(text), 1.0, 0, field, markers)
    segments: list[Segment] = []
    for piece, weight in weighted:
        segments.extend(_split_embeddings(markers.restore(piece), weight, field))
    return segments


def _weigh(text: str, current: float, depth: int, field: str, markers: _Markers) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for segment in _cut(text):
        if not (len(segment) >= 2 and segment[0] == "(" and segment[-1] == ")"):
            if segment:
                out.append((segment, current))
            continue
        if depth >= MAX_GROUP_DEPTH:
            raise InvalidArgument(field, markers.excerpt(segment), f"groups may be nested at most {MAX_GROUP_DEPTH} deep")
        inner = segment[1:-1]
        weight = current * 1.1
        colon = inner.rfind(":")
        if colon > 0:
            try:
                weight = float(inner[colon + 1 :])
            except ValueError:
                pass  # not a number: the colon is text and the x1.1 stands
            else:
                inner = inner[:colon]
        if not (math.isfinite(weight) and -WEIGHT_LIMIT <= weight <= WEIGHT_LIMIT):
            raise InvalidArgument(
                field, markers.excerpt(segment), f"a weight must be a finite number from {-WEIGHT_LIMIT:g} to {WEIGHT_LIMIT:g}, got {weight!r}"
            )
        out.extend(_weigh(inner, weight, depth + 1, field, markers))
    return out


def _cut(text: str) -> list[str]:
    """Segments by the depth counter (rule 2), quirk included."""
    segments: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    segments.append("".join(current))
                current = []
            current.append(char)
            depth += 1
        elif char == ")":
            depth -= 1
            current.append(char)
            if depth == 0:
                segments.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        segments.append("".join(current))
    return segments


def _split_embeddings(text: str, weight: float, field: str) -> list[Segment]:
    pieces = _EMBEDDING_SPLIT.split(text)
    out: list[Segment] = []
    if pieces[0].startswith(EMBEDDING_PREFIX):
        rest = [pieces[0][len(EMBEDDING_PREFIX) :]]
    else:
        if pieces[0]:
            out.append(TextSegment(pieces[0], weight))
        rest = []
    for reference in [*rest, *pieces[1:]]:
        name = re.match(r"\S*", reference).group()
        leftover = reference[len(name) :]
        stripped = name.rstrip(",")
        if not stripped:
            raise InvalidArgument(
                field, EMBEDDING_PREFIX + reference[:20], "embedding: must be followed directly by a name (embedding:NAME)"
            )
        out.append(EmbeddingSegment(stripped, weight))
        # Trailing commas are text, as if written after the embedding.
        leftover = name[len(stripped) :] + leftover
        if leftover:
            out.append(TextSegment(leftover, weight))
    return out


class _Markers:
    """Stand-ins for escaped parentheses while parsing.

    ComfyUI uses "\\0\\1" and "\\0\\2", which a prompt could contain itself; two private-use
    characters that do not occur in this prompt cannot collide."""

    def __init__(self, text: str) -> None:
        used = set(text)
        free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used)
        self.open, self.close = next(free), next(free)

    def escape(self, text: str) -> str:
        return text.replace("\\)", self.close).replace("\\(", self.open)

    def restore(self, text: str) -> str:
        return text.replace(self.open, "(").replace(self.close, ")")

    def excerpt(self, group: str) -> str:
        """The group as the user wrote it, shortened to both ends if long."""
        written = group.replace(self.open, "\\(").replace(self.close, "\\)")
        if len(written) <= _EXCERPT:
            return written
        half = (_EXCERPT - 3) // 2
        return written[:half] + "..." + written[-half:]
