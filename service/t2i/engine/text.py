"""Prompt conditioning for SDXL's two CLIP text encoders, as ComfyUI's CLIPTextEncode makes it.

Two steps, so that a bad prompt is refused before it is queued (docs/prompts.md):

- `prepare_prompt(model, text, field)` parses weights and `embedding:NAME` references and cuts
  the prompt into 77-token chunks per tokenizer (t2i.prompts). It raises InvalidArgument and
  does no tensor work, so it can run on the event loop.
- `encode_prompts(model, prepared)` encodes a whole batch with ONE forward per encoder: every
  chunk of every prompt is a row, plus one empty-prompt row when any prompt has weights.

Per encoder SDXL uses the penultimate hidden states. A position of weight w != 1 becomes
z_empty[j] + w * (z[j] - z_empty[j]), with z_empty the empty prompt's chunk at the same
position j. Prompts without weights or embeddings cost exactly what they did before: their
chunks are encoded and concatenated, nothing else. The pooled embedding is CLIP-G's projected
output for the first chunk, unweighted. The two encoders' sequences are joined on the feature
axis, CLIP-L first.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from ..prompts.chunks import CHUNK_LENGTH, CHUNK_TOKENS, Chunk, SpecialTokens, VectorRef, chunk_segments
from ..prompts.embeddings import Embedding
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

    @property
    def plain(self) -> bool:
        """No weights and no embeddings: encoded exactly as before weights existed."""
        return not self.weighted and not self.embeddings


def context_chunks(prompts: Sequence[PreparedPrompt]) -> int:
    """77-token chunks of the longest of the prompts: the text context each UNet row attends to (t2i.cost)."""
    return max(len(p.chunks[0]) for p in prompts)


def prepare_prompt(model, text: str, field: str = "prompt", *, max_chunks: int | None = None) -> PreparedPrompt:
    """Parse and chunk `text` for `model` (a LoadedModel); InvalidArgument(field, ...) for a bad
    weight, an unknown or refused embedding, or more chunks than model.spec.max_prompt_chunks."""
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
    empty_owners = list(dict.fromkeys(owner for owner, p in zip(owners, prepared) if p.weighted))
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
            pooled = list(output.text_embeds[batch.first_rows].split(1))
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

    def weigh(self, hidden: Tensor) -> Tensor:
        """The prompt rows with weights applied against their owner's empty row."""
        if self.weights is None:
            return hidden[: self.prompt_rows]
        z = hidden[: self.prompt_rows].float()
        # Rows whose owner has no empty row are unweighted; any index does for them.
        empty_index = [self.empty_of_owner.get(owner, self.prompt_rows) for owner in self.row_owners[: self.prompt_rows]]
        z_empty = hidden[torch.tensor(empty_index, device=self.device)].float()
        w = torch.tensor(self.weights, dtype=torch.float32, device=self.device).unsqueeze(-1)
        # Positions of weight 1 keep their encoding bit for bit; ComfyUI skips them too.
        weighted = torch.where(w != 1.0, z_empty + w * (z - z_empty), z)
        return weighted.to(hidden.dtype)


def _no_text(texts: list[str]) -> list[list[int]]:
    return [[] for _ in texts]

