"""GenerateImageStream over real gRPC: event order and throttling, previews, a final event equal
to the unary answer, errors before and after the stream starts, several images per request,
and images that carry their recipe."""

import io
import json
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from t2i.client import Client, ClientError
from t2i.domain import Failed, GenerateResult, Preview, Progress, Queued, Started

from ..support.a1111 import parse_parameters
from ..support.images import png_pixels

OPTIONS = dict(width=128, height=128, steps=12, seed=5, cfg_scale=6.0, sampler="euler_ancestral", scheduler="karras")


def timed_events(client: Client, prompt: str = "(1girl:1.2), masterpiece", **options):
    started, events = time.monotonic(), []
    for event in client.generate_stream(prompt, **{**OPTIONS, **options}):
        events.append((time.monotonic() - started, event))
    return events


def paced(gate, forwards: int = 4, seconds: float = 0.55) -> threading.Thread:
    """The gate closed, and a thread that holds the next `forwards` UNet forwards `seconds` each
    (longer than the 500 ms preview interval), then opens it: throttled events are spaced by
    time, so the test makes the time pass instead of relying on a slow machine. Then steps 1-4
    each end at least that long after the one before, so progress reports at steps 1 to 4 and
    previews at steps 2 and 4 are due whatever the speed of the machine."""
    gate.close()
    thread = threading.Thread(target=gate.pace, args=(forwards, seconds), daemon=True)
    thread.start()
    return thread


def test_events_come_in_order_throttled_and_end_with_the_unary_answer(client, server):
    long = {**OPTIONS, "steps": 48}
    pacer = paced(server.gate)
    try:
        events = timed_events(client, preview_every_steps=2, steps=48)
    finally:
        server.gate.open()
        pacer.join(60)
    kinds = [type(e).__name__ for _, e in events]
    assert kinds[0] == "Queued" and kinds[1] == "Started" and kinds[-1] == "GenerateResult"
    assert kinds.count("Started") == 1 and set(kinds[2:-1]) <= {"Progress", "Preview", "Queued"}
    progress = [(t, e) for t, e in events if isinstance(e, Progress)]
    steps = [e.step for _, e in progress]
    assert steps == sorted(steps) and steps[-1] == 48 and progress[-1][1].remaining_seconds == 0
    assert 3 <= len(progress) < 48  # throttled: not one per step
    assert all(e.total_steps == 48 and e.total_evaluations == 48 for _, e in progress)
    # At most one progress event per 250 ms, except the last one, which always comes: measured
    # on the server's clock (elapsed_seconds), which the throttle uses, not on arrival here.
    # (Each elapsed is now - start in doubles: the difference of two is within 1e-9 of now - now.)
    gaps = [b.elapsed_seconds - a.elapsed_seconds for (_, a), (_, b) in zip(progress[:-2], progress[1:-1])]
    assert all(gap >= 0.25 - 1e-9 for gap in gaps), gaps
    # Previews on every 2nd step, but at most one per 500 ms (the preview_interval_ms default):
    # far fewer than the 24 the steps alone would give.
    timed_previews = [(t, e) for t, e in events if isinstance(e, Preview)]
    preview_steps = [e.step for _, e in timed_previews]
    assert preview_steps and preview_steps == sorted(preview_steps) and all(s % 2 == 0 for s in preview_steps)
    assert 2 <= len(preview_steps) < 24 * 0.5, preview_steps  # two at least, so that the gaps say something
    preview_gaps = [b - a for (a, _), (b, _) in zip(timed_previews, timed_previews[1:])]
    assert all(gap >= 0.4 for gap in preview_gaps), preview_gaps
    for _, preview in timed_previews:
        image = Image.open(io.BytesIO(preview.jpeg))
        assert image.format == "JPEG" and image.size == (preview.width, preview.height) == (16, 16)
    result = events[-1][1]
    unary = client.generate("(1girl:1.2), masterpiece", **long)
    assert result.images == unary.images and result.seeds == unary.seeds == [5]


