"""A v-prediction, zero-terminal-SNR model served next to an epsilon one, through the REST edge
(real Envoy) and gRPC: it is listed with its kind, its requests are created (201 / OK) at the
epsilon model's price, cfgRescale is taken and checked, the image carries a recipe that
reproduces it, and a request's image is the same alone and batched with other v-pred requests."""

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from t2i.client import Client, ClientError
from t2i.models.demo import ensure_demo_model
from testbed.metrics import scrape, value
from testbed.up import UpProcess

from ..support.a1111 import parse_parameters
from ..support.images import png_pixels
from ..support.model_kinds import config_folder, marker_keys, single_file
from .conftest import billing_env
from .test_rest import SMALL, assert_error_shape, headers, until

NOOB = 2  # modelId of the NoobAI-style checkpoint: v_pred and ztsnr keys in a single file
VPRED = {**SMALL, "modelId": NOOB, "cfgRescale": 0.7, "samplerName": "euler_ancestral", "scheduler": "karras"}


@pytest.fixture(scope="module")
def served(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vpred-edge")
    demo = ensure_demo_model(data_dir)
    checkpoint = single_file(demo, folder / "noob-vpred-tiny.safetensors", marker_keys(v_pred=True, ztsnr=True))
    config_folder(demo, folder / "sdxl-config")
    models = folder / "models.yaml"
    models.write_text(
        "models:\n"
        f"  - {{id: 1, name: demo, path: {demo}, min_size: 64}}\n"
        f"  - {{id: {NOOB}, name: noob, path: {checkpoint.name}, config: sdxl-config, min_size: 64}}\n"
    )
    up = UpProcess(data_dir, folder / "data", "--models", str(models), env=billing_env(folder), gate=folder / "gate")
    up.wait_ready()
    yield up
    up.kill()


def test_the_model_list_says_what_each_model_predicts(served):
    reply = served.request("GET", "/model/list", headers=headers(served.demo_key))
    assert reply.status == 200
    kinds = {m["id"]: (m["predictionType"], m["zeroTerminalSnr"]) for m in reply.json()["models"]}
    assert kinds == {1: ("epsilon", False), NOOB: ("v_prediction", True)}
    with Client(f"127.0.0.1:{served.grpc_port}", api_key=served.demo_key) as client:
        listed = {m.id: (m.prediction_type, m.zero_terminal_snr) for m in client.list_models()}
    assert listed == kinds


def test_a_v_prediction_request_is_created_through_rest_at_the_epsilon_models_price(served):
    body = {**VPRED, "width": 512, "height": 512, "steps": 28}
    created = served.request("POST", "/text-to-image/generate", body, headers(served.demo_key))
    assert created.status == 201, created.body[:300]
    epsilon = served.request("POST", "/text-to-image/generate", {**body, "modelId": 1, "cfgRescale": 0},
                             headers(served.demo_key))
    assert epsilon.status == 201
    # 512x512, 28 euler_ancestral steps: ceil(0.25 * (28 + 5) / 7) = 2 whatever the model's kind or cfgRescale.
    assert created.json()["stardustUsage"] == epsilon.json()["stardustUsage"] == "2"
    image = Image.open(io.BytesIO(base64.b64decode(created.json()["images"][0])))
    assert image.size == (512, 512)
    assert np.asarray(image.convert("RGB")).std() > 0  # not the black image a NaN latent decodes to
    # The recipe reproduces it: A1111's rescale, ComfyUI's model sampling and RescaleCFG nodes.
    assert parse_parameters(image.info["parameters"])["CFG Rescale φ"] == "0.7"
    classes = {node["class_type"]: node["inputs"] for node in json.loads(image.info["prompt"]).values()}
    assert classes["ModelSamplingDiscrete"]["sampling"] == "v_prediction" and classes["ModelSamplingDiscrete"]["zsnr"] is True
    assert classes["RescaleCFG"]["multiplier"] == 0.7


@pytest.mark.parametrize("rescale, shown", [(-0.1, "-0.1"), (1.5, "1.5"), ("NaN", "nan"), (1e308, "1e+308")])
def test_a_bad_cfg_rescale_is_400_naming_the_field_value_and_range(served, rescale, shown):
    reply = served.request("POST", "/text-to-image/generate", {**VPRED, "cfgRescale": rescale}, headers(served.demo_key))
    assert_error_shape(reply, 400, "INVALID_ARGUMENT", f"invalid cfgRescale {shown}: must be a finite number from 0 (plain cfg) to 1")


def test_a_v_prediction_request_is_ok_through_grpc(served):
    with Client(f"127.0.0.1:{served.grpc_port}", api_key=served.demo_key, timeout=120) as client:
        result = client.generate("1girl", model_id=NOOB, width=64, height=64, steps=4, cfg_scale=5.0, seed=3,
                                 sampler="dpmpp_2s_ancestral_cfg_pp", scheduler="beta", cfg_rescale=0.7)
        assert result.seeds == [3] and png_pixels(result.images[0]).shape == (64, 64, 3)
        with pytest.raises(ClientError) as refused:
            client.generate("1girl", model_id=NOOB, width=64, height=64, steps=4, cfg_rescale=float("inf"))
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid cfgRescale inf: must be a finite number from 0 (plain cfg) to 1" in refused.value.message


def test_a_v_prediction_requests_image_is_the_same_alone_and_batched_with_other_v_prediction_requests(served):
    target = dict(model_id=NOOB, width=128, height=128, steps=8, cfg_scale=6.0, seed=123, sampler="euler_ancestral",
                  scheduler="karras", cfg_rescale=0.7)
    mates = [dict(target, seed=s, sampler=sampler, steps=steps, cfg_rescale=rescale)
             for s, sampler, steps, rescale in [(1, "dpm_2", 6, 0.0), (2, "euler_cfg_pp", 9, 0.5), (3, "dpmpp_2s_ancestral", 5, 1.0)]]
    with Client(f"127.0.0.1:{served.grpc_port}", api_key=served.demo_key, timeout=300) as client:
        alone = png_pixels(client.generate("1girl, pink hair", **target).images[0]).astype(int)
        with ThreadPoolExecutor(len(mates) + 1) as pool:
            with served.gate:  # all wait at the first forward, so they run together from the next step on
                futures = [pool.submit(client.generate, "mate", request_id=f"vpred-mate-{i}", **m) for i, m in enumerate(mates)]
                busy = pool.submit(client.generate, "1girl, pink hair", request_id="vpred-target", **target)
                served.gate.wait_held(rows=2)
                until(lambda: value(scrape(served.metrics_port), "t2i_inflight_requests") == len(mates) + 1,
                      "every request in the engine")
            together = png_pixels(busy.result().images[0]).astype(int)
            [f.result() for f in futures]
    # The bound of tests/service/test_generate.py: other batch sizes may round a row differently
    # in the UNet's kernels, which the VAE and the 8-bit rounding turn into a level or two.
    assert np.abs(together - alone).max() <= 2
    (entry,) = until(lambda: [e for e in served.service_log()
                              if e.get("msg") == "image generated" and e.get("request_id") == "vpred-target"],
                     "the target's log line")
    assert entry["mean_batch"] >= 2, "the target must have shared its forwards with the other requests"


def test_the_cli_sends_cfg_rescale(served, tmp_path):
    import subprocess
    import sys

    def generate(*extra):
        return subprocess.run(
            [sys.executable, "-m", "t2i", "--log-format", "text", "generate", "--target", f"127.0.0.1:{served.grpc_port}",
             "--api-key", served.demo_key, "--model-id", str(NOOB), "--width", "64", "--height", "64", "--steps", "3",
             "--seed", "9", "--prompt", "1girl", "--out", str(tmp_path / "cli.png"), *extra],
            capture_output=True, text=True, timeout=300,
        )

    made = generate("--cfg-rescale", "0.7")
    assert made.returncode == 0, made.stderr[-2000:]
    assert json.loads(made.stdout)["seed"] == 9
    recipe = parse_parameters(Image.open(tmp_path / "cli.png").info["parameters"])
    assert recipe["CFG Rescale φ"] == "0.7"
    refused = generate("--cfg-rescale", "2")
    assert refused.returncode == 1
    assert "invalid cfgRescale 2.0: must be a finite number from 0 (plain cfg) to 1" in refused.stderr
