"""The directory registry: scan, rescan, refusals with reasons, and request validation."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from t2i import metrics
from t2i.errors import InvalidArgument
from t2i.lora import LoraRegistry, LoraRequest

from .factory import make_lora


@pytest.fixture(scope="module")
def fake(demo_model):
    return make_lora(demo_model, seed=11, unet=lambda path, module: "attentions" in path, text_encoders=False)


def write(lora_dir, name, fake):
    return fake.save(lora_dir / f"{name}.safetensors")


def write_nan(lora_dir, name):
    tensors = {
        "lora_unet_input_blocks_3_1_proj_in.lora_down.weight": torch.full((4, 64), float("nan")),
        "lora_unet_input_blocks_3_1_proj_in.lora_up.weight": torch.zeros(64, 4),
    }
    save_file(tensors, str(lora_dir / f"{name}.safetensors"))


def test_scan_registers_refuses_and_ignores(index, lora_dir, fake, caplog):
    write(lora_dir, "pastel_style", fake)
    write(lora_dir, "Pastel-Style v2", fake)
    write_nan(lora_dir, "broken")
    (lora_dir / "notes.txt").write_text("not a LoRA")
    (lora_dir / "old.ckpt").write_bytes(b"x")
    (lora_dir / "subdir").mkdir()
    with caplog.at_level(logging.INFO, logger="t2i.lora.registry"):
        registry = LoraRegistry(lora_dir, index, model_id=1)
    assert registry.names() == ["Pastel-Style v2", "pastel_style"]
    assert set(registry.refused) == {"broken.safetensors"}
    assert "NaN or infinite" in registry.refused["broken.safetensors"]
    refusals = [r for r in caplog.records if r.getMessage() == "refused a LoRA file"]
    assert [r.entry for r in refusals] == ["broken.safetensors"] and "NaN" in refusals[0].reason
    ignored = {r.entry for r in caplog.records if "not a .safetensors file" in r.getMessage()}
    assert ignored == {"notes.txt", "old.ckpt", "subdir"}
    info = registry.get("pastel_style")
    assert info.layer_counts == {"unet": 84} and info.path == lora_dir / "pastel_style.safetensors"


def test_rescan_reports_added_removed_changed_and_refused(index, lora_dir, fake, demo_model):
    write(lora_dir, "a", fake)
    write(lora_dir, "b", fake)
    registry = LoraRegistry(lora_dir, index, model_id="rescan-test")
    first = registry.get("a")
    unchanged = registry.rescan()
    assert not unchanged.differs and registry.get("a") is first  # unchanged files are not re-read

    (lora_dir / "b.safetensors").unlink()
    write(lora_dir, "c", fake)
    other = make_lora(
        demo_model, seed=12, unet=lambda path, module: "attentions" in path, text_encoders=False
    )
    write(lora_dir, "a", other)
    os.utime(lora_dir / "a.safetensors", ns=(first.stamp.mtime_ns + 10**9,) * 2)
    write_nan(lora_dir, "d")
    result = registry.rescan()
    assert result.added == ["c"] and result.removed == ["b"] and result.changed == ["a"]
    assert list(result.refused) == ["d.safetensors"]
    assert registry.names() == ["a", "c"]
    assert registry.get("a").sha256 != first.sha256
    assert metrics.LORAS_REGISTERED.labels("rescan-test")._value.get() == 2
    assert metrics.LORAS_REFUSED.labels("rescan-test")._value.get() == 1


def test_symlinks_out_of_the_directory_are_refused(index, lora_dir, fake, tmp_path):
    outside = write(tmp_path, "elsewhere", fake)
    (lora_dir / "escape.safetensors").symlink_to(outside)
    write(lora_dir, "real", fake)
    (lora_dir / "alias.safetensors").symlink_to(lora_dir / "real.safetensors")
    registry = LoraRegistry(lora_dir, index)
    assert registry.names() == ["alias", "real"]  # a link inside the directory is fine
    assert "outside the LoRA directory" in registry.refused["escape.safetensors"]


def test_file_names_that_cannot_be_lora_names_are_refused(index, lora_dir, fake):
    write(lora_dir, "a:b", fake)
    registry = LoraRegistry(lora_dir, index)
    assert registry.names() == []
    assert "no ':'" in registry.refused["a:b.safetensors"]


def test_a_missing_directory_is_an_error_unless_created(index, tmp_path):
    with pytest.raises(ValueError, match=r"model 3: lora_dir .*nowhere is not a directory"):
        LoraRegistry(tmp_path / "nowhere", index, model_id=3)
    assert LoraRegistry(tmp_path / "made", index, create=True).names() == []


@pytest.fixture
def registry(index, lora_dir, fake):
    for name in ("pastel_style", "pastel_style_v2", "watercolor", "neon-lights"):
        write(lora_dir, name, fake)
    return LoraRegistry(lora_dir, index, model_id=1)


def test_resolve_checks_names_and_strengths(registry):
    resolved = registry.resolve([LoraRequest("watercolor", 0.8, 0.5), LoraRequest("neon-lights", -1, 0)])
    assert [(r.info.name, r.strength_model, r.strength_clip) for r in resolved] == [
        ("watercolor", 0.8, 0.5),
        ("neon-lights", -1.0, 0.0),
    ]
    assert registry.resolve([]) == []


def test_unknown_name_lists_close_matches(registry):
    with pytest.raises(InvalidArgument) as error:
        registry.resolve([LoraRequest("watercolor"), LoraRequest("Pastel_Styel")])
    assert error.value.field == "loras[1].name"
    assert error.value.message == (
        "invalid loras[1].name 'Pastel_Styel': no LoRA of that name for model 1; "
        "close matches: 'pastel_style', 'pastel_style_v2'"
    )
    with pytest.raises(InvalidArgument, match=r"no LoRA of that name for model 1 \(4 LoRAs are registered\)"):
        registry.resolve([LoraRequest("zzzzzzzz")])
    with pytest.raises(InvalidArgument, match="give the name without .safetensors: 'watercolor'"):
        registry.resolve([LoraRequest("watercolor.safetensors")])


@pytest.mark.parametrize("name", ["../watercolor", "loras/watercolor", "..\\watercolor", "/etc/passwd", ".."])
def test_paths_are_not_names(registry, name):
    with pytest.raises(InvalidArgument, match="a LoRA name is a file name without .safetensors, not a path"):
        registry.resolve([LoraRequest(name)])


@pytest.mark.parametrize(
    "request_, field, allowed",
    [
        (
            LoraRequest("watercolor", float("nan")),
            "loras[0].strength_model",
            "must be a finite number from -100 to 100",
        ),
        (
            LoraRequest("watercolor", 1.0, 101.0),
            "loras[0].strength_clip",
            "must be a finite number from -100 to 100",
        ),
        (LoraRequest(""), "loras[0].name", "a LoRA name is a non-empty string"),
    ],
)
def test_bad_strengths_and_names(registry, request_, field, allowed):
    with pytest.raises(InvalidArgument) as error:
        registry.resolve([request_])
    assert error.value.field == field and error.value.allowed == allowed


def test_duplicates_and_too_many(registry):
    with pytest.raises(InvalidArgument, match=r"loras\[1\].name 'watercolor': each LoRA may be listed once"):
        registry.resolve([LoraRequest("watercolor"), LoraRequest("watercolor")])
    with pytest.raises(InvalidArgument, match="at most 8 LoRAs per request"):
        registry.resolve([LoraRequest("watercolor")] * 9)
