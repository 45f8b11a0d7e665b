"""Loading a model's textual inversions: safetensors only, checked against the encoders."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from t2i.errors import InvalidArgument
from t2i.models.config import load_models_file
from t2i.prompts.embeddings import Embeddings, load_embeddings

WIDTHS = (32, 64)  # the demo model's CLIP-L and CLIP-G widths


class FakeEncoder(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.tokens = torch.nn.Embedding(10, width)

    def get_input_embeddings(self):
        return self.tokens


ENCODERS = [FakeEncoder(w) for w in WIDTHS]


def write(path, count=2, widths=WIDTHS, **override):
    tensors = {"clip_l": torch.randn(count, widths[0]), "clip_g": torch.randn(count, widths[1])}
    tensors.update(override)
    save_file({k: v for k, v in tensors.items() if v is not None}, str(path))


def load(directory, dtype=torch.float32):
    return load_embeddings(directory, ENCODERS, torch.device("cpu"), dtype)


def refusal(embeddings, name):
    with pytest.raises(InvalidArgument) as raised:
        embeddings.resolve(name, "negativePrompt")
    assert raised.value.field == "negativePrompt"
    assert raised.value.value == f"embedding:{name}"
    return raised.value.message


def test_a_good_file_loads_on_the_model_dtype(tmp_path):
    write(tmp_path / "good.safetensors", count=3)
    embeddings = load(tmp_path, torch.float16)
    assert embeddings.names == ("good",)
    good = embeddings.resolve("good")
    assert good.count == 3
    assert [tuple(v.shape) for v in good.vectors] == [(3, 32), (3, 64)]
    assert all(v.dtype == torch.float16 for v in good.vectors)
    assert embeddings.resolve("good.safetensors") is good


def test_values_are_kept(tmp_path):
    vectors = torch.arange(64, dtype=torch.float32).view(1, 64)
    save_file({"clip_l": vectors[:, :32].clone(), "clip_g": vectors.clone()}, str(tmp_path / "v.safetensors"))
    loaded = load(tmp_path).resolve("v")
    assert torch.equal(loaded.vectors[0], vectors[:, :32]) and torch.equal(loaded.vectors[1], vectors)


def test_pickles_are_refused_with_a_log_line(tmp_path, caplog):
    (tmp_path / "old.pt").write_bytes(b"\x80\x04not really a pickle")
    (tmp_path / "older.bin").write_bytes(b"\x80\x04")
    with caplog.at_level(logging.WARNING, logger="t2i.prompts.embeddings"):
        embeddings = load(tmp_path)
    assert embeddings.names == ()
    assert sum("embedding refused" in r.getMessage() for r in caplog.records) == 2
    message = refusal(embeddings, "old")
    assert "old.pt" in message and "pickle" in message and ".safetensors" in message
    assert "older.bin" in refusal(embeddings, "older")


@pytest.mark.parametrize(
    ("name", "writer", "reason"),
    [
        ("wide", lambda p: write(p, widths=(33, 64)), "(1 to 75, 32)"),
        ("narrow_g", lambda p: write(p, widths=(32, 63)), "(1 to 75, 64)"),
        ("three_d", lambda p: write(p, clip_l=torch.randn(1, 2, 32)), "shape (1, 2, 32)"),
        ("too_long", lambda p: write(p, count=76), "(1 to 75,"),
        ("no_g", lambda p: write(p, clip_g=None), "clip_g missing"),
        ("uneven", lambda p: write(p, clip_g=torch.randn(3, 64)), "different numbers of vectors"),
        ("nan", lambda p: write(p, clip_l=torch.full((2, 32), float("nan"))), "NaN or infinite"),
        ("inf", lambda p: write(p, clip_g=torch.full((2, 64), float("inf"))), "NaN or infinite"),
        ("integers", lambda p: write(p, clip_l=torch.ones(2, 32, dtype=torch.int32)), "not floating-point"),
        ("corrupt", lambda p: p.write_bytes(b"garbage, not safetensors"), "not a readable safetensors file"),
    ],
)
def test_bad_files_are_refused_and_say_why(tmp_path, name, writer, reason):
    writer(tmp_path / f"{name}.safetensors")
    write(tmp_path / "good.safetensors")
    embeddings = load(tmp_path)
    assert embeddings.names == ("good",)
    message = refusal(embeddings, name)
    assert f"{name}.safetensors was not loaded" in message and reason in message


def test_values_that_overflow_fp16_are_refused_for_an_fp16_model(tmp_path):
    write(tmp_path / "big.safetensors", clip_l=torch.full((2, 32), 1e5))
    assert load(tmp_path, torch.float32).names == ("big",)
    assert "NaN or infinite" in refusal(load(tmp_path, torch.float16), "big")


@pytest.mark.parametrize("name", ["../good", "sub/good", "..", "sub\\good", "/etc/passwd"])
def test_paths_are_refused(tmp_path, name):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "good.safetensors")
    write(tmp_path / "good.safetensors")
    assert "without folders" in refusal(load(tmp_path / "sub"), name)


def test_unknown_names_list_the_available_ones(tmp_path):
    for name in ("beta", "alpha"):
        write(tmp_path / f"{name}.safetensors")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "folder").mkdir()
    embeddings = load(tmp_path)
    assert embeddings.names == ("alpha", "beta")
    message = refusal(embeddings, "gamma")
    assert "unknown embedding" in message and "available: alpha, beta" in message
    assert "notes.txt" not in embeddings.refused


def test_long_lists_are_shortened(tmp_path):
    for index in range(35):
        write(tmp_path / f"e{index:02d}.safetensors", count=1)
    assert "and 5 more" in refusal(load(tmp_path), "missing")


def test_no_folder_means_no_embeddings(tmp_path):
    assert load(None) == Embeddings()
    assert load(tmp_path / "absent").names == ()
    assert "this model has no embeddings" in refusal(load(None), "anything")


def test_models_file_resolves_the_folder_relative_to_itself(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "tis").mkdir()
    (tmp_path / "models.yaml").write_text("models:\n  - {id: 3, name: m, path: model, embeddings_dir: tis, max_prompt_chunks: 4}\n")
    (spec,) = load_models_file(tmp_path / "models.yaml")
    assert spec.embeddings_dir == tmp_path / "tis" and spec.max_prompt_chunks == 4
    (tmp_path / "bad.yaml").write_text("models:\n  - {id: 3, name: m, path: model, embeddings_dir: nowhere}\n")
    with pytest.raises(ValueError, match="embeddings_dir .*nowhere is not a folder"):
        load_models_file(tmp_path / "bad.yaml")
