"""Prompt conditioning for SDXL's two CLIP text encoders, as ComfyUI's CLIPTextEncode makes it.

Two steps, so that a bad prompt is refused before it is queued (docs/prompts.md):

- `prepare_prompt(model, text, field)` parses weights and `embedding:NAME` references and cuts
  the prompt into 77-token chunks per tokenizer (t2i.prompts). It raises InvalidArgument and
  does no tensor work, so it can run on the event loop.
- `encode_prompts(model, prepared)` encodes a whole batch with ONE forward per encoder: every
  chunk of every prompt is a row, plus one empty-prompt row when any prompt has weights.

A prompt can also be read by A1111's rules (`prepare_prompt(..., syntax="a1111")`,
t2i.prompts.a1111): its own weights, BREAK and comma back-off chunks, textual inversions by
plain name, `<lora:...>` tags, and its "Original" emphasis (t2i.prompts.emphasis) applied to
the hidden states in place of the empty-prompt blend below; an empty negative prompt is zeros
(context and pooled), as A1111 conditions SDXL on an empty negative prompt. Both kinds share
one forward per encoder.

Per encoder SDXL uses the penultimate hidden states. A position of weight w != 1 becomes
z_empty[j] + w * (z[j] - z_empty[j]), with z_empty the empty prompt's chunk at the same
position j. Prompts without weights or embeddings cost exactly what they did before: their
chunks are encoded and concatenated, nothing else. The pooled embedding is CLIP-G's projected
output for the first chunk, unweighted. The two encoders' sequences are joined on the feature
axis, CLIP-L first.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidArgument
from ..prompts import a1111
from ..prompts.chunks import CHUNK_LENGTH, CHUNK_TOKENS, Chunk, SpecialTokens, VectorRef, chunk_segments
from ..prompts.embeddings import Embedding
from ..prompts.emphasis import original_emphasis
from ..prompts.parser import EmbeddingSegment, parse_prompt

WINDOW = CHUNK_LENGTH
CHUNK = CHUNK_TOKENS

# Called around each encoder forward with (encoder index, encoder, owner of each row); see
# encode_prompts. Per-request text-encoder LoRA plugs in here.
ForwardWrapper = Callable[[int, torch.nn.Module, list[Hashable]], AbstractContextManager]


@dataclass(frozen=True)
class TextConditioning:
    context: Tensor  # (1, 77 * chunks, hidden_1 + hidden_2)
    pooled: Tensor  # (1, projection_dim)

    @property
    def tokens(self) -> int:
        return self.context.shape[1]


@dataclass(frozen=True, eq=False)
class PreparedPrompt:
    """A checked prompt, ready to encode: its chunks for each tokenizer."""

    text: str
    field: str
    chunks: tuple[tuple[Chunk, ...], ...]  # per tokenizer (encoder order)
    embeddings: tuple[Embedding, ...]  # in prompt order; VectorRef(i) is row i of their vectors stacked
    weighted: bool  # some token has a weight other than 1.0
    # How weights are applied: "comfyui" (against the empty prompt) or "a1111" (Original emphasis).
    syntax: str = "comfyui"
    # A1111 on SDXL: an empty negative prompt conditions as zeros (context and pooled).
    zero: bool = False
    lora_tags: tuple[a1111.LoraTag, ...] = ()  # a1111 only: the prompt's <lora:...> tags

    @property
    def plain(self) -> bool:
        """No weights and no embeddings: encoded exactly as before weights existed."""
        return not self.weighted and not self.embeddings and not self.zero

    @property
    def blends_empty(self) -> bool:
        """Its weights are applied against the empty prompt's encoding (ComfyUI's rule)."""
        return self.weighted and self.syntax == "comfyui"


def context_chunks(prompts: Sequence[PreparedPrompt]) -> int:
    """77-token chunks of the longest of the prompts: the text context each UNet row attends to (t2i.cost)."""
    return max(len(p.chunks[0]) for p in prompts)


def prepare_prompt(model, text: str, field: str = "prompt", *, max_chunks: int | None = None,
                   syntax: str = "comfyui") -> PreparedPrompt:
    """Parse and chunk `text` for `model` (a LoadedModel); InvalidArgument(field, ...) for a bad
    weight, an unknown or refused embedding, or more chunks than model.spec.max_prompt_chunks.
    `syntax` "a1111" reads it by A1111's rules (module docstring); `field` "negativePrompt"
    then reads it as a negative prompt."""
    if syntax == "a1111":
        return _prepare_a1111(model, text, field, max_chunks)
    segments = parse_prompt(text, field)
    references = [s for s in segments if isinstance(s, EmbeddingSegment)]
    embeddings = tuple(model.embeddings.resolve(s.name, field) for s in references)
    counts = {s.name: e.count for s, e in zip(references, embeddings)}
    limit = model.spec.max_prompt_chunks if max_chunks is None else max_chunks
    chunks = tuple(
        tuple(
            chunk_segments(segments, _tokenize_with(tokenizer), special_tokens(tokenizer), counts, max_chunks=limit, field=field, prompt=text)
        )
        for tokenizer in model.tokenizers
    )
    weighted = any(weight != 1.0 for per_tokenizer in chunks for chunk in per_tokenizer for _, weight in chunk)
    return PreparedPrompt(text, field, chunks, embeddings, weighted)


def _prepare_a1111(model, text: str, field: str, max_chunks: int | None) -> PreparedPrompt:
    negative = field == "negativePrompt"
    parsed = a1111.parse_a1111(text, field, negative=negative)
    limit = model.spec.max_prompt_chunks if max_chunks is None else max_chunks
    per_tokenizer = []
    for tokenizer in model.tokenizers:
        tokenize = _tokenize_with(tokenizer)
        pieces = a1111.tokenize_segments(parsed.segments, tokenize)
        per_tokenizer.append(a1111.chunk_a1111(
            pieces, special_tokens(tokenizer), _comma_of(tokenizer), embeddings=_embedding_index(model, tokenizer),
            max_chunks=limit, field=field, prompt=text,
        ))
    names = per_tokenizer[0].embeddings
    if any(chunks.embeddings != names for chunks in per_tokenizer):
        # SDXL's two tokenizers share a vocabulary; a checkpoint whose do not cannot place the
        # same vectors in both encoders.
        raise InvalidArgument(field, text, "its textual inversions are found differently by the model's two tokenizers")
    embeddings = tuple(model.embeddings.resolve(name, field) for name in names)
    return PreparedPrompt(
        text, field, tuple(chunks.chunks for chunks in per_tokenizer), embeddings,
        weighted=any(chunks.weighted for chunks in per_tokenizer), syntax="a1111",
        zero=negative and text == "", lora_tags=parsed.loras,
    )


# tokenizer -> (the embeddings it was built for, A1111's index of their names in its ids)
_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _embedding_index(model, tokenizer) -> a1111.EmbeddingIndex | None:
    """The model's textual inversions as A1111 finds them in `tokenizer`'s ids, built once."""
    embeddings = model.embeddings
    if not embeddings.loaded:
        return None
    cached = _INDEXES.get(tokenizer)
    if cached is None or cached[0] is not embeddings:
        counts = {name: embedding.count for name, embedding in embeddings.loaded.items()}
        cached = (embeddings, a1111.EmbeddingIndex.build(counts, _tokenize_with(tokenizer)))
        _INDEXES[tokenizer] = cached
    return cached[1]


def _comma_of(tokenizer) -> int | None:
    """The id of "," as a word (CLIP's `,</w>`), where A1111's chunks may back off to."""
    ids = _tokenize_with(tokenizer)([","])[0]
    return ids[0] if len(ids) == 1 else None


def special_tokens(tokenizer) -> SpecialTokens:
    return SpecialTokens(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _tokenize_with(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    return tokenize


@torch.inference_mode()
def encode_prompts(
    model,
    prepared: Sequence[PreparedPrompt],
    *,
    owners: Sequence[Hashable] | None = None,
    wrap_forward: ForwardWrapper | None = None,
) -> list[TextConditioning]:
    """Encode prepared prompts for `model` (a LoadedModel), one forward per encoder in all.

    `owners` (one per prompt, default all None) says which prompts may share an empty-prompt
    row: weighted prompts with the same owner share one. `wrap_forward(index, encoder,
    row_owners)` is entered around each encoder's forward, with the owner of every row of
    its batch (a prompt's chunks are rows of its owner; an empty-prompt row belongs to the
    owner it was encoded for). A per-request text-encoder LoRA passes the request as owner
    (or its adapter set, so that requests with the same adapters share the empty row) and
    applies each row's deltas inside the wrapper; the empty rows then see the same adapters
    as the prompts they weight, as in ComfyUI, where the empty prompt goes through the same
    patched encoder.
    """
    if not prepared:
        return []
    owners = [None] * len(prepared) if owners is None else list(owners)
    if len(owners) != len(prepared):
        raise ValueError(f"{len(prepared)} prompts but {len(owners)} owners; give one owner per prompt")
    # Order-preserving, so the rows are the same for the same batch.
    empty_owners = list(dict.fromkeys(owner for owner, p in zip(owners, prepared) if p.blends_empty))
    wrap = wrap_forward or (lambda index, encoder, rows: nullcontext())
    contexts: list[list[Tensor]] = []
    pooled: list[Tensor] = []
    for index, (tokenizer, encoder) in enumerate(zip(model.tokenizers, model.text_encoders)):
        batch = _EncoderBatch(index, tokenizer, prepared, owners, empty_owners, model.device)
        with batch.vectors_in(encoder), wrap(index, encoder, batch.row_owners):
            output = encoder(batch.ids, output_hidden_states=True)
        hidden = batch.weigh(output.hidden_states[-2])
        contexts.append([h.reshape(1, -1, h.shape[-1]) for h in torch.split(hidden, batch.counts)])
        if index == 1:
            pooled = [torch.zeros_like(p) if prompt.zero else p
                      for p, prompt in zip(output.text_embeds[batch.first_rows].split(1), prepared)]
    results = []
    for first, second, p in zip(*contexts, pooled):
        # The tokenizers share one vocabulary, so this cut only matters for odd checkpoints.
        length = min(first.shape[1], second.shape[1])
        results.append(TextConditioning(context=torch.cat([first[:, :length], second[:, :length]], dim=-1), pooled=p))
    return results


class _EncoderBatch:
    """The rows of one encoder's forward: every prompt's chunks, then the empty-prompt rows."""

    def __init__(self, index: int, tokenizer, prepared, owners, empty_owners, device: torch.device) -> None:
        self.device = device
        # Embedding positions hold the start token: any id but the end token would do (the
        # pooled output is read at the first end token), and its embedding is replaced anyway.
        placeholder = tokenizer.bos_token_id
        ids: list[list[int]] = []
        weights: list[list[float]] = []
        self.row_owners: list[Hashable] = []
        self.counts: list[int] = []
        places: list[tuple[int, int]] = []
        values: list[Tensor] = []
        for p, owner in zip(prepared, owners):
            stacked = torch.cat([e.vectors[index] for e in p.embeddings]) if p.embeddings else None
            self.counts.append(len(p.chunks[index]))
            for chunk in p.chunks[index]:
                row = len(ids)
                for column, (item, _) in enumerate(chunk):
                    if isinstance(item, VectorRef):
                        places.append((row, column))
                        values.append(stacked[item.index])
                ids.append([placeholder if isinstance(item, VectorRef) else item for item, _ in chunk])
                weights.append([weight for _, weight in chunk])
                self.row_owners.append(owner)
        self.prompt_rows = len(ids)
        self.first_rows = torch.tensor([0, *self.counts[:-1]], device=device).cumsum(0)
        self.weights = weights if empty_owners else None
        # Rows weighted by A1111's Original emphasis, and rows that are zeros, by prompt.
        by_prompt = list(zip(prepared, self._rows()))
        self.a1111_rows = [r for p, rows in by_prompt if p.syntax == "a1111" and p.weighted for r in rows]
        self.a1111_weights = [weights[r] for r in self.a1111_rows]
        self.zero_rows = [r for p, rows in by_prompt if p.zero for r in rows]
        self.comfyui_rows = [p.syntax == "comfyui" for p, rows in by_prompt for _ in rows]
        empty_row = self.prompt_rows
        self.empty_of_owner = {}
        empty = [item for item, _ in chunk_segments([], _no_text, special_tokens(tokenizer), {})[0]]
        for owner in empty_owners:
            self.empty_of_owner[owner] = empty_row
            ids.append(empty)
            self.row_owners.append(owner)
            empty_row += 1
        self.ids = torch.tensor(ids, device=device)
        self.places = places
        self.values = torch.stack(values) if values else None

    @contextmanager
    def vectors_in(self, encoder: torch.nn.Module) -> Iterator[None]:
        """Embedding vectors in place of the token embeddings at their positions, for this
        forward only. Encoders run on the engine thread alone, so the hook never leaks into
        another forward."""
        if self.values is None:
            yield
            return
        rows = torch.tensor([r for r, _ in self.places], device=self.device)
        columns = torch.tensor([c for _, c in self.places], device=self.device)

        def replace(module, args, output: Tensor) -> Tensor:
            output = output.clone()
            output[rows, columns] = self.values.to(output.dtype)
            return output

        handle = encoder.get_input_embeddings().register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def _rows(self) -> list[range]:
        """Each prompt's rows."""
        starts = [0]
        for count in self.counts:
            starts.append(starts[-1] + count)
        return [range(start, start + count) for start, count in zip(starts, self.counts)]

    def weigh(self, hidden: Tensor) -> Tensor:
        """The prompt rows with their weights applied: A1111 prompts' by Original emphasis,
        the others' against their owner's empty row; zero prompts' rows zeroed."""
        out = self._blend(hidden)
        if self.a1111_rows or self.zero_rows:
            out = out.clone()
        if self.a1111_rows:
            rows = torch.tensor(self.a1111_rows, device=self.device)
            weights = torch.tensor(self.a1111_weights, dtype=torch.float32, device=self.device)
            out[rows] = original_emphasis(hidden[rows], weights)
        if self.zero_rows:
            out[torch.tensor(self.zero_rows, device=self.device)] = 0
        return out

    def _blend(self, hidden: Tensor) -> Tensor:
        """ComfyUI's rule: weighted positions between the empty row's encoding and their own."""
        if self.weights is None:
            return hidden[: self.prompt_rows]
        z = hidden[: self.prompt_rows].float()
        # Rows whose owner has no empty row are unweighted; any index does for them.
        empty_index = [self.empty_of_owner.get(owner, self.prompt_rows) for owner in self.row_owners[: self.prompt_rows]]
        z_empty = hidden[torch.tensor(empty_index, device=self.device)].float()
        w = torch.tensor(self.weights, dtype=torch.float32, device=self.device).unsqueeze(-1)
        comfyui = torch.tensor(self.comfyui_rows, device=self.device).view(-1, 1, 1)
        # Positions of weight 1 keep their encoding bit for bit; ComfyUI skips them too. Rows of
        # A1111 prompts are weighted in weigh(), never here.
        weighted = torch.where((w != 1.0) & comfyui, z_empty + w * (z - z_empty), z)
        return weighted.to(hidden.dtype)


def _no_text(texts: list[str]) -> list[list[int]]:
    return [[] for _ in texts]

