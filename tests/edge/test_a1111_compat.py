"""A1111's /sdapi/v1 end to end: the `webuiapi` client -> real Envoy -> the adapters' port of the
real service -> its own GenerateImageStream over gRPC -> billing on SQLite. The demo model has a
real LoRA file, named in prompts by A1111's `<lora:...>` tag."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import threading

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image, ImageDraw

from t2i.models.demo import demo_spec
from t2i.models.loader import load_model
from testbed.up import UpProcess

from ..lora.factory import KOHYA_SGM, make_lora
from .conftest import billing_env
from .test_rest import headers, until

SMALL = {"steps": 2, "cfg_scale": 5, "width": 64, "height": 64, "seed": 11}


@pytest.fixture(scope="module")
def a1111_edge(data_dir, tmp_path_factory):
    """`t2i up` with billing, a demo key and one LoRA (`style`) in the model's LoRA folder."""
    import shutil

    folder = tmp_path_factory.mktemp("a1111")
    own = folder / "data"
    shutil.copytree(data_dir / "models", own / "models")
    base = load_model(demo_spec(own), torch.device("cpu"))
    make_lora(base, seed=21, rank=4, naming=KOHYA_SGM).save(own / "loras" / "style.safetensors")
    up = UpProcess(data_dir, own, env=billing_env(folder), gate=folder / "gate").wait_ready()
    yield up
    up.kill()


@pytest.fixture(scope="module")
def ledger(a1111_edge):
    from t2i.billing.setup import open_ledger

    ledger = open_ledger(a1111_edge.data_dir, None)
    yield ledger
    ledger.close()


