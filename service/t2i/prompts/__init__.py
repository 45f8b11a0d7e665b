"""Prompt conditioning that reproduces ComfyUI's CLIPTextEncode on SDXL (docs/prompts.md).

`parser` turns a prompt into weighted segments, `chunks` turns segments into 77-token chunks
per tokenizer, `embeddings` loads a model's textual inversions. The first two import no torch:
they run on the event loop when a request is checked. t2i.engine.text encodes the result.
"""

from .chunks import CHUNK_LENGTH, CHUNK_TOKENS, Chunk, SpecialTokens, VectorRef, chunk_segments
from .parser import WEIGHT_LIMIT, EmbeddingSegment, Segment, TextSegment, parse_prompt

__all__ = [
    "CHUNK_LENGTH",
    "CHUNK_TOKENS",
    "WEIGHT_LIMIT",
    "Chunk",
    "EmbeddingSegment",
    "Segment",
    "SpecialTokens",
    "TextSegment",
    "VectorRef",
    "chunk_segments",
    "parse_prompt",
]
