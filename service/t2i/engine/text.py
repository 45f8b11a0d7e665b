"""Prompt encoding for SDXL's two CLIP text encoders, without truncation.

A prompt longer than CLIP's 77-token window is split into windows of 75 tokens; each window
gets its own start and end token and padding, is encoded separately, and the encodings are
concatenated along the sequence. This is what A1111 and ComfyUI do; truncating at 77 tokens
would silently drop the end of most real prompts.

Per encoder SDXL uses the penultimate hidden states; the two are concatenated along the
feature axis. The pooled embedding is the second encoder's projected output for the first
window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

WINDOW = 77
CHUNK = WINDOW - 2  # room for the start and end tokens


@dataclass(frozen=True)
class TextConditioning:
    context: Tensor  # (1, 77 * windows, hidden_1 + hidden_2)
    pooled: Tensor  # (1, projection_dim)

    @property
    def tokens(self) -> int:
        return self.context.shape[1]


def window_ids(tokenizer, text: str) -> list[list[int]]:
    """Token ids of `text` as full 77-token windows: start, up to 75 tokens, end, padding."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)] or [[]]
    pad = tokenizer.pad_token_id
    return [[tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] + [pad] * (CHUNK - len(chunk)) for chunk in chunks]


@torch.inference_mode()
def encode_prompts(tokenizers, encoders, prompts: Sequence[str], device: torch.device) -> list[TextConditioning]:
    """Encode several prompts; all their windows go through each encoder in one forward."""
    per_encoder: list[list[Tensor]] = []
    pooled: list[Tensor] = []
    for index, (tokenizer, encoder) in enumerate(zip(tokenizers, encoders)):
        windows = [window_ids(tokenizer, prompt) for prompt in prompts]
        ids = torch.tensor([w for prompt_windows in windows for w in prompt_windows], device=device)
        output = encoder(ids, output_hidden_states=True)
        hidden = output.hidden_states[-2]
        counts = [len(w) for w in windows]
        per_prompt = torch.split(hidden, counts)
        per_encoder.append([h.reshape(1, -1, h.shape[-1]) for h in per_prompt])
        if index == 1:
            first_window = torch.tensor([0, *counts[:-1]], device=device).cumsum(0)
            pooled = list(output.text_embeds[first_window].split(1))
    for first, second in zip(per_encoder[0], per_encoder[1]):
        if first.shape[1] != second.shape[1]:
            raise ValueError("the two SDXL tokenizers split a prompt into different numbers of windows")
    return [
        TextConditioning(context=torch.cat([first, second], dim=-1), pooled=p)
        for first, second, p in zip(per_encoder[0], per_encoder[1], pooled)
    ]