def api(edge, key: str | None = None) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=edge.http_port, username="anyone",
                             password=key or edge.demo_key, steps=2)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) of an A1111 `parameters` text, read as A1111's
    readers do: the last line is `Key: value, ...` (values JSON-quoted when they hold commas)."""
    lines = text.split("\n")
    settings_line = lines[-1]
    prompt_lines, negative = [], ""
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            negative = line[len("Negative prompt:"):].strip()
        else:
            prompt_lines.append(line)
    settings = {}
    for match in re.finditer(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', settings_line):
        key, value = match[1], match[2]
        settings[key] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt_lines), negative, settings


def balance(ledger, key) -> int:
    return ledger.get_key(ledger.find_key(key).id).balance


def post(edge, path: str, body: dict, key: str | None = None, extra: dict | None = None):
    auth = base64.b64encode(f"user:{key or edge.demo_key}".encode()).decode()
    connection = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=300)
    connection.request("POST", path, json.dumps(body), {"Authorization": f"Basic {auth}", "Content-Type": "application/json",
                                                        **(extra or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), json.loads(data) if data else None


def get(edge, path: str, key: str | None = None):
    auth = base64.b64encode(f"user:{key or edge.demo_key}".encode()).decode()
    connection = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=60)
    connection.request("GET", path, headers={"Authorization": f"Basic {auth}"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data else None


def test_txt2img_with_a_label_and_a_lora_tag_gives_images_whose_infotext_reads_back(a1111_edge, ledger):
    before = balance(ledger, a1111_edge.demo_key)
    prompt = "1girl, (smile:1.2), <lora:style:0.8>"
    result = api(a1111_edge).txt2img(prompt=prompt, negative_prompt="lowres", sampler_name="Euler a",
                                     scheduler="Karras", batch_size=2, **SMALL)
    assert len(result.images) == 2 and all(image.size == (64, 64) for image in result.images)
    assert result.images[0].tobytes() != result.images[1].tobytes()
    info = result.info
    assert info["seed"] == 11 and info["all_seeds"] == [11, 11] and info["sampler_name"] == "Euler a"
    for position, (image, infotext) in enumerate(zip(result.images, info["infotexts"])):
        assert image.info["parameters"] == infotext  # the text the PNG carries
        written, negative, settings = parse_infotext(infotext)
        assert written == prompt and negative == "lowres"
        assert settings["Steps"] == "2" and settings["Sampler"] == "Euler a" and settings["Schedule type"] == "Karras"
        assert settings["CFG scale"] == "5" and settings["Seed"] == "11" and settings["Size"] == "64x64"
        assert settings["Batch size"] == "2" and settings["Batch pos"] == str(position)
        assert settings["Lora hashes"].startswith("style: ")
        models = api(a1111_edge).get_sd_models()
        assert settings["Model"] == models[0]["model_name"] and settings["Model hash"] == models[0]["hash"]
    # The tag is a LoRA: without it the image differs.
    plain = api(a1111_edge).txt2img(prompt="1girl, (smile:1.2), ", negative_prompt="lowres", sampler_name="Euler a",
                                    scheduler="Karras", **SMALL)
    assert plain.images[0].tobytes() != result.images[0].tobytes()
    assert balance(ledger, a1111_edge.demo_key) < before


def test_the_charge_equals_the_documented_routes_with_one_ledger_row(a1111_edge, ledger):
    key = a1111_edge.demo_key
    key_id = ledger.find_key(key).id
    body = {"prompt": "1girl <lora:style:0.5>", "negative_prompt": "", "sampler_name": "Euler", "scheduler": "Normal",
            **SMALL}
    before = balance(ledger, key)
    status, answer_headers, answer = post(a1111_edge, "/sdapi/v1/txt2img", body, extra={"x-request-id": "a1111-charge-1"})
    assert status == 200, answer
    charge = int(answer_headers["x-stardust-usage"])
    assert charge > 0 and balance(ledger, key) == before - charge == int(answer_headers["x-stardust-balance"])
    _, entries, _ = ledger.usage(key_id, limit=1000)
    assert sorted(e["kind"] for e in entries if e["request_id"] == "a1111-charge-1") == ["commit", "reserve"]
    documented = {"modelId": 1, "prompt": body["prompt"], "negativePrompt": "", "samplerName": "euler",
                  "scheduler": "normal", "steps": 2, "cfgScale": 5, "width": 64, "height": 64, "seed": 11,
                  "promptSyntax": "a1111"}
    response = a1111_edge.request("POST", "/text-to-image/generate", documented, headers(key))
    assert response.status == 201, response.body
    assert int(response.json()["stardustUsage"]) == charge
    # The same image too: one engine path.
    ours = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    theirs = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    assert ours.tobytes() == theirs.tobytes()


def test_a_combined_legacy_label_sets_the_scheduler(a1111_edge):
    result = api(a1111_edge).txt2img(prompt="1girl", sampler_name="DPM++ 2S a Karras", scheduler="Automatic", **SMALL)
    _, _, settings = parse_infotext(result.info["infotexts"][0])
    assert settings["Sampler"] == "DPM++ 2S a" and settings["Schedule type"] == "Karras"


def test_lists_and_a_wrong_password(a1111_edge):
    client = api(a1111_edge)
    models = client.get_sd_models()
    assert models and models[0]["title"].startswith(models[0]["model_name"]) and len(models[0]["sha256"]) == 64
    assert "Euler a" in [s["name"] for s in client.get_samplers()]
    assert "Karras" in [s["label"] for s in client.get_schedulers()]
    assert [lora["name"] for lora in client.get_loras()] == ["style"]
    assert client.get_options()["sd_model_checkpoint"] == models[0]["title"]
    wrong = api(a1111_edge, key="t2i_wrong_key_000000000000000000")
    with pytest.raises(RuntimeError) as refused:
        wrong.txt2img(prompt="1girl", **SMALL)
    assert refused.value.args[0] == 401
    response = wrong.session.get(f"{wrong.baseurl}/sd-models")
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")
    no_auth = http.client.HTTPConnection("127.0.0.1", a1111_edge.http_port, timeout=60)
    no_auth.request("GET", "/sdapi/v1/samplers")
    reply = no_auth.getresponse()
    assert reply.status == 401 and "detail" in json.loads(reply.read())


@pytest.mark.parametrize(("change", "status", "loc", "fragment"), [
    ({"prompt": "a [cat:dog:0.5]"}, 422, ["body", "prompt"], "prompt editing"),
    ({"prompt": "a [cat|dog]"}, 422, ["body", "prompt"], "alternation"),
    ({"steps": 0}, 422, ["body", "steps"], "steps"),
    ({"batch_size": 3, "n_iter": 3}, 422, ["body", "batch_size"], "numImages"),
    ({"restore_faces": True}, 422, ["body", "restore_faces"], "face restoration"),
    ({"prompt": "1girl <lora:nope:1>"}, 422, ["body", "prompt"], "nope"),
    ({"hr_upscaler": "R-ESRGAN 4x+", "enable_hr": True}, 422, ["body", "hr_upscaler"], "latent upscaler"),
    ({"negativ_prompt": "x"}, 422, ["body", "negativ_prompt"], "unknown field"),
    ({"sampler_name": "DPM++ 2M"}, 404, None, "Sampler not found"),
    ({"override_settings": {"sd_model_checkpoint": "nope.safetensors"}}, 404, None, "Model not found"),
])
def test_refusals_are_fastapi_shaped_and_name_the_field(a1111_edge, ledger, change, status, loc, fragment):
    before = balance(ledger, a1111_edge.demo_key)
    code, _, answer = post(a1111_edge, "/sdapi/v1/txt2img", {"prompt": "1girl", **SMALL, **change})
    assert code == status, answer
    if loc is None:
        assert isinstance(answer["detail"], str) and fragment in answer["detail"]
    else:
        (error,) = answer["detail"]
        assert error["loc"] == loc and fragment.lower() in error["msg"].lower(), error
    assert balance(ledger, a1111_edge.demo_key) == before


def test_img2img_with_a_mask_and_hires_fix(a1111_edge):
    picture = Image.new("RGB", (80, 64), (200, 40, 40))
    ImageDraw.Draw(picture).ellipse((10, 10, 50, 50), fill=(20, 20, 220))
    mask = Image.new("L", (80, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 40, 64), fill=255)
    client = api(a1111_edge)
    edited = client.img2img(images=[picture], mask_image=mask, prompt="1girl", denoising_strength=0.5, sampler_name="Euler",
                            **{**SMALL, "width": 80})
    (image,) = edited.images
    assert image.size == (80, 64)
    _, _, settings = parse_infotext(edited.info["infotexts"][0])
    assert settings["Denoising strength"] == "0.5"
    # Black keeps: the right half stays near the picture (the VAE round trip aside), the left is re-drawn.
    def difference(box):
        return np.abs(np.asarray(image.crop(box), dtype=float) - np.asarray(picture.crop(box), dtype=float)).mean()

    kept, redrawn = difference((48, 0, 80, 64)), difference((0, 0, 32, 64))
    assert redrawn > kept
    hires = client.txt2img(prompt="1girl", enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.6,
                           hr_second_pass_steps=1, **SMALL)
    assert hires.images[0].size == (128, 128)
    _, _, settings = parse_infotext(hires.info["infotexts"][0])
    assert (settings["Hires upscale"], settings["Hires upscaler"], settings["Denoising strength"]) == ("2", "Latent", "0.6")


def test_progress_and_interrupt_concern_the_callers_own_call_which_is_not_charged(a1111_edge, ledger):
    key = a1111_edge.demo_key
    before = balance(ledger, key)
    outcome = {}
    with a1111_edge.gate:
        thread = threading.Thread(target=lambda: outcome.update(
            answer=post(a1111_edge, "/sdapi/v1/txt2img", {"prompt": "1girl", **SMALL, "steps": 3})))
        thread.start()
        a1111_edge.gate.wait_held(rows=2)
        until(lambda: get(a1111_edge, "/sdapi/v1/progress")[1]["state"]["job_count"] == 1, "the call in progress")
        status, progress = get(a1111_edge, "/sdapi/v1/progress")
        assert status == 200 and progress["state"]["sampling_steps"] == 3 and 0 <= progress["progress"] < 1
        # Another key sees nothing of it.
        _, other = ledger.create_key("a1111-other", balance=1000, tier="standard")
        assert get(a1111_edge, "/sdapi/v1/progress", key=other)[1]["state"]["job_count"] == 0
        status, stopped = post(a1111_edge, "/sdapi/v1/interrupt", {})[0:3:2]
        assert status == 200 and stopped == {"interrupted": 1}
    thread.join(timeout=120)
    assert "answer" in outcome, a1111_edge.output()
    status, _, answer = outcome["answer"]
    assert status == 409 and "nothing was charged" in answer["detail"], answer
    until(lambda: get(a1111_edge, "/sdapi/v1/progress")[1]["state"]["job_count"] == 0, "the call gone")
    assert balance(ledger, key) == before


def test_the_readme_snippets_work(a1111_edge, tmp_path):
    """The README's "From A1111 clients" examples, as printed, against this edge."""
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### From A1111 clients", 1)[1].split("\n## ", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S)[1]
    shell = re.search(r"```sh\n(.*?)```", section, re.S)[1]
    base_host, base_port = "127.0.0.1", str(a1111_edge.http_port)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo-api-key").write_text(a1111_edge.demo_key)
    code = python.replace('host="localhost", port=8080', f'host="{base_host}", port={base_port}')
    assert code != python
    ran = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert Image.open(tmp_path / "a1111.png").size == (512, 512)
    _, _, settings = parse_infotext(ran.stdout.strip().split("\n", 1)[1])
    assert settings["Sampler"] == "Euler a" and settings["Seed"] == "42" and settings["Batch size"] == "2"
    ran = subprocess.run(["bash", "-c", shell.replace("localhost:8080", f"{base_host}:{base_port}")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "KEY": a1111_edge.demo_key})
    assert ran.returncode == 0, ran.stderr[-3000:]
    reply = json.loads(ran.stdout)
    assert Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))).size == (256, 256)
    assert json.loads(reply["info"])["sampler_name"] == "Euler a"


