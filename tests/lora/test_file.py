"""Checking one file: what is refused and why, what is reported, metadata and hashes."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from t2i.lora import LoraFileError, inspect_file, load_weights

from .factory import KOHYA_SGM, PEFT, make_lora


def small_lora(demo_model, **kwargs):
    """A kohya LoRA on the attention layers only (fast to write and check)."""
    kwargs.setdefault("unet", lambda path, module: "attentions" in path)
    return make_lora(demo_model, seed=7, **kwargs)


def save(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_a_kohya_file_is_described(demo_model, index, tmp_path):
    fake = small_lora(demo_model, rank=6, naming=KOHYA_SGM)
    fake.metadata.update(
        {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_output_name": "pastel style",
            "ss_tag_frequency": json.dumps(
                {"10_pastel": {"pastel": 12, "1girl": 30, "solo": 12}, "5_x": {"pastel": 5}}
            ),
        }
    )
    path = fake.save(tmp_path / "pastel.safetensors")
    info = inspect_file(path, "pastel", index)
    assert info.base_model == "sdxl"
    assert info.rank == 6
    assert info.layer_counts == {"unet": 84, "te1": 18, "te2": 18}
    assert info.has_text_encoder and info.has_unet
    assert info.trigger_words == ("1girl", "pastel", "solo")  # by count, ties by name
    assert info.title == "pastel style"
    assert info.unplaced == ()
    assert info.size_bytes == path.stat().st_size
    # A1111's LoRA hash: SHA-256 of the bytes after the 8-byte length and the JSON header.
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert info.sha256 == hashlib.sha256(data[8 + header :]).hexdigest()
    assert info.short_hash == info.sha256[:12]
    assert info.file_sha256 == hashlib.sha256(data).hexdigest()
    # Editing the metadata leaves the LoRA hash alone (the point of hashing after the header).
    fake.metadata["ss_output_name"] = "renamed"
    again = inspect_file(fake.save(tmp_path / "pastel2.safetensors"), "pastel2", index)
    assert again.sha256 == info.sha256 and again.file_sha256 != info.file_sha256


def test_trigger_phrase_wins_over_tags_and_modelspec_gives_the_family(demo_model, index, tmp_path):
    fake = small_lora(demo_model, text_encoders=False)
    fake.metadata = {
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.trigger_phrase": "pstl, pastel colors, pstl",
        "ss_tag_frequency": json.dumps({"a": {"other": 3}}),
    }
    info = inspect_file(fake.save(tmp_path / "x.safetensors"), "x", index)
    assert info.base_model == "sdxl"
    assert info.trigger_words == ("pstl", "pastel colors")
    assert not info.has_text_encoder
    bare = small_lora(demo_model, naming=PEFT)
    info = inspect_file(bare.save(tmp_path / "y.safetensors"), "y", index)
    assert info.base_model == "unknown" and info.trigger_words == ()


def test_unplaced_keys_are_reported_not_fatal(demo_model, index, tmp_path):
    fake = small_lora(demo_model, text_encoders=False)
    fake.tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    fake.tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    fake.tensors["lora_unet_orphan.lora_up.weight"] = torch.zeros(32, 4)
    fake.tensors["bundle_emb.pstl.string_to_param.*"] = torch.zeros(2, 32)
    info = inspect_file(fake.save(tmp_path / "x.safetensors"), "x", index)
    reasons = dict(info.unplaced)
    assert reasons["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] == (
        "no unet layer is named 'down_blocks_0_attentions_0_proj_in'"
    )
    assert reasons["lora_unet_orphan.lora_up.weight"] == "layer 'lora_unet_orphan' has no down factor"
    assert "not a LoRA factor" in reasons["bundle_emb.pstl.string_to_param.*"]
    assert info.layer_counts == {"unet": 84}


def test_a_file_that_places_nothing_is_refused(index, tmp_path):
    # An SD1.5 LoRA: its layer names do not exist in an SDXL UNet.
    path = save(
        tmp_path / "sd15.safetensors",
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
        },
        {"ss_base_model_version": "sd_v1"},
    )
    with pytest.raises(
        LoraFileError, match=r"LoRA 'sd15' places no key on this model \(its metadata says base model 'sd1'\)"
    ):
        inspect_file(path, "sd15", index)
    with pytest.raises(LoraFileError, match="holds no tensors"):
        inspect_file(save(tmp_path / "empty.safetensors", {}), "empty", index)


@pytest.mark.parametrize(
    "factor, shape, message",
    [
        (
            "lora_up",
            (63, 4),
            r"has shape \[63, 4\] but unet down_blocks\.1\.attentions\.0\.proj_in needs \[64, 4\]",
        ),
        ("lora_down", (4, 65), r"needs \[r, 64\] \(Linear 64 -> 64\)"),
        ("lora_up", (64, 5), r"needs \[64, 4\] with r = 4 from the down factor"),
    ],
)
def test_wrong_shapes_are_refused(index, tmp_path, factor, shape, message):
    base = "lora_unet_input_blocks_3_1_proj_in"
    tensors = {f"{base}.lora_down.weight": torch.zeros(4, 64), f"{base}.lora_up.weight": torch.zeros(64, 4)}
    tensors[f"{base}.{factor}.weight"] = torch.zeros(shape)
    with pytest.raises(LoraFileError, match=message):
        inspect_file(save(tmp_path / "bad.safetensors", tensors), "bad", index)


def test_conv_shapes(index, tmp_path):
    conv = "lora_unet_input_blocks_1_0_in_layers_2"  # down_blocks.0.resnets.0.conv1: 32 -> 32, 3x3
    good = {
        f"{conv}.lora_down.weight": torch.zeros(4, 32, 3, 3),
        f"{conv}.lora_up.weight": torch.zeros(32, 4, 1, 1),
    }
    assert inspect_file(save(tmp_path / "ok.safetensors", good), "ok", index).rank == 4
    flat = {
        f"{conv}.lora_down.weight": torch.zeros(4, 32),
        f"{conv}.lora_up.weight": torch.zeros(32, 4, 1, 1),
    }
    with pytest.raises(LoraFileError, match=r"needs \[r, 32, 3, 3\] \(Conv2d 32 -> 32, kernel 3x3\)"):
        inspect_file(save(tmp_path / "flat.safetensors", flat), "flat", index)
    mid = dict(flat, **{f"{conv}.lora_mid.weight": torch.zeros(4, 4, 1, 3)})
    with pytest.raises(
        LoraFileError, match=r"lora_mid\.weight' has shape \[4, 4, 1, 3\] .* needs \[4, 4, 3, 3\]"
    ):
        inspect_file(save(tmp_path / "mid.safetensors", mid), "mid", index)
    linear_mid = {
        "lora_unet_input_blocks_3_1_proj_in.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_input_blocks_3_1_proj_in.lora_up.weight": torch.zeros(64, 4),
        "lora_unet_input_blocks_3_1_proj_in.lora_mid.weight": torch.zeros(4, 4, 1, 1),
    }
    with pytest.raises(LoraFileError, match="no lora_mid: it is a Linear layer"):
        inspect_file(save(tmp_path / "lm.safetensors", linear_mid), "lm", index)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(demo_model, index, tmp_path, bad):
    fake = small_lora(demo_model, text_encoders=False)
    key = next(k for k in fake.tensors if k.endswith("lora_up.weight"))
    fake.tensors[key] = fake.tensors[key].clone()
    fake.tensors[key][0, 0] = bad
    with pytest.raises(LoraFileError, match=f"key '{key}' holds 1 NaN or infinite values"):
        inspect_file(fake.save(tmp_path / "x.safetensors"), "x", index)


@pytest.mark.parametrize(
    "suffixes, kind",
    [
        ((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"), "LoHa"),
        ((".lokr_w1", ".lokr_w2"), "LoKr"),
        ((".lora_down.weight", ".lora_up.weight", ".dora_scale"), "DoRA"),
    ],
)
def test_lycoris_and_dora_are_refused_by_name(index, tmp_path, suffixes, kind):
    base = "lora_unet_input_blocks_3_1_proj_in"
    tensors = {f"{base}{suffix}": torch.zeros(4, 4) for suffix in suffixes}
    with pytest.raises(LoraFileError, match=f"LoRA 'x' is {kind} .* which this service does not apply"):
        inspect_file(save(tmp_path / "x.safetensors", tensors), "x", index)


def test_a_file_naming_one_layer_twice_is_refused(index, tmp_path):
    tensors = {}
    for base in ("lora_unet_input_blocks_3_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in"):
        tensors[f"{base}.lora_down.weight"] = torch.zeros(4, 64)
        tensors[f"{base}.lora_up.weight"] = torch.zeros(64, 4)
    with pytest.raises(LoraFileError, match="both patch unet down_blocks.1.attentions.0.proj_in"):
        inspect_file(save(tmp_path / "x.safetensors", tensors), "x", index)


def test_not_a_safetensors_file(index, tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(
        LoraFileError, match="LoRA 'junk': junk.safetensors is not a readable safetensors file"
    ):
        inspect_file(path, "junk", index)


def test_loading_folds_alpha_and_refuses_a_changed_file(demo_model, index, tmp_path):
    fake = small_lora(demo_model, rank=4, alpha=1.0, text_encoders=False, dtype=torch.float16)
    path = fake.save(tmp_path / "x.safetensors")
    info = inspect_file(path, "x", index)
    assert info.resident_bytes(torch.float16) * 2 == info.resident_bytes(torch.float32)
    weights = load_weights(info, index, torch.device("cpu"), torch.float16)
    assert weights.nbytes == info.resident_bytes(torch.float16)
    layer = weights.layers["unet"]["down_blocks.1.attentions.0.proj_in"]
    truth = next(f for f in fake.layers if f.path == "down_blocks.1.attentions.0.proj_in")
    assert layer.up.dtype == torch.float16
    # alpha / r = 1/4 scales a float16 value exactly; the one rounding is back to float16: half
    # an ulp relative, or half the subnormal spacing (2**-24) for the smallest values.
    float16 = torch.finfo(torch.float16)
    torch.testing.assert_close(
        layer.up.float(), truth.up * (1.0 / 4), rtol=float16.eps / 2, atol=float16.smallest_normal * float16.eps / 2
    )
    fake.save(path)  # rewritten: new mtime
    import os

    os.utime(path, ns=(info.stamp.mtime_ns + 10**9, info.stamp.mtime_ns + 10**9))
    with pytest.raises(LoraFileError, match="changed since it was registered; rescan"):
        load_weights(info, index, torch.device("cpu"), torch.float16)
