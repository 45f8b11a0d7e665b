"""The embedded demo model: a tiny SDXL with random weights, built locally, never downloaded.

It has the real SDXL architecture in miniature: two CLIP text encoders (the second with a
projection for the pooled embedding), a UNet with text-time (size) conditioning, and a VAE
with the real 8x downscale. Weights come from a fixed seed, so every machine builds the same
model; it is written once to the data directory as a diffusers folder and then loaded through
the same code as a real checkpoint. Its images are noise, and its name says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from .config import ModelSpec

log = logging.getLogger(__name__)

DEMO_MODEL_ID = 1
DEMO_NAME = "demo-random-sdxl-tiny (random weights, NOT a real model: images are noise)"
DEMO_VERSION = "v1"
DEMO_SEED = 20241124
READY_MARKER = "READY"

# The tokenizer's merges are learned from this text, so that common prompt words become one
# token (as with the real CLIP vocabulary) and prompt lengths in tokens are realistic.
_CORPUS = """
masterpiece best quality amazing quality very aesthetic absurdres newest extremely aesthetic
highres detailed illustration anime girl boy solo smile looking at viewer long hair short hair
blonde hair pink hair pastel hair blue eyes violet eyes red eyes sparkling eyes blush open mouth
upper body from the waist up full body standing sitting outdoors indoors sky clouds sunset
flowers petals sparkles bokeh lights dreamy atmosphere vibrant colors soft lighting jacket
dress skirt ribbon choker pendant crystal glowing metallic accents lace corset twin tails
butterfly clips hand wave playful gentle warm inviting charm softness expression behind her
with and of in the a to as if she is about speak directly viewer background detailed face
worst quality low quality lowres low details bad quality poorly drawn bad anatomy bad hands
multiple views blurry artist sign weibo username watermark text signature jpeg artifacts
"""


def demo_spec(data_dir: Path) -> ModelSpec:
    """The ModelSpec for the demo model, building it first if it is not cached yet."""
    path = ensure_demo_model(data_dir)
    return ModelSpec(id=DEMO_MODEL_ID, name=DEMO_NAME, path=path, min_size=64, max_size=2880, demo=True)


def ensure_demo_model(data_dir: Path) -> Path:
    target = Path(data_dir) / "models" / f"demo-sdxl-random-{DEMO_VERSION}"
    if (target / READY_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the demo model", extra={"path": str(target)})
    # Build beside the target and rename: a crash mid-build never leaves a half model behind,
    # and two processes racing both end with a complete folder.
    scratch = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    try:
        build_demo_model(scratch)
        (scratch / READY_MARKER).write_text(DEMO_VERSION)
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / READY_MARKER).exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def build_demo_model(path: Path, seed: int = DEMO_SEED) -> None:
    """Write the tiny random SDXL as a diffusers folder at `path`."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = _tokenizer_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    # SDXL's second tokenizer pads with "!" rather than the end token, like the real one.
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")
    text_common = dict(
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_act="gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, **text_common)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, projection_dim=64, **text_common
            )
        )
        unet = UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 1),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=32 + 64,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + 6 * 8,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)


def _tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format byte-level BPE vocabulary: every byte, every byte ending a word, the
    merges learned from the corpus, then the start and end tokens (end last, as in CLIP)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_merges(_CORPUS.split(), max_merges=600)
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def _learn_merges(words: list[str], max_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges by frequency, ties broken alphabetically so the result is stable."""
    counts = Counter(words)
    pieces = {word: [*word[:-1], word[-1] + "</w>"] for word in counts}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, parts in pieces.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, parts in pieces.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            pieces[word] = merged
    return merges
