"""Write an SDXL diffusers folder back out as ONE original-format checkpoint (a test fixture maker).

Checkpoints as people actually distribute them (Civitai, e.g. Illustrious-XL) are not diffusers
folders but a single ``.safetensors`` file in Stability's "SGM"/ldm layout:

    model.diffusion_model.*               the UNet, ldm block numbering (input_blocks.N.M, ...)
    first_stage_model.*                   the VAE, ldm names (encoder.down.N.block.M, mid.attn_1, ...)
    conditioner.embedders.0.transformer.* the CLIP-L text encoder, Hugging Face CLIPTextModel names
    conditioner.embedders.1.model.*       the OpenCLIP bigG text encoder, OpenCLIP names

The service loads such files with ``StableDiffusionXLPipeline.from_single_file(...)``. To test that
path without downloading a multi-GB model we take the tiny random demo model (a diffusers folder)
and convert it into that layout. This is the inverse of diffusers' own loader
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``),
written independently from the layout facts, so a round trip through the loader gives back
exactly the same tensors.

Every diffusers tensor must land somewhere: an unrecognised key is an error, never silently
dropped, so the round-trip test cannot pass by accident on a partially converted file.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

StateDict = dict[str, torch.Tensor]


def write_single_file_checkpoint(
    diffusers_dir: pathlib.Path, out_file: pathlib.Path, extra: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Convert an SDXL pipeline saved in diffusers layout (unet/, vae/, text_encoder/, text_encoder_2/ with
    safetensors weights) into ONE original-format (Stability "SGM"/ldm layout, as distributed on Civitai,
    e.g. Illustrious-XL) .safetensors checkpoint, so that

        StableDiffusionXLPipeline.from_single_file(out_file, config=str(diffusers_dir), local_files_only=True)

    rebuilds exactly the same weights. `extra` tensors are written beside the weights, as marker
    keys such as NoobAI-XL v-pred's empty `v_pred` and `ztsnr` are."""
    diffusers_dir = pathlib.Path(diffusers_dir)
    out_file = pathlib.Path(out_file)

    text_encoder = _load_component_weights(diffusers_dir / "text_encoder")
    text_encoder_2 = _load_component_weights(diffusers_dir / "text_encoder_2")
    _check_text_encoders_distinguishable(text_encoder, text_encoder_2)

    unet_dir, vae_dir = diffusers_dir / "unet", diffusers_dir / "vae"
    checkpoint: StateDict = {}
    parts = [
        (UNET_PREFIX, unet_to_ldm(_load_component_weights(unet_dir), _read_config(unet_dir))),
        (VAE_PREFIX, vae_to_ldm(_load_component_weights(vae_dir), _read_config(vae_dir))),
        (CLIP_L_PREFIX, clip_l_to_ldm(text_encoder)),
        (OPEN_CLIP_PREFIX, clip_bigg_to_open_clip(text_encoder_2)),
    ]
    for prefix, state in parts:
        for key, tensor in state.items():
            # safetensors refuses views (e.g. a transpose) and tensors that share storage.
            checkpoint[prefix + key] = tensor.contiguous()

    for key, tensor in (extra or {}).items():
        if key in checkpoint:
            raise ValueError(f"extra key {key!r} would overwrite a weight")
        checkpoint[key] = tensor.contiguous()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint, str(out_file), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# Reading the diffusers folder
# --------------------------------------------------------------------------------------------


def _read_config(component_dir: pathlib.Path) -> dict:
    return json.loads((component_dir / "config.json").read_text())


def _load_component_weights(component_dir: pathlib.Path) -> StateDict:
    """The raw tensors of one component, as saved (no dtype change, no model instantiation).

    diffusers models save ``diffusion_pytorch_model.safetensors``, transformers models
    ``model.safetensors``; large ones are sharded behind a ``*.safetensors.index.json``.
    """
    for name in ("diffusion_pytorch_model", "model"):
        single = component_dir / f"{name}.safetensors"
        if single.exists():
            return load_file(str(single))
        index = component_dir / f"{name}.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: StateDict = {}
            for shard in shards:
                state.update(load_file(str(component_dir / shard)))
            return state
    raise FileNotFoundError(f"no safetensors weights found in {component_dir}")


def _check_text_encoders_distinguishable(clip_l: StateDict, clip_bigg: StateDict) -> None:
    """diffusers decides which text encoder a CLIP block of the file feeds by comparing the width
    of its position embedding with the width of the model being built. With equal widths the
    second encoder would be filled from the CLIP-L block (and its projection left unloaded), so a
    file written from such a pipeline could not round-trip; refuse it up front."""
    width_l = _strip_text_model(clip_l)["embeddings.position_embedding.weight"].shape[-1]
    width_g = _strip_text_model(clip_bigg)["embeddings.position_embedding.weight"].shape[-1]
    if width_l == width_g:
        raise ValueError(
            f"text_encoder and text_encoder_2 have the same hidden size ({width_l}); diffusers' "
            "single-file loader tells them apart by that width, so this pipeline cannot round-trip"
        )


