"""Weighted segments -> CLIP chunks of 77 positions, per tokenizer (docs/prompts.md, 2 and 3).

Each segment is tokenized on its own, without start and end tokens; its tokens carry its
weight. An embedding reference takes one position per vector. Units (a segment's tokens, or
one embedding's vectors) are appended to chunks of start + up to 75 + end + padding:
- a unit that fits goes in whole;
- a unit of SPLIT_MIN_TOKENS or more that does not fit is split: it fills the chunk and goes
  on in the next one. ComfyUI builds chunks from token groups without asking whether a group
  is text or an embedding, so an embedding of 8 or more vectors is split like text;
- a shorter unit that does not fit closes the chunk and moves whole to the next one.

No torch here: chunking runs when a request is checked, so its cap can refuse it up front.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import InvalidArgument
from .parser import EmbeddingSegment, Segment

CHUNK_LENGTH = 77
CHUNK_TOKENS = CHUNK_LENGTH - 2  # room between the start and end tokens
SPLIT_MIN_TOKENS = 8
DEFAULT_MAX_CHUNKS = 8


@dataclass(frozen=True)
class VectorRef:
    """A position filled by an embedding vector: row `index` of the prompt's embedding vectors
    (the same row in every encoder's matrix; see t2i.engine.text.PreparedPrompt)."""

    index: int


Item = int | VectorRef  # a token id, or an embedding vector
Token = tuple[Item, float]  # and its weight
Chunk = tuple[Token, ...]  # CHUNK_LENGTH long


@dataclass(frozen=True)
class SpecialTokens:
    start: int
    end: int
    pad: int  # SDXL's first tokenizer pads with the end token, the second with 0 ("!")


@dataclass(frozen=True)
class _Unit:
    tokens: tuple[Token, ...]

    @property
    def splittable(self) -> bool:
        # One rule for text and embeddings, as in ComfyUI (docs/prompts.md, "Long prompts").
        return len(self.tokens) >= SPLIT_MIN_TOKENS


def chunk_segments(
    segments: Sequence[Segment],
    tokenize: Callable[[list[str]], list[list[int]]],
    special: SpecialTokens,
    vector_counts: Mapping[str, int],
    *,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
    field: str = "prompt",
    prompt: str = "",
) -> list[Chunk]:
    """The chunks of one prompt for one tokenizer.

    `tokenize` maps texts to token ids without start/end tokens; `vector_counts` gives the
    number of vectors of each embedding named in `segments`. More than `max_chunks` chunks is
    an InvalidArgument(field, prompt, ...) that states the token count and the cap."""
    units = _units(segments, tokenize, vector_counts)
    chunks = _chunk(units, special)
    if len(chunks) > max_chunks:
        tokens = sum(len(unit.tokens) for unit in units)
        raise InvalidArgument(
            field,
            prompt,
            f"is {tokens} CLIP tokens, which take {len(chunks)} chunks of {CHUNK_TOKENS}; at most {max_chunks} chunks "
            f"({max_chunks * CHUNK_TOKENS} tokens) are allowed",
        )
    return chunks


def _units(segments: Sequence[Segment], tokenize, vector_counts: Mapping[str, int]) -> list[_Unit]:
    # One tokenizer call for the distinct texts of the prompt: per-text overhead dominates for
    # short segments, and prompts repeat them (", " between groups).
    texts = list(dict.fromkeys(s.text for s in segments if not isinstance(s, EmbeddingSegment)))
    ids = dict(zip(texts, tokenize(texts))) if texts else {}
    units: list[_Unit] = []
    vectors = 0
    for segment in segments:
        if isinstance(segment, EmbeddingSegment):
            count = vector_counts[segment.name]
            refs = tuple((VectorRef(vectors + j), segment.weight) for j in range(count))
            vectors += count
            units.append(_Unit(refs))
        else:
            units.append(_Unit(tuple((token, segment.weight) for token in ids[segment.text])))
    return units


def _chunk(units: list[_Unit], special: SpecialTokens) -> list[Chunk]:
    chunks: list[Chunk] = []
    current: list[Token] = []

    def close() -> None:
        padding = ((special.pad, 1.0),) * (CHUNK_TOKENS - len(current))
        chunks.append(((special.start, 1.0), *current, (special.end, 1.0), *padding))
        current.clear()

    for unit in units:
        rest = unit.tokens
        while rest:
            room = CHUNK_TOKENS - len(current)
            if len(rest) <= room:
                current.extend(rest)
                break
            if unit.splittable:
                current.extend(rest[:room])
                rest = rest[room:]
            close()
    close()
    return chunks
