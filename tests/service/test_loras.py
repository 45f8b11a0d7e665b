"""LoRAs over real gRPC: listed with their metadata, applied per request, rescanned on SIGHUP."""

import shutil
import signal
import time

import grpc
import pytest
import torch

from t2i.client import Client, ClientError
from t2i.domain import LoraSpec
from t2i.models.demo import demo_spec
from t2i.models.loader import load_model
from testbed.server import ServerProcess

from ..lora.factory import KOHYA_SGM, make_lora
from ..support.images import png_pixels


@pytest.fixture(scope="module")
def lora_server(data_dir, tmp_path_factory):
    """The service on a data dir of its own whose loras/ folder holds one kohya LoRA."""
    own = tmp_path_factory.mktemp("lora-data")
    shutil.copytree(data_dir / "models", own / "models")
    base = load_model(demo_spec(own), torch.device("cpu"))
    lora = make_lora(base, seed=5, rank=4, alpha=2.0, naming=KOHYA_SGM)
    lora.metadata.update({"ss_base_model_version": "sdxl_base_v1-0", "ss_tag_frequency": '{"set": {"pink hair": 3, "1girl": 9}}'})
    lora.save(own / "loras" / "pink.safetensors")
    with ServerProcess(own, "--no-billing") as server:
        server.wait_serving()
        yield server, own, base


def test_loras_are_listed_with_what_users_need_to_pick_them(lora_server):
    server, _, _ = lora_server
    with Client(server.target) as client:
        (pink,) = client.list_loras()
    assert (pink.name, pink.model_id, pink.rank, pink.has_text_encoder, pink.base_model) == ("pink", 1, 4, True, "sdxl")
    assert pink.trigger_words[:2] == ("1girl", "pink hair") and len(pink.hash) == 12 and pink.size_bytes > 0


def test_a_lora_changes_the_image_and_strength_zero_does_not(lora_server):
    server, _, _ = lora_server
    options = dict(width=64, height=64, steps=4, seed=9)
    with Client(server.target) as client:
        plain = png_pixels(client.generate("1girl", **options).images[0])
        styled = png_pixels(client.generate("1girl", loras=(LoraSpec("pink", 1.0),), **options).images[0])
        zero = png_pixels(client.generate("1girl", loras=(LoraSpec("pink", 0.0, 0.0),), **options).images[0])
        with pytest.raises(ClientError) as unknown:
            client.generate("1girl", loras=(LoraSpec("pnik"),), **options)
    assert abs(plain.astype(int) - styled.astype(int)).max() > 10
    assert (plain == zero).all()
    assert unknown.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "pnik" in unknown.value.message and "pink" in unknown.value.message


def test_sighup_rescans_the_lora_folder(lora_server):
    server, own, base = lora_server
    make_lora(base, seed=6, rank=2, naming=KOHYA_SGM, text_encoders=False).save(own / "loras" / "added.safetensors")
    (own / "loras" / "notes.txt").write_text("not a LoRA")
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    with Client(server.target) as client:
        while {lora.name for lora in client.list_loras()} != {"pink", "added"}:
            assert time.monotonic() < deadline, "SIGHUP did not pick up the new file"
            time.sleep(0.2)
        added = next(lora for lora in client.list_loras() if lora.name == "added")
        assert added.has_text_encoder is False and added.rank == 2
        assert client.generate("1girl", width=64, height=64, steps=2, loras=(LoraSpec("added", 0.5),)).images


def test_a_lora_request_records_its_loras_in_the_image(lora_server):
    import io

    from PIL import Image

    from ..support.a1111 import parse_parameters

    server, _, _ = lora_server
    with Client(server.target) as client:
        (pink,) = [lora for lora in client.list_loras() if lora.name == "pink"]
        result = client.generate("1girl", width=64, height=64, steps=2, loras=(LoraSpec("pink", 0.8, 0.5),))
    image = Image.open(io.BytesIO(result.images[0]))
    settings = parse_parameters(image.info["parameters"])
    assert settings["prompt"] == "1girl <lora:pink:0.8>" and settings["Lora hashes"] == f"pink: {pink.hash}"
    import json

    loaders = [n["inputs"] for n in json.loads(image.info["prompt"]).values() if n["class_type"] == "LoraLoader"]
    assert loaders and loaders[0]["lora_name"] == "pink.safetensors"
    assert (loaders[0]["strength_model"], loaders[0]["strength_clip"]) == (0.8, 0.5)
