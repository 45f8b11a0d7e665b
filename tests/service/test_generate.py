"""GenerateImage and ListModels end to end over real gRPC on the demo model."""

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from t2i.client import Client, ClientError
from t2i.sampling import SAMPLER_NAMES, SCHEDULER_NAMES

from ..engine.test_text import DOCUMENTED_PROMPT
from ..support.images import png_pixels

SMALL = dict(width=64, height=64, steps=4, cfg_scale=5.0, seed=7)


def test_list_models_describes_the_demo_model(client):
    (model,) = client.list_models()
    assert model.id == 1 and model.demo
    assert "random" in model.name and "NOT a real model" in model.name
    assert (model.min_size, model.max_size, model.max_steps) == (64, 2880, 150)


def test_every_sampler_with_every_scheduler(client):
    combos = list(itertools.product(SAMPLER_NAMES, SCHEDULER_NAMES))

    def run(combo):
        sampler, scheduler = combo
        return client.generate("1girl, masterpiece", sampler=sampler, scheduler=scheduler, **SMALL)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, combos))
    images = []
    for (sampler, scheduler), result in zip(combos, results):
        assert result.seeds == [7]
        assert result.stardust_usage == 0 and result.stardust_balance == 0
        pixels = png_pixels(result.images[0])
        assert pixels.shape == (64, 64, 3), (sampler, scheduler)
        images.append(result.images[0])
    # Every combination follows its own path (the same seed gives different images).
    assert len(set(images)) == len(combos)


def test_same_seed_same_png_and_random_seed_is_reported(client):
    first = client.generate("1girl", **{**SMALL, "sampler": "euler_ancestral"})
    again = client.generate("1girl", **{**SMALL, "sampler": "euler_ancestral"})
    assert first.images == again.images
    random_1 = client.generate("1girl", **{**SMALL, "seed": -1})
    random_2 = client.generate("1girl", **{**SMALL, "seed": -1})
    assert 0 <= random_1.seeds[0] < 2**63 and random_1.seeds[0] != random_2.seeds[0]
    replay = client.generate("1girl", **{**SMALL, "seed": random_1.seeds[0]})
    assert replay.images == random_1.images


def test_documented_example_prompt_and_size(client):
    result = client.generate(
        DOCUMENTED_PROMPT, negative_prompt="worst quality, low quality, lowres", width=768, height=768, steps=2,
        cfg_scale=7.4, seed=-1, sampler="euler", scheduler="normal",
    )
    assert png_pixels(result.images[0]).shape == (768, 768, 3)


def test_non_square_sizes_keep_orientation(client):
    result = client.generate("1girl", **{**SMALL, "width": 96, "height": 64})
    assert png_pixels(result.images[0]).shape == (64, 96, 3)


def test_a_request_alone_and_in_a_busy_batch_gives_the_same_image(server):
    target = dict(width=128, height=128, steps=8, cfg_scale=6.0, seed=123, sampler="euler_ancestral", scheduler="karras")
    with Client(server.target) as client:
        alone = png_pixels(client.generate("1girl, pink hair", **target).images[0]).astype(int)
        others = [
            dict(target, seed=s, sampler=sampler, steps=steps)
            for s, sampler, steps in [(1, "dpm_2", 6), (2, "euler", 12), (3, "dpmpp_2s_ancestral", 5), (4, "euler_cfg_pp", 9),
                                      (5, "dpm_2_ancestral", 7), (6, "euler_ancestral_cfg_pp", 8), (7, "euler", 10)]
        ]
        prompts = [DOCUMENTED_PROMPT, "x", "1girl", "z", "a b c", "sky", "long " * 80]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client.generate, p, negative_prompt="bad", **o) for p, o in zip(prompts, others)]
            busy = pool.submit(client.generate, "1girl, pink hair", request_id="busy-target", **target)
            [f.result() for f in futures]
            together = png_pixels(busy.result().images[0]).astype(int)
    assert np.abs(together - alone).max() <= 2
    (entry,) = [e for e in server.logged("image generated") if e.get("request_id") == "busy-target"]
    assert entry["mean_batch"] >= 2, "the target must have shared its forwards with other requests"


def test_request_id_from_metadata_reaches_the_logs(server, client):
    client.generate("1girl", request_id="test-request-id-42", **SMALL)
    deadline = time.monotonic() + 10  # the server's log reaches this process a little later
    while not (entries := [e for e in server.logged("image generated") if e.get("request_id") == "test-request-id-42"]):
        assert time.monotonic() < deadline, "the request id never reached the log"
        time.sleep(0.05)
    assert len(entries) == 1 and entries[0]["evaluations"] == 4