def test_no_previews_unless_asked(client):
    kinds = {type(e).__name__ for _, e in timed_events(client)}
    assert "Preview" not in kinds and {"Queued", "Started", "Progress", "GenerateResult"} <= kinds


def test_a_request_refused_before_it_starts_is_a_status_not_an_event(client):
    with pytest.raises(ClientError) as error:
        list(client.generate_stream("x", **{**OPTIONS, "width": 100}))
    assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT and "invalid width 100" in error.value.message


def test_several_images_share_one_noise_draw_and_reproduce(client):
    three = client.generate("1girl", **{**OPTIONS, "sampler": "euler", "num_images": 3})
    again = client.generate("1girl", **{**OPTIONS, "sampler": "euler", "num_images": 3})
    one = client.generate("1girl", **{**OPTIONS, "sampler": "euler"})
    assert len(three.images) == 3 and three.seeds == [5, 5, 5] and three.images == again.images
    pixels = [png_pixels(image).astype(int) for image in three.images]
    assert len({p.tobytes() for p in pixels}) == 3  # three different images
    # Without ancestral noise image 0 of the batch starts from the noise a single image starts
    # from (the first slice of one (N, 4, h, w) draw), so it is that image.
    assert np.abs(pixels[0] - png_pixels(one.images[0]).astype(int)).max() <= 2
    with pytest.raises(ClientError) as error:
        client.generate("1girl", **{**OPTIONS, "num_images": 9})
    assert "invalid numImages 9: must be 1 to 8" in error.value.message


def test_a_png_carries_its_recipe_for_a1111_and_comfyui(client):
    result = client.generate("(1girl:1.2), masterpiece", negative_prompt="worst quality, lowres", **OPTIONS)
    image = Image.open(io.BytesIO(result.images[0]))
    settings = parse_parameters(image.info["parameters"])
    assert settings["prompt"] == "(1girl:1.2), masterpiece" and settings["negative"] == "worst quality, lowres"
    assert settings["Steps"] == "12" and settings["Sampler"] == "Euler a" and settings["Schedule type"] == "Karras"
    assert settings["CFG scale"] == "6" and settings["Seed"] == "5" and settings["Size"] == "128x128"
    assert len(settings["Model hash"]) == 10 and settings["Model"]
    graph = json.loads(image.info["prompt"])
    nodes = {node["class_type"]: node["inputs"] for node in graph.values()}
    assert set(nodes) == {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage"}
    sampler = nodes["KSampler"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        5, 12, 6.0, "euler_ancestral", "karras")
    assert nodes["EmptyLatentImage"] == {"width": 128, "height": 128, "batch_size": 1}
    texts = sorted(node["inputs"]["text"] for node in graph.values() if node["class_type"] == "CLIPTextEncode")
    assert texts == ["(1girl:1.2), masterpiece", "worst quality, lowres"]
    for node in graph.values():  # every link names a node of the graph
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in graph and isinstance(value[1], int)
    bare = client.generate("(1girl:1.2), masterpiece", negative_prompt="worst quality, lowres", omit_metadata=True, **OPTIONS)
    assert "parameters" not in Image.open(io.BytesIO(bare.images[0])).info
    assert (png_pixels(bare.images[0]) == png_pixels(result.images[0])).all()


@pytest.mark.parametrize("fmt,pil", [("webp", "WEBP"), ("jpeg", "JPEG")])
def test_webp_and_jpeg_are_offered_with_the_parameters_in_exif(client, fmt, pil):
    result = client.generate("1girl", output_format=fmt, quality=80, **OPTIONS)
    assert result.output_format == fmt
    image = Image.open(io.BytesIO(result.images[0]))
    assert image.format == pil and image.size == (128, 128)
    comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0")
    assert parse_parameters(comment[8:].decode("utf-16-be"))["Seed"] == "5"


def test_stream_events_are_domain_types(client):
    events = [e for _, e in timed_events(client, steps=2)]
    assert isinstance(events[0], Queued) and isinstance(events[1], Started) and isinstance(events[-1], GenerateResult)
    assert not any(isinstance(e, Failed) for e in events)