# --------------------------------------------------------------------------------------------
# Shared helper: rule tables
# --------------------------------------------------------------------------------------------

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _apply_rules(key: str, rules: list[Rule], component: str) -> str:
    for pattern, target in rules:
        match = pattern.fullmatch(key)
        if match:
            return target(match)
    raise KeyError(f"{component}: no ldm name known for diffusers key {key!r}")


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------

# Top-level layers. In ldm, `time_embed` and `label_emb.0` are nn.Sequential(Linear, SiLU, Linear),
# hence indices 0 and 2; `out` is Sequential(GroupNorm, SiLU, Conv), hence 0 and 2; the input conv
# is the first (and only) module of input block 0. SDXL's size/pooled-text conditioning
# (`addition_embed_type="text_time"`) lives in `label_emb`.
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# ldm ResBlock: in_layers = Sequential(GroupNorm, SiLU, Conv), emb_layers = Sequential(SiLU, Linear),
# out_layers = Sequential(GroupNorm, SiLU, Dropout, Conv); the 1x1 residual conv is skip_connection.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _unet_resnet_param(rest: str) -> str:
    """`norm1.weight` -> `in_layers.0.weight` (the module name is the first dotted part)."""
    module, _, param = rest.partition(".")
    if module not in _UNET_RESNET:
        raise KeyError(f"unet: unknown resnet layer {rest!r}")
    return f"{_UNET_RESNET[module]}.{param}"


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """diffusers UNet2DConditionModel -> ldm/SGM `openaimodel.UNetModel` names (no shape changes).

    ldm flattens the down path into `input_blocks`: block 0 is conv_in, then for each down block
    `layers_per_block` entries [ResBlock, (SpatialTransformer)] followed, except for the last down
    block, by one entry holding the Downsample (`.0.op`). The up path is `output_blocks` with
    `layers_per_block + 1` entries per up block, the Upsample appended to the last entry of each
    up block except the last (at `.1.conv`, or `.2.conv` when that entry also has attention).
    The mid block is `middle_block.{0: ResBlock, 1: SpatialTransformer, 2: ResBlock}`.
    Transformer internals (norm, proj_in, transformer_blocks.*, proj_out) have the same names in
    both layouts. diffusers' loader reads the indices back with the same arithmetic, using
    `layers_per_block` from the folder's config, so that has to be a single int.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise NotImplementedError("per-block layers_per_block cannot be read back by diffusers' loader")
    per_down = layers + 1  # input_blocks entries per down block (resnets + downsampler slot)
    per_up = layers + 1  # output_blocks entries per up block
    up_blocks_with_attention = {
        int(m.group(1)) for key in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", key))
    }

    def input_index(block: str, layer: str) -> int:
        return 1 + int(block) * per_down + int(layer)

    def output_index(block: str, layer: str) -> int:
        return int(block) * per_up + int(layer)

    def upsampler(m: re.Match[str]) -> str:
        block = int(m.group(1))
        slot = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{block * per_up + layers}.{slot}.conv.{m.group(2)}"

    rules: list[Rule] = [
        (
            re.compile(r"(" + "|".join(map(re.escape, _UNET_TOP_LEVEL)) + r")\.(weight|bias)"),
            lambda m: f"{_UNET_TOP_LEVEL[m.group(1)]}.{m.group(2)}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"input_blocks.{input_index(m.group(1), m.group(2))}.0."
            + _unet_resnet_param(m.group(3)),
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
            lambda m: f"input_blocks.{input_index(m.group(1), m.group(2))}.1.{m.group(3)}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)"),
            lambda m: f"input_blocks.{input_index(m.group(1), str(layers))}.0.op.{m.group(2)}",
        ),
        (
            re.compile(r"mid_block\.resnets\.(\d+)\.(.+)"),
            lambda m: f"middle_block.{2 * int(m.group(1))}.{_unet_resnet_param(m.group(2))}",
        ),
        (re.compile(r"mid_block\.attentions\.0\.(.+)"), lambda m: f"middle_block.1.{m.group(1)}"),
        (
            re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"output_blocks.{output_index(m.group(1), m.group(2))}.0."
            + _unet_resnet_param(m.group(3)),
        ),
        (
            re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
            lambda m: f"output_blocks.{output_index(m.group(1), m.group(2))}.1.{m.group(3)}",
        ),
        (re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)"), upsampler),
    ]
    return _rename_all(state, rules, "unet")


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

_VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}

# The mid-block self-attention (ldm `AttnBlock`) is built from 1x1 convolutions; diffusers uses
# linear layers. Same numbers, the ldm weights just carry two trailing singleton dims.
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _vae_resnet_param(rest: str) -> str:
    # ldm's VAE ResnetBlock uses the diffusers names except for the 1x1 residual conv.
    return re.sub(r"^conv_shortcut\.", "nin_shortcut.", rest)


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """diffusers AutoencoderKL -> ldm `AutoencoderKL` names (and 4-D attention weights).

    Encoder down blocks keep their order (`encoder.down.N.block.M`, `encoder.down.N.downsample`);
    decoder up blocks are numbered the other way round in ldm (`decoder.up.0` is the block nearest
    the output, diffusers' last `up_blocks`), so diffusers `up_blocks.i` is ldm `up.{n-1-i}`.
    Mid resnets are `mid.block_1` / `mid.block_2` (1-based), the attention `mid.attn_1`.
    """
    num_up = len(config["up_block_types"])
    attention = "|".join(map(re.escape, _VAE_ATTENTION))

    rules: list[Rule] = [
        (
            re.compile(r"(" + "|".join(map(re.escape, _VAE_TOP_LEVEL)) + r")\.(weight|bias)"),
            lambda m: f"{_VAE_TOP_LEVEL[m.group(1)]}.{m.group(2)}",
        ),
        (
            re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_vae_resnet_param(m.group(3))}",
        ),
        (
            re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)"),
            lambda m: f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}",
        ),
        (
            re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"decoder.up.{num_up - 1 - int(m.group(1))}.block.{m.group(2)}."
            + _vae_resnet_param(m.group(3)),
        ),
        (
            re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)"),
            lambda m: f"decoder.up.{num_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}",
        ),
        (
            re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)"),
            lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_vae_resnet_param(m.group(3))}",
        ),
        (
            re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(" + attention + r")\.(weight|bias)"),
            lambda m: f"{m.group(1)}.mid.attn_1.{_VAE_ATTENTION[m.group(2)]}.{m.group(3)}",
        ),
    ]
    renamed = _rename_all(state, rules, "vae")
    for key, tensor in renamed.items():
        is_attention_projection = re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key)
        if is_attention_projection and tensor.ndim == 2:
            renamed[key] = tensor[:, :, None, None]  # linear [out, in] -> 1x1 conv [out, in, 1, 1]
    return renamed


# --------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------


def _strip_text_model(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop the `text_model.` level. transformers >= 5.6 saves CLIPTextModel without it, older
    versions (and CLIPTextModelWithProjection) with it; this makes both look the same."""
    return {key.removeprefix("text_model."): tensor for key, tensor in state.items()}


def clip_l_to_ldm(state: Mapping[str, torch.Tensor]) -> StateDict:
    """CLIP-L (`text_encoder`): SGM stores the Hugging Face CLIPTextModel state dict verbatim under
    `conditioner.embedders.0.transformer.`, in the classic transformers naming with the
    `text_model.` level (`transformer.text_model.embeddings.position_embedding.weight` is the key
    diffusers looks for), so only that level has to be put back."""
    out: StateDict = {}
    for key, tensor in _strip_text_model(state).items():
        if not key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            raise KeyError(f"text_encoder: unexpected key {key!r}")
        out[f"text_model.{key}"] = tensor
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def clip_bigg_to_open_clip(state: Mapping[str, torch.Tensor]) -> StateDict:
    """OpenCLIP bigG (`text_encoder_2`, CLIPTextModelWithProjection) -> OpenCLIP `TextTransformer` names.

    Differences from the Hugging Face layout:
    - attention uses torch's nn.MultiheadAttention, whose q, k and v projections are one packed
      `in_proj_weight` [3*width, width] / `in_proj_bias` [3*width], in q, k, v order;
    - the position embedding is a bare parameter (`positional_embedding`, no `.weight`);
    - the text projection is a bare matrix applied as `x @ text_projection`, i.e. the transpose of
      Hugging Face's `nn.Linear` weight: [width, projection_dim]. (diffusers also reads its first
      dimension as the width when unpacking q/k/v.)
    """
    src = _strip_text_model(state)
    out: StateDict = {}
    packed: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q,k,v}
    top_level = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer_names = "|".join(map(re.escape, _OPEN_CLIP_LAYER))
    for key, tensor in src.items():
        if key in top_level:
            out[top_level[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T
        elif key == "embeddings.position_ids":
            continue  # an index buffer (arange), not a weight; OpenCLIP has no such entry
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", key):
            packed.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = tensor
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(" + layer_names + r")\.(weight|bias)", key):
            out[f"transformer.resblocks.{m.group(1)}.{_OPEN_CLIP_LAYER[m.group(2)]}.{m.group(3)}"] = tensor
        else:
            raise KeyError(f"text_encoder_2: no OpenCLIP name known for {key!r}")

    for (layer, kind), qkv in packed.items():
        if set(qkv) != {"q", "k", "v"}:
            raise KeyError(f"text_encoder_2: layer {layer} {kind} lacks one of q/k/v: {sorted(qkv)}")
        in_proj = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = in_proj
    return out


# --------------------------------------------------------------------------------------------


def _rename_all(state: Mapping[str, torch.Tensor], rules: list[Rule], component: str) -> StateDict:
    out: StateDict = {}
    for key, tensor in state.items():
        new_key = _apply_rules(key, rules, component)
        if new_key in out:
            raise KeyError(f"{component}: two diffusers keys map to {new_key!r}")
        out[new_key] = tensor
    return out