def test_unknown_model_is_not_found(client):
    with pytest.raises(ClientError) as error:
        client.generate("1girl", model_id=99, **SMALL)
    assert error.value.code is grpc.StatusCode.NOT_FOUND
    assert "model 99 does not exist" in error.value.message and "available model ids: 1" in error.value.message


MAX_SEED = 2**63 - 1
INVALID = [
    ("prompt", dict(prompt=""), "invalid prompt ''", "1 to 3000 characters"),
    ("prompt", dict(prompt="a" * 3001), "invalid prompt (3001 characters)", "1 to 3000 characters"),
    ("negativePrompt", dict(negative_prompt="b" * 3001), "invalid negativePrompt (3001 characters)", "at most 3000"),
    ("width", dict(width=100), "invalid width 100", "multiple of 8 from 64 to 2880"),
    ("width", dict(width=56), "invalid width 56", "from 64 to 2880"),
    ("width", dict(width=2888), "invalid width 2888", "from 64 to 2880"),
    ("height", dict(height=0), "invalid height 0", "multiple of 8"),
    ("height", dict(height=-64), "invalid height -64", "multiple of 8"),
    ("steps", dict(steps=0), "invalid steps 0", "must be 1 to 150"),
    ("steps", dict(steps=151), "invalid steps 151", "must be 1 to 150"),
    ("steps", dict(steps=-5), "invalid steps -5", "must be 1 to 150"),
    ("cfgScale", dict(cfg_scale=float("nan")), "invalid cfgScale nan", "finite number from 0 to 30"),
    ("cfgScale", dict(cfg_scale=float("inf")), "invalid cfgScale inf", "finite number from 0 to 30"),
    ("cfgScale", dict(cfg_scale=-0.5), "invalid cfgScale -0.5", "from 0 to 30"),
    ("cfgScale", dict(cfg_scale=30.5), "invalid cfgScale 30.5", "from 0 to 30"),
    ("cfgRescale", dict(cfg_rescale=-0.25), "invalid cfgRescale -0.25", "finite number from 0 (plain cfg) to 1"),
    ("cfgRescale", dict(cfg_rescale=1.01), "invalid cfgRescale 1.01", "finite number from 0 (plain cfg) to 1"),
    ("cfgRescale", dict(cfg_rescale=float("nan")), "invalid cfgRescale nan", "finite number from 0 (plain cfg) to 1"),
    ("seed", dict(seed=-2), "invalid seed -2", f"-1 (random) or 0 to {MAX_SEED}"),
    ("seed", dict(seed=-(2**63)), f"invalid seed {-(2**63)}", "-1 (random)"),
    ("samplerName", dict(sampler="dpmpp_2m"), "invalid samplerName 'dpmpp_2m'", "must be one of euler, euler_cfg_pp"),
    ("samplerName", dict(sampler=""), "invalid samplerName ''", "dpmpp_2s_ancestral_cfg_pp"),
    ("scheduler", dict(scheduler="linear"), "invalid scheduler 'linear'", "normal, karras, exponential, sgm_uniform, simple, ddim_uniform, beta"),
]


@pytest.mark.parametrize("field,change,names_value,allowed", INVALID, ids=[f"{c[0]}-{i}" for i, c in enumerate(INVALID)])
def test_invalid_arguments_name_the_field_value_and_rule(client, field, change, names_value, allowed):
    request = dict(prompt="1girl", **SMALL)
    request.update(change)
    prompt = request.pop("prompt")
    with pytest.raises(ClientError) as error:
        client.generate(prompt, **request)
    assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert names_value in error.value.message
    assert allowed in error.value.message


def test_boundary_values_are_accepted(client):
    longest = ("masterpiece " * 250)[:3000]  # 3000 characters, 250 CLIP tokens: within the chunk cap
    result = client.generate("a", negative_prompt=longest, width=64, height=64, steps=1, cfg_scale=0.0, seed=MAX_SEED)
    assert result.seeds == [MAX_SEED]
    assert png_pixels(result.images[0]).shape == (64, 64, 3)
    client.generate(longest, width=64, height=72, steps=1, cfg_scale=30.0, seed=0)
    for rescale in (0.0, 1.0):  # RescaleCFG's range ends, on an epsilon model too
        client.generate("a", width=64, height=64, steps=2, cfg_scale=7.0, seed=0, cfg_rescale=rescale)


def test_a_prompt_over_the_chunk_cap_is_refused_with_its_token_count(client):
    with pytest.raises(ClientError) as error:
        client.generate("a", negative_prompt="n" * 3000, width=64, height=64, steps=1)
    assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.message.startswith("invalid negativePrompt (3000 characters): is 1499 CLIP tokens")
    assert "at most 8 chunks (600 tokens) are allowed" in error.value.message
