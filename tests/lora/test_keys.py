"""Key placement: every spelling trainers use lands on the right module of the real model tree."""

from __future__ import annotations

import pytest
import torch

from t2i.lora.keys import (
    TE1,
    TE2,
    UNET,
    ComponentTable,
    LayerIndex,
    Placement,
    sgm_names,
    split_key,
    unsupported_kind,
)

from .factory import sgm_map, targets

# The SDXL base UNet's config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


@pytest.fixture(scope="module")
def sdxl_unet():
    """The full-size SDXL UNet, built on the meta device (structure only, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet.config["layers_per_block"] = SDXL_UNET["layers_per_block"]
    return unet


def test_sgm_map_matches_the_independent_converter_on_the_demo_unet(demo_model):
    ours = sgm_names(demo_model.unet)
    assert set(ours) == set(targets(demo_model.unet))  # every patchable layer has an SGM name
    assert ours == sgm_map(demo_model.unet)


def test_sgm_map_matches_the_independent_converter_on_full_size_sdxl(sdxl_unet):
    ours = sgm_names(sdxl_unet)
    assert len(ours) == len(targets(sdxl_unet)) == 794
    assert ours == sgm_map(sdxl_unet)


# Keys as sd-scripts writes them for SDXL, and where diffusers has those layers.
SDXL_KOHYA_KEYS = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj",
    "lora_unet_input_blocks_7_1_proj_in": "down_blocks.2.attentions.0.proj_in",
    "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_out_0": "mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k": "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out",
    # LoCon layers (resnets, resamplers)
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "lora_unet_middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "lora_unet_output_blocks_8_0_out_layers_3": "up_blocks.2.resnets.2.conv2",
    "lora_unet_time_embed_0": "time_embedding.linear_1",
    "lora_unet_label_emb_0_2": "add_embedding.linear_2",
    "lora_unet_out_2": "conv_out",
    # the same layers in diffusers naming, kohya-style and PEFT-style
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2": "up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2",
    "up_blocks.0.upsamplers.0.conv": "up_blocks.0.upsamplers.0.conv",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_v": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
}


def test_sdxl_keys_place_on_the_full_size_unet(sdxl_unet, demo_model):
    index = LayerIndex(sdxl_unet, demo_model.text_encoders)
    for key, path in SDXL_KOHYA_KEYS.items():
        assert index.place(key) == Placement(UNET, path), key


TEXT_KEYS = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (TE1, "encoder.layers.0.self_attn.q_proj"),
    "lora_te_text_model_encoder_layers_2_mlp_fc2": (TE1, "encoder.layers.2.mlp.fc2"),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": (TE2, "text_model.encoder.layers.1.mlp.fc1"),
    "text_encoder.text_model.encoder.layers.1.self_attn.out_proj": (
        TE1,
        "encoder.layers.1.self_attn.out_proj",
    ),
    "text_encoder.text_model.encoder.layers.1.self_attn.to_k": (TE1, "encoder.layers.1.self_attn.k_proj"),
    "text_encoder_2.text_model.encoder.layers.2.self_attn.v_proj": (
        TE2,
        "text_model.encoder.layers.2.self_attn.v_proj",
    ),
    "text_encoder_2.text_projection": (TE2, "text_projection"),
}


def test_text_encoder_keys_place_with_or_without_the_text_model_level(index):
    for key, (component, path) in TEXT_KEYS.items():
        assert index.place(key) == Placement(component, path), key


def test_unplaceable_names_say_why(index):
    assert (
        index.place("lora_unet_down_blocks_0_attentions_0_proj_in")
        == "no unet layer is named 'down_blocks_0_attentions_0_proj_in'"
    )
    assert "no te2 layer" in index.place("lora_te2_text_model_encoder_layers_7_mlp_fc1")
    assert "no unet layer" in index.place("unet.down_blocks.9.resnets.0.conv1")


def test_underscore_names_that_flatten_alike_are_ambiguous():
    table = ComponentTable(torch.nn.Module())
    table.add("proj.in_a", "proj.in_a")
    table.add("proj_in.a", "proj_in.a")
    assert table.underscore["proj_in_a"] is None
    assert table.dotted["proj_in.a"] == "proj_in.a"


@pytest.mark.parametrize(
    "key, expected",
    [
        ("lora_unet_x.lora_up.weight", ("lora_unet_x", "up")),
        ("lora_unet_x.lora_down.weight", ("lora_unet_x", "down")),
        ("lora_unet_x.lora_mid.weight", ("lora_unet_x", "mid")),
        ("lora_unet_x.alpha", ("lora_unet_x", "alpha")),
        ("unet.a.b.lora_B.weight", ("unet.a.b", "up")),
        ("unet.a.b.lora_A.weight", ("unet.a.b", "down")),
        ("unet.a.processor.to_q_lora.up.weight", ("unet.a.processor.to_q", "up")),
        ("unet.a.to_q.lora.down.weight", ("unet.a.to_q", "down")),
        ("text_encoder.x.q_proj.lora_linear_layer.up.weight", ("text_encoder.x.q_proj", "up")),
        ("lora_unet_x.lora_up.bias", None),
        ("lora_unet_x.hada_w1_a", None),
    ],
)
def test_factor_suffixes(key, expected):
    assert split_key(key) == expected


@pytest.mark.parametrize(
    "key, kind",
    [
        ("lora_unet_x.hada_w1_a", "LoHa"),
        ("lora_unet_x.lokr_w1", "LoKr"),
        ("lora_unet_x.lokr_w2_b", "LoKr"),
        ("lora_unet_x.dora_scale", "DoRA"),
        ("unet.x.lora_magnitude_vector", "DoRA"),
        ("lora_unet_x.lora_up.weight", None),
    ],
)
def test_unsupported_adapter_types_are_recognised(key, kind):
    found = unsupported_kind(key)
    assert (found is None) if kind is None else found.startswith(kind)
