"""Prompts read by A1111's rules (AUTOMATIC1111's stable-diffusion-webui), for the A1111-compatible API.

The service's own fields read prompts the way ComfyUI does (parser.py, chunks.py). The
A1111-compatible API (`/sdapi/v1/txt2img`) reads them the way A1111 does, which differs in
weights, chunking and syntax. This module was written from A1111's documentation (its wiki's
"Attention/emphasis", "Infinite prompt length" and "BREAK" sections, its settings' descriptions)
and from the examples A1111 documents for its prompt parser; `tests/prompts/test_a1111.py`
repeats those examples as facts. No A1111 code is used here (A1111 is AGPL).

What A1111 does to a prompt, in its order, and what this module does with it:

1. Comments ("Enable comments", on by default): `#` up to the end of its line is removed,
   in the prompt and in the negative prompt (`comments=False` turns this off).
2. Extra networks, prompt only: every `<TYPE:ARGS>` tag (TYPE made of word characters) is
   cut out of the text, leaving nothing in its place. `<lora:...>` (and its alias `<lyco:...>`)
   becomes a LoraTag; other types (`<hypernet:...>`, ...) are refused: this API has none of
   them. A1111 reads no tags in the negative prompt (it encodes them as text), so a tag
   there is refused: it cannot mean what its writer wanted.
   `<lora:NAME>`, `<lora:NAME:TE>`, `<lora:NAME:TE:UNET>`: the first number is the text
   encoder's multiplier (default 1), the second the UNet's (default: the first); `te=` and
   `unet=` set them by name. A fourth value (DyLoRA's `dyn`) and other named values are refused.
3. Composable diffusion, prompt only: A1111 splits the prompt at `AND` (uppercase, a word of
   its own) into prompts whose guidance is added, and reads a `:NUMBER` at the very end of
   each as that prompt's guidance weight. `AND` is refused. A final `:1` (weight 1) changes
   nothing but the text, so it is removed as A1111 does; any other final weight is refused.
   (`(x:1.5)` ends in `)` and is not such a weight.) In the negative prompt both are text.
4. Prompt editing `[from:to:when]` (also `[to:when]`, `[from::when]`) and alternation
   `[a|b]`: refused, in both prompts (see `_refuse_scheduling` for what counts).
5. Attention (emphasis), `parse_prompt_attention` in A1111:
   - `(x)` multiplies the weight of x by 1.1, `[x]` by 1/1.1, `(x:w)` by w. `:w` counts
     only directly before the `)` (spaces allowed around w), w written with digits, dots and
     an optional sign: `(a:b:1.2)` is `a:b` at 1.2, `(a:1e-1)` is the text `a:1e-1` at 1.1.
   - Nesting multiplies, numbers included: `((x:1.5))` is 1.5 x 1.1. The multiplications
     happen in the order the brackets close, as floats, so the documented values come out
     exactly (1.1 x 1.1 = 1.2100000000000002).
   - Round and square brackets are counted separately: `)` closes the last open `(`, `]` the
     last open `[`; a closer with nothing open is text. Brackets still open at the end apply
     to everything after them (all open `(` first, then all open `[`).
   - `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters; a backslash before
     anything else disappears (A1111 drops it).
   - Neighbouring pieces with the same weight are joined; an empty prompt is `("", 1.0)`.
6. `BREAK` (uppercase, a word of its own) ends the current 75-token chunk: the chunk is
   padded and the text after it starts a new one. A1111 only honours it outside brackets
   (inside, its parser turns it into the text "BREAK" with a negative weight); here it is a
   break wherever it stands.
7. Textual inversions are named by their plain file name (no `embedding:` prefix). A1111
   finds them after tokenizing: a run of token ids equal to the ids of an embedding's name,
   within one weighted piece, longest name first (EmbeddingIndex, chunk_a1111). Because the
   CLIP tokenizer lowercases, `EasyNegative` and `easynegative` are the same name.
8. Chunks (chunk_a1111): 75 tokens between start and end tokens, as in ComfyUI, but when a
   chunk is full and the next token is not a comma, and a comma stands among the chunk's last
   COMMA_BACKOFF (20) positions, the tokens after that comma move to the next chunk and the
   chunk is padded ("Prompt word wrap length limit", `comma_padding_backtrack`, default 20).
   An embedding's vectors never split: if they do not fit, the chunk is closed first.

Emphasis is applied after the text encoder by t2i.prompts.emphasis.original_emphasis.

Weights are checked like the ComfyUI parser's: finite, within +-WEIGHT_LIMIT, at most
MAX_GROUP_DEPTH brackets open around a piece of text. No torch here: this runs on the event
loop before a request is queued.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import InvalidArgument
from .chunks import CHUNK_TOKENS, DEFAULT_MAX_CHUNKS, Chunk, SpecialTokens, Token, VectorRef
from .parser import MAX_GROUP_DEPTH, WEIGHT_LIMIT

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # A1111 multiplies by 1/1.1 (it does not divide by 1.1)
COMMA_BACKOFF = 20  # A1111's default "Prompt word wrap length limit"
MAX_COMMA_BACKOFF = CHUNK_TOKENS - 1  # its setting's range is 0..74
LORA_TAGS = ("lora", "lyco")  # A1111's Lora extension registers "lyco" as an alias
_EXCERPT = 60


class Break(enum.Enum):
    """`BREAK` in a prompt: the current chunk ends here."""

    BREAK = "BREAK"

    def __repr__(self) -> str:
        return "BREAK"


BREAK = Break.BREAK

Segment = tuple[str, float] | Break  # a piece of text and its weight, or a BREAK


@dataclass(frozen=True)
class LoraTag:
    """A `<lora:NAME:TE:UNET>` tag; for t2i.lora.LoraRequest(name, strength_model=unet,
    strength_clip=text_encoder)."""

    name: str  # as written
    text_encoder: float = 1.0
    unet: float = 1.0


@dataclass(frozen=True)
class A1111Prompt:
    segments: tuple[Segment, ...]
    loras: tuple[LoraTag, ...] = ()

    @property
    def weighted(self) -> bool:
        return any(s is not BREAK and s[1] != 1.0 for s in self.segments)


def parse_a1111(
    text: str, field: str = "prompt", *, negative: bool = False, comments: bool = True
) -> A1111Prompt:
    """The weighted segments and LoRA tags of `text` read by A1111's rules (module docstring).

    `negative`: the text is a negative prompt (no tags, `AND` or final weight there).
    InvalidArgument(field, ...) for what this API cannot do as A1111 would, and for bad weights."""
    if comments:
        text = strip_comments(text)
    loras: list[LoraTag] = []
    text = _take_extra_networks(text, field, negative, loras)
    if not negative:
        text = _refuse_composable(text, field)
    _refuse_scheduling(text, field)
    return A1111Prompt(tuple(_attention(text, field)), tuple(loras))


def strip_comments(text: str) -> str:
    """Text without `#` comments: from `#` to the end of its line. (A1111 also drops a blank
    line left by a whole-line comment; whitespace makes no token, so that is the same.)"""
    return _COMMENT.sub("", text)


_COMMENT = re.compile(r"#[^\n]*")

# ------------------------------------------------------------------------------ extra networks

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_FORM = "<lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>"


def _take_extra_networks(text: str, field: str, negative: bool, loras: list[LoraTag]) -> str:
    def take(match: re.Match) -> str:
        tag, kind = match.group(0), match.group(1)
        if negative:
            raise InvalidArgument(
                field,
                _excerpt(tag),
                "A1111 applies <...> tags (LoRAs and other extra networks) only from the prompt and "
                "would encode this one as text; put LoRAs in the prompt",
            )
        if kind not in LORA_TAGS:
            raise InvalidArgument(
                field,
                _excerpt(tag),
                f"<{kind}:...> tags are not supported on this API; of A1111's extra networks only LoRAs are "
                f"({_LORA_FORM})",
            )
        loras.append(_lora(tag, match.group(2), field))
        return ""

    return _EXTRA_NETWORK.sub(take, text)


def _lora(tag: str, arguments: str, field: str) -> LoraTag:
    value = _excerpt(tag)
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in arguments.split(":"):
        key, equals, rest = item.partition("=")
        if equals and "=" not in rest:  # exactly one "=": a named value, as A1111 reads it
            named[key] = rest
        else:
            positional.append(item)
    if not positional or not positional[0]:
        raise InvalidArgument(field, value, f"a LoRA tag starts with the LoRA's name: {_LORA_FORM}")
    if len(positional) > 3 or "dyn" in named:
        raise InvalidArgument(
            field,
            value,
            f"a LoRA tag has at most two weights ({_LORA_FORM}); A1111's DyLoRA dimension (dyn) is not "
            "supported",
        )
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise InvalidArgument(
            field, value, f"unknown LoRA setting {unknown[0]}=; the settings are te= and unet="
        )

    def number(written: str) -> float:
        try:
            result = float(written)
        except ValueError:
            raise InvalidArgument(field, value, f"{written!r} is not a number ({_LORA_FORM})") from None
        if not math.isfinite(result):
            raise InvalidArgument(field, value, f"a LoRA weight must be a finite number, got {written!r}")
        return result

    text_encoder = number(positional[1]) if len(positional) > 1 else 1.0
    if "te" in named:
        text_encoder = number(named["te"])
    unet = number(positional[2]) if len(positional) > 2 else text_encoder
    if "unet" in named:
        unet = number(named["unet"])
    return LoraTag(positional[0], text_encoder, unet)


# ------------------------------------------------------------------------ composable diffusion

_AND = re.compile(r"\bAND\b")
# A1111's per-prompt weight: a colon and a number (digits, one optional dot, optional sign)
# at the very end of the prompt, spaces allowed around both.
_GUIDANCE_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*\Z")


def _refuse_composable(text: str, field: str) -> str:
    found = _AND.search(text)
    if found:
        raise InvalidArgument(
            field,
            _excerpt(text[max(0, found.start() - 20) : found.end() + 20]),
            "AND (A1111's composable diffusion, which adds the guidance of several prompts) is not "
            "supported on this API; write 'and' in lowercase for the word",
        )
    found = _GUIDANCE_WEIGHT.search(text)
    if found:
        if float(found.group(1)) == 1.0:
            return text[: found.start()]  # A1111 takes ":1" off the text and guides at weight 1
        raise InvalidArgument(
            field,
            found.group(0).strip(),
            "A1111 reads a ':NUMBER' at the end of a prompt as the whole prompt's weight in composable "
            "diffusion (it scales the guidance); that is not supported on this API: remove it or end the "
            "prompt with something else, a comma for example",
        )
    return text


# ------------------------------------------------------------------- prompt editing, alternation

# What A1111's scheduling grammar takes for the `when` of [from:to:when]: an optionally signed
# integer or decimal, with an optional exponent, spaces allowed around it.
_WHEN = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*\Z")


@dataclass
class _Open:
    bracket: str  # "(" or "["
    start: int
    colons: list[int]  # positions of its own colons (not those of groups inside it)
    bar: int = -1  # position of its first own "|"
    broken: bool = False  # holds a stray closer: A1111's grammar cannot read it as a group


def _refuse_scheduling(text: str, field: str) -> None:
    """Refuse square-bracket groups that A1111's scheduling grammar reads as prompt editing or
    alternation.

    Brackets are matched as that grammar matches them: any backslash escapes the next
    character, groups nest properly, a closer that does not match the innermost open bracket
    spoils the groups it stands in. A `[...]` group is alternation if it holds a `|` of its own
    (not inside an inner group), and prompt editing if it holds one or two colons of its own
    and the text after the last one is a number. So `[x]`, `[a:b]`, `[a:b:c]`, `(x:1.5)`,
    `(a|b)` and `a: b` are left alone. A1111 itself reads a whole prompt literally when its
    grammar fails anywhere (a `|` outside square brackets, say); such prompts may be refused
    here although A1111 would have ignored the editing: refusing is the safe side.
    """
    stack: list[_Open] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if char in "([":
            stack.append(_Open(char, position, []))
        elif char in ")]":
            opener = "(" if char == ")" else "["
            if stack and stack[-1].bracket == opener:
                group = stack.pop()
                if opener == "[" and not group.broken:
                    _check_square(text, group, position, field)
            elif stack:
                for group in stack:
                    group.broken = True
        elif char == ":" and stack:
            stack[-1].colons.append(position)
        elif char == "|" and stack and stack[-1].bar < 0:
            stack[-1].bar = position
        position += 1


def _check_square(text: str, group: _Open, end: int, field: str) -> None:
    written = text[group.start : end + 1]
    if group.bar >= 0:
        raise InvalidArgument(
            field,
            _excerpt(written),
            "alternation [a|b] is not supported on this API (A1111 switches between the texts at every "
            "sampling step); write one text, or escape the brackets as \\[ \\] to keep them as text",
        )
    if 1 <= len(group.colons) <= 2 and _WHEN.match(text, group.colons[-1] + 1, end):
        raise InvalidArgument(
            field,
            _excerpt(written),
            "prompt editing [from:to:when] is not supported on this API (A1111 changes the text during "
            "sampling); write the text you want for the whole generation, or escape the brackets as "
            "\\[ \\] to keep them as text",
        )


# ----------------------------------------------------------------------------------- attention

_SPECIAL = re.compile(r"[\\()\[\]:]")
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPED = "()[]\\"


def _attention(text: str, field: str) -> list[Segment]:
    pieces: list[list] = []  # [text, weight] or [BREAK, None]
    rounds: list[int] = []  # index in pieces where each open "(" started
    squares: list[int] = []
    pending: list[str] | None = None  # text read since the last bracket; None: nothing read

    def add(part: str) -> None:
        nonlocal pending
        pending = [part] if pending is None else [*pending, part]

    def flush() -> None:
        nonlocal pending
        if pending is None:
            return
        if len(rounds) + len(squares) > MAX_GROUP_DEPTH:
            raise InvalidArgument(
                field, _excerpt("".join(pending)), f"brackets may be nested at most {MAX_GROUP_DEPTH} deep"
            )
        pieces.append(["".join(pending), 1.0])
        pending = None

    def multiply(start: int, by: float) -> None:
        for piece in pieces[start:]:
            if piece[0] is not BREAK:
                piece[1] *= by

    def plain(run: str) -> None:
        parts = _BREAK_WORD.split(run)
        add(parts[0])
        for part in parts[1:]:
            flush()
            pieces.append([BREAK, None])
            add(part)

    position = 0
    while position < len(text):
        char = text[position]
        if char == "\\":
            following = text[position + 1 : position + 2]
            if following and following in _ESCAPED:
                add(following)
                position += 2
            else:
                add("")  # a backslash before anything else is dropped
                position += 1
            continue
        if char == "(" or char == "[":
            flush()
            (rounds if char == "(" else squares).append(len(pieces))
            position += 1
            continue
        if char == ":":
            weight = _WEIGHT.match(text, position)
            if weight and rounds:
                flush()
                multiply(rounds.pop(), _weight(weight, text, field))
                position = weight.end()
            elif weight:
                plain(weight.group(0))
                position = weight.end()
            else:
                plain(":")
                position += 1
            continue
        if char == ")" and rounds:
            flush()
            multiply(rounds.pop(), ROUND_MULTIPLIER)
        elif char == "]" and squares:
            flush()
            multiply(squares.pop(), SQUARE_MULTIPLIER)
        elif char in ")]":
            plain(char)
        else:
            special = _SPECIAL.search(text, position)
            end = special.start() if special else len(text)
            plain(text[position:end])
            position = end
            continue
        position += 1
    flush()
    for start in rounds:
        multiply(start, ROUND_MULTIPLIER)
    for start in squares:
        multiply(start, SQUARE_MULTIPLIER)
    if not pieces:
        return [("", 1.0)]

    merged: list[Segment] = []
    for piece_text, weight in pieces:
        if piece_text is BREAK:
            merged.append(BREAK)
        elif merged and merged[-1] is not BREAK and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    for segment in merged:
        if segment is BREAK or (math.isfinite(segment[1]) and -WEIGHT_LIMIT <= segment[1] <= WEIGHT_LIMIT):
            continue
        raise InvalidArgument(
            field,
            _excerpt(segment[0]),
            f"a weight must be a finite number from {-WEIGHT_LIMIT:g} to {WEIGHT_LIMIT:g}, "
            f"got {segment[1]!r} (A1111 multiplies the weights of nested brackets)",
        )
    return merged


def _weight(match: re.Match, text: str, field: str) -> float:
    try:
        return float(match.group(1))
    except ValueError:
        # A1111 fails the whole generation here.
        raise InvalidArgument(
            field,
            _excerpt(text[max(0, match.start() - 30) : match.end()]),
            f"{match.group(1)!r} is not a number; a weight is written (text:1.2)",
        ) from None


def _excerpt(text: str) -> str:
    if len(text) <= _EXCERPT:
        return text
    half = (_EXCERPT - 3) // 2
    return text[:half] + "..." + text[-half:]


# -------------------------------------------------------------------------------------- chunks

Piece = tuple[Sequence[int], float] | Break  # a segment's token ids (no start/end) and weight, or a BREAK
Tokenize = Callable[[list[str]], list[list[int]]]  # texts -> token ids without start and end tokens


@dataclass(frozen=True)
class KnownEmbedding:
    name: str  # as the model's embeddings know it (file name without .safetensors)
    ids: tuple[int, ...]  # the name tokenized like prompt text, without start and end tokens
    vectors: int


class EmbeddingIndex:
    """A model's textual inversions for one tokenizer, found in token ids as A1111 finds them:
    at a position, the longest name whose ids follow; names with the same ids: the first given."""

    def __init__(self, embeddings: Iterable[KnownEmbedding]) -> None:
        by_first: dict[int, list[KnownEmbedding]] = {}
        for embedding in embeddings:
            if embedding.vectors < 1:
                raise ValueError(f"embedding {embedding.name!r} has {embedding.vectors} vectors")
            if embedding.ids:  # a name that makes no token can never be found
                by_first.setdefault(embedding.ids[0], []).append(embedding)
        # sorted() is stable: among names of the same length, the given order stands.
        self._by_first = {
            first: tuple(sorted(found, key=lambda e: -len(e.ids))) for first, found in by_first.items()
        }

    @classmethod
    def build(cls, vector_counts: Mapping[str, int], tokenize: Tokenize) -> EmbeddingIndex:
        """From {name: number of vectors} and a tokenizer (texts -> ids without start/end);
        names are taken in sorted order, which settles names that tokenize alike."""
        names = sorted(vector_counts)
        ids = tokenize(names) if names else []
        return cls(KnownEmbedding(name, tuple(found), vector_counts[name]) for name, found in zip(names, ids))

    def match(self, ids: Sequence[int], position: int) -> KnownEmbedding | None:
        for candidate in self._by_first.get(ids[position], ()):
            if tuple(ids[position : position + len(candidate.ids)]) == candidate.ids:
                return candidate
        return None


@dataclass(frozen=True)
class A1111Chunks:
    chunks: tuple[Chunk, ...]  # each CHUNK_LENGTH long
    # One name per embedding found, in prompt order; VectorRef(i) is row i of their vectors
    # stacked in this order (the same numbering as t2i.engine.text.PreparedPrompt.embeddings).
    embeddings: tuple[str, ...]
    tokens: int  # text tokens and embedding vectors, padding not counted

    @property
    def weighted(self) -> bool:
        return any(weight != 1.0 for chunk in self.chunks for _, weight in chunk)


def tokenize_segments(segments: Sequence[Segment], tokenize: Tokenize) -> list[Piece]:
    """The pieces for chunk_a1111: each segment's text tokenized on its own, as A1111 does, with
    one tokenizer call for the distinct texts (`tokenize` maps texts to ids without start/end)."""
    texts = list(dict.fromkeys(s[0] for s in segments if s is not BREAK and s[0]))
    ids = dict(zip(texts, tokenize(texts))) if texts else {}
    return [BREAK if s is BREAK else (tuple(ids.get(s[0], ())), s[1]) for s in segments]


def chunk_a1111(
    pieces: Sequence[Piece],
    special: SpecialTokens,
    comma: int | None,
    *,
    embeddings: EmbeddingIndex | None = None,
    backoff: int = COMMA_BACKOFF,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
    field: str = "prompt",
    prompt: str = "",
) -> A1111Chunks:
    """A1111's chunks of one prompt for one tokenizer.

    `comma` is the tokenizer's id of "," as a word (`,</w>`, 267 in CLIP's vocabulary; None:
    no back-off). Rules, token by token (module docstring, 8):
    - a comma remembers its place in the chunk;
    - when the chunk holds 75 tokens and the token is not a comma: if the last comma stands at
      place p with 75 - p <= backoff, the tokens after it move to a new chunk (with their
      weights and embedding vectors) and the full chunk is closed at p + 1; otherwise the
      chunk is closed as it is. Closing forgets the comma;
    - an embedding whose vectors do not fit closes the chunk first; it is never split;
    - BREAK closes the chunk, even an empty one (a leading BREAK makes an empty chunk); the
      chunk left at the end is closed if it holds anything, and an empty prompt is one chunk.
    A chunk is start, its tokens, end, then `special.pad` up to 77; start, end and padding
    weigh 1. More than `max_chunks` chunks is InvalidArgument(field, prompt, ...).

    One deliberate difference: A1111 leaves an embedding's vectors behind in the closed chunk
    when the comma back-off moves its placeholder tokens on (they land on that chunk's padding);
    here the vectors move with their places.
    """
    if not 0 <= backoff <= MAX_COMMA_BACKOFF:
        raise ValueError(f"backoff is 0 to {MAX_COMMA_BACKOFF}, got {backoff}")
    chunks: list[Chunk] = []
    current: list[Token] = []
    last_comma = -1
    found: list[str] = []
    rows = 0
    tokens = 0

    def close() -> None:
        nonlocal last_comma
        padding = ((special.pad, 1.0),) * (CHUNK_TOKENS - len(current))
        chunks.append(((special.start, 1.0), *current, (special.end, 1.0), *padding))
        current.clear()
        last_comma = -1

    for piece in pieces:
        if piece is BREAK:
            close()
            continue
        ids, weight = piece
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(current)
            elif len(current) == CHUNK_TOKENS and last_comma >= 0 and CHUNK_TOKENS - last_comma <= backoff:
                moved = current[last_comma + 1 :]
                del current[last_comma + 1 :]
                close()
                current.extend(moved)
            if len(current) == CHUNK_TOKENS:
                close()
            embedding = embeddings.match(ids, position) if embeddings is not None else None
            if embedding is None:
                current.append((token, weight))
                tokens += 1
                position += 1
                continue
            if len(current) + embedding.vectors > CHUNK_TOKENS:
                close()
            found.append(embedding.name)
            current.extend((VectorRef(rows + j), weight) for j in range(embedding.vectors))
            rows += embedding.vectors
            tokens += embedding.vectors
            position += len(embedding.ids)
    if current or not chunks:
        close()
    if len(chunks) > max_chunks:
        raise InvalidArgument(
            field,
            prompt,
            f"is {tokens} CLIP tokens, which take {len(chunks)} chunks of {CHUNK_TOKENS} by A1111's rules "
            f"(BREAK and the comma back-off included); at most {max_chunks} chunks "
            f"({max_chunks * CHUNK_TOKENS} tokens) are allowed",
        )
    return A1111Chunks(tuple(chunks), tuple(found), tokens)