def test_the_edges_own_replies_on_sdapi_are_fastapi_shaped_and_logged_as_a1111(a1111_edge):
    auth = {"Authorization": "Basic " + base64.b64encode(f"u:{a1111_edge.demo_key}".encode()).decode()}
    unknown = a1111_edge.request("GET", "/sdapi/v1/hypernetworks", headers={**auth, "x-request-id": "a1111-unknown-1"})
    assert unknown.status == 404 and "/sdapi/v1/txt2img" in unknown.json()["detail"]
    wrong = a1111_edge.request("GET", "/sdapi/v1/txt2img", headers=auth)
    assert wrong.status == 405 and wrong.json() == {"detail": "Method Not Allowed"}
    big = a1111_edge.request("POST", "/sdapi/v1/txt2img", b"x" * (1024 * 1024 + 1), {"Content-Type": "application/json"})
    assert big.status == 413 and set(big.json()) == {"detail"} and "the limit is 1 MiB" in big.json()["detail"]
    assert big.headers["x-request-id"]
    until(lambda: any(e["requestId"] == "a1111-unknown-1" for e in a1111_edge.access_log()), "the access log")
    (entry,) = [e for e in a1111_edge.access_log() if e["requestId"] == "a1111-unknown-1"]
    assert entry["api"] == "a1111" and entry["status"] == 404


def test_real_replies_match_the_openapi_description(a1111_edge):
    from .test_openapi import schema

    body = {"prompt": "1girl", "sampler_name": "Euler", **SMALL}
    schema("A1111Txt2ImgRequest").validate(body)
    status, _, answer = post(a1111_edge, "/sdapi/v1/txt2img", body)
    assert status == 200
    schema("A1111ImagesResponse").validate(answer)
    status, _, refused = post(a1111_edge, "/sdapi/v1/txt2img", {**body, "steps": 0})
    assert status == 422
    schema("A1111Error").validate(refused)
    assert not schema("A1111Txt2ImgRequest").is_valid({**body, "negativ_prompt": "x"})
