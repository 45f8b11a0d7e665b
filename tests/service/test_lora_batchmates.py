"""Through the served API: a LoRA request's image is the same alone and in batches whose other
requests carry other LoRA mixes (the README's promise). The bound is the one the no-LoRA test
uses (tests/service/test_generate.py): the base layers' kernels may round a row differently at
another batch size, and the VAE and the 8-bit rounding turn that into at most a level or two;
the LoRA deltas themselves are computed per row set (tests/lora/test_row_independence.py)."""

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from t2i.client import Client
from t2i.domain import LoraSpec
from t2i.models.demo import demo_spec
from t2i.models.loader import load_model
from testbed.metrics import scrape, value
from testbed.server import ServerProcess

from ..lora.factory import KOHYA_DIFFUSERS, KOHYA_SGM, PEFT, make_lora
from ..support.images import png_pixels

TARGET = dict(width=128, height=128, steps=8, cfg_scale=6.0, seed=7, sampler="euler_ancestral", scheduler="normal")
TARGET_LORAS = (LoraSpec("kohya", 1.0, 1.0),)
MIXES = {
    "other files": [(LoraSpec("peft", 1.0),), (LoraSpec("locon", 0.8), LoraSpec("peft", 0.5)), (LoraSpec("small", 1.0),)],
    "its file at other strengths": [(LoraSpec("kohya", 0.5),), (LoraSpec("peft", 1.0), LoraSpec("kohya", -0.7, 0.3)), ()],
    "its exact set and none": [TARGET_LORAS, (), ()],
}


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def lora_server(data_dir, tmp_path_factory):
    own = tmp_path_factory.mktemp("batchmates")
    shutil.copytree(data_dir / "models", own / "models")
    base = load_model(demo_spec(own), torch.device("cpu"))
    make_lora(base, seed=7, rank=8, alpha=4.0, naming=KOHYA_SGM).save(own / "loras" / "kohya.safetensors")
    make_lora(base, seed=8, rank=4, naming=PEFT).save(own / "loras" / "peft.safetensors")
    make_lora(base, seed=9, rank=4, naming=KOHYA_DIFFUSERS, locon_mid=True, text_encoders=False).save(
        own / "loras" / "locon.safetensors")
    make_lora(base, seed=10, rank=2, naming=KOHYA_SGM, text_encoders=False).save(own / "loras" / "small.safetensors")
    with ServerProcess(own, "--no-billing", gate=tmp_path_factory.mktemp("gate")) as server:
        yield server.wait_serving()


@pytest.mark.parametrize("mix", list(MIXES))
def test_a_lora_requests_image_does_not_depend_on_its_batch_mates_loras(lora_server, mix):
    slug = mix.replace(" ", "-")
    with Client(lora_server.target, timeout=300) as client:
        alone = png_pixels(client.generate("1girl, pink hair", loras=TARGET_LORAS, **TARGET).images[0]).astype(int)
        mates = MIXES[mix]
        with ThreadPoolExecutor(len(mates) + 1) as pool:
            with lora_server.gate:  # all four wait at the first forward, so they start together
                futures = [pool.submit(client.generate, "mate", loras=loras, request_id=f"{slug}-{i}", **dict(TARGET, seed=i))
                           for i, loras in enumerate(mates)]
                target = pool.submit(client.generate, "1girl, pink hair", loras=TARGET_LORAS, request_id=f"{slug}-target",
                                     **TARGET)
                lora_server.gate.wait_held(rows=2)
                # Everyone is in the engine (the first held at its first forward, the rest queued
                # behind it), so the four run together from the next step on.
                wait_for(lambda: value(scrape(lora_server.metrics_port), "t2i_inflight_requests") == len(mates) + 1)
            together = png_pixels(target.result().images[0]).astype(int)
            [f.result() for f in futures]
    assert np.abs(together - alone).max() <= 2
    def entries():  # the server's log reaches this process a little after the answer
        return [e for e in lora_server.logged("image generated") if e.get("request_id") == f"{slug}-target"]

    wait_for(entries)
    (entry,) = entries()
    assert entry["mean_batch"] >= 2, "the target must have shared its forwards with the other requests"
