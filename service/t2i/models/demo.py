"""The embedded demo model: a tiny SDXL with random weights, built locally, never downloaded.

It has the real SDXL architecture in miniature: two CLIP text encoders (the second with a
projection for the pooled embedding), a UNet with text-time (size) conditioning, and a VAE
with the real 8x downscale. Weights come from a fixed seed, so every machine builds the same
model; it is written once to the data directory as a diffusers folder and then loaded through
the same code as a real checkpoint. Its images are noise, and its name says so. Its tokenizers
use the real CLIP vocabulary (from open-clip-torch's BPE file), so prompts tokenize and chunk
exactly as they do on a real SDXL checkpoint.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .config import ModelSpec

log = logging.getLogger(__name__)

DEMO_MODEL_ID = 1
DEMO_NAME = "demo-random-sdxl-tiny (random weights, NOT a real model: images are noise)"
# v2: the real CLIP BPE vocabulary (v1 had a small learned one); older caches are rebuilt.
DEMO_VERSION = "v2"
DEMO_SEED = 20241124
READY_MARKER = "READY"


def demo_spec(data_dir: Path) -> ModelSpec:
    """The ModelSpec for the demo model, building it first if it is not cached yet."""
    path = ensure_demo_model(data_dir)
    # Textual inversions and LoRAs an operator drops next to the demo model (created empty).
    embeddings, loras = Path(data_dir) / "embeddings", Path(data_dir) / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    return ModelSpec(
        id=DEMO_MODEL_ID, name=DEMO_NAME, path=path, min_size=64, max_size=2880, demo=True, embeddings_dir=embeddings,
        lora_dir=loras,
    )


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

    vocab, merges = clip_vocabulary()
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



# The CLIP BPE vocabulary has this layout (OpenAI's tokenizer builds it the same way):
# 256 byte characters, the same with "</w>" (end of word), one token per merge, then the
# start and end tokens, 49408 in all.
CLIP_MERGES = 48894
CLIP_VOCAB_SIZE = 49408
CLIP_START, CLIP_END = 49406, 49407
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP vocabulary and merges, from the BPE file that open-clip-torch ships.

    SDXL's two tokenizers both use it, so the demo model tokenizes prompts exactly as a real
    checkpoint does (same ids, same lengths, same chunking)."""
    lines = gzip.decompress(_bpe_path().read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; the merges in use are the next 48894 lines.
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_MERGES]]
    if any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{_BPE_FILE}: a merge line is not two symbols")
    characters = byte_characters()
    tokens = [*characters, *(c + "</w>" for c in characters), *(a + b for a, b in merges), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    # Checked rather than assumed: a different vocabulary file would shift every id silently.
    if len(vocab) != CLIP_VOCAB_SIZE or vocab["<|startoftext|>"] != CLIP_START or vocab["<|endoftext|>"] != CLIP_END:
        raise ValueError(f"{_BPE_FILE} does not give the CLIP vocabulary ({len(vocab)} distinct tokens)")
    return vocab, merges


def byte_characters() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte, in vocabulary order.

    Bytes that are printable (and not a space) stand for themselves, in byte order; the other
    68 bytes follow, mapped in byte order to code points from 256 up. So "!" is id 0."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _bpe_path() -> Path:
    # Found without importing open_clip: its __init__ imports torchvision, which is not installed.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the demo model needs the CLIP vocabulary from open-clip-torch: `make install`, or "
            "`pip install --no-deps open-clip-torch` (its own dependencies would replace torch)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE
