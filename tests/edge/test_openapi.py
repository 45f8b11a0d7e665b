"""The shipped OpenAPI description is valid and describes what the edge actually answers."""

import json
from pathlib import Path

from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from .test_rest import SMALL, headers

SPEC = json.loads((Path(__file__).resolve().parents[2] / "edge" / "openapi.json").read_text())


def schema(name: str) -> OAS31Validator:
    return OAS31Validator({"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]})


def test_the_description_is_valid_openapi():
    validate(SPEC)
    assert set(SPEC["paths"]) == {"/text-to-image/generate", "/text-to-image/generate/stream", "/image-to-image/generate",
                                  "/image-to-image/generate/stream", "/model/list", "/lora/list",
                                  "/text-to-image/jobs", "/image-to-image/jobs", "/jobs", "/jobs/{id}",
                                  "/jobs/{id}/images/{index}", "/jobs/{id}/events",
                                  "/v1/images/generations", "/v1/images/edits", "/v1/models", "/v1/models/{model}",
                                  "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/sd-models", "/sdapi/v1/samplers",
                                  "/sdapi/v1/schedulers", "/sdapi/v1/loras", "/sdapi/v1/options", "/sdapi/v1/progress",
                                  "/sdapi/v1/interrupt", "/sdapi/v1/scripts"}
    assert "201" in SPEC["paths"]["/text-to-image/generate"]["post"]["responses"]
    # The additional bindings: the same operation under an id of its own, with its body cap.
    image = SPEC["paths"]["/image-to-image/generate"]["post"]
    assert "201" in image["responses"] and image["operationId"] == "GenerateImage_ImageToImageGenerate"
    assert "40 MiB" in image["requestBody"]["description"]
    assert "1 MiB" in SPEC["paths"]["/text-to-image/generate"]["post"]["requestBody"]["description"]
    stream = SPEC["paths"]["/text-to-image/generate/stream"]["post"]["responses"]["200"]["content"]
    assert stream == {"text/event-stream": {"schema": {"$ref": "#/components/schemas/GenerateImageEvent"}}}
    assert SPEC["components"]["securitySchemes"]["apiKey"]["name"] == "x-illustrious-api-key"


def test_real_replies_match_the_description(edge):
    created = edge.request("POST", "/text-to-image/generate", SMALL, headers(edge.demo_key))
    assert created.status == 201
    schema("GenerateImageResponse").validate(created.json())
    schema("GenerateImageRequest").validate(SMALL)
    listed = edge.request("GET", "/model/list", headers=headers(edge.demo_key))
    schema("ListModelsResponse").validate(listed.json())
    refused = edge.request("POST", "/text-to-image/generate", {**SMALL, "width": 7}, headers(edge.demo_key))
    schema("Error").validate(refused.json())
    wrong = {**created.json(), "stardustUsage": 3}  # an int64 must be a string in a response
    assert not schema("GenerateImageResponse").is_valid(wrong)


def test_the_openai_routes_are_described_from_the_mapping_table():
    from t2i.compat import openai_images as oa

    generations = SPEC["paths"]["/v1/images/generations"]["post"]
    assert set(generations["responses"]) >= {"200", "400", "401", "404", "413", "429", "500", "503"}
    assert set(generations["responses"]["200"]["headers"]) == {"x-stardust-usage", "x-stardust-balance", "x-seeds"}
    request = SPEC["components"]["schemas"]["OpenAIImagesRequest"]
    assert set(request["properties"]) == {p.name for p in oa.params_of(oa.GENERATIONS)} and request["required"] == ["prompt"]
    edit = SPEC["components"]["schemas"]["OpenAIImageEditRequest"]
    assert set(edit["properties"]) == {p.name for p in oa.params_of(oa.EDITS)} and set(edit["required"]) == {"prompt", "image"}
    assert "multipart/form-data" in SPEC["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert "40 MiB" in SPEC["paths"]["/v1/images/edits"]["post"]["requestBody"]["description"]
    assert SPEC["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": SPEC["components"]["securitySchemes"]["bearer"]["description"]}


def test_real_openai_replies_match_the_description(edge):
    import json as _json

    body = {"model": "1", "prompt": "1girl", "size": "64x64", "steps": 2, "seed": 1}
    schema("OpenAIImagesRequest").validate(body)
    auth = {"Authorization": f"Bearer {edge.demo_key}", "Content-Type": "application/json"}
    created = edge.request("POST", "/v1/images/generations", _json.dumps(body), auth)
    assert created.status == 200
    schema("OpenAIImagesResponse").validate(created.json())
    schema("OpenAIModelList").validate(edge.request("GET", "/v1/models", headers=auth).json())
    refused = edge.request("POST", "/v1/images/generations", _json.dumps({**body, "n": 99}), auth)
    assert refused.status == 400
    schema("OpenAIError").validate(refused.json())
    assert not schema("OpenAIImagesRequest").is_valid({**body, "negativ_prompt": "x"})


def test_the_a1111_routes_are_described_from_the_mapping_table():
    from t2i.compat import a1111_api as a1

    for route in a1.ADAPTER.routes:
        assert route.method.lower() in SPEC["paths"][route.path], route
    txt2img = SPEC["paths"][a1.TXT2IMG]["post"]
    assert set(txt2img["responses"]) >= {"200", "401", "404", "413", "422", "429", "500", "503"}
    request = SPEC["components"]["schemas"]["A1111Txt2ImgRequest"]
    assert set(request["properties"]) == {f.name for f in a1.fields_of(a1.TXT2IMG)}
    assert SPEC["components"]["schemas"]["A1111Img2ImgRequest"]["required"] == ["init_images"]
    assert SPEC["components"]["securitySchemes"]["basic"]["scheme"] == "basic"
    assert "40 MiB" in SPEC["paths"][a1.IMG2IMG]["post"]["requestBody"]["description"]



def test_the_job_routes_are_described_as_the_edge_answers_them():
    submit = SPEC["paths"]["/text-to-image/jobs"]["post"]
    assert "202" in submit["responses"] and "201" not in submit["responses"]
    assert "40 MiB" in SPEC["paths"]["/image-to-image/jobs"]["post"]["requestBody"]["description"]
    image = SPEC["paths"]["/jobs/{id}/images/{index}"]["get"]
    assert list(image["responses"]["200"]["content"]) == ["image/*"]
    assert {p["name"] for p in image["parameters"] if p["in"] == "path"} == {"id", "index"}
    assert {p["name"] for p in SPEC["paths"]["/jobs"]["get"]["parameters"] if p["in"] == "query"} == {
        "status", "cursor", "pageSize"}
    assert set(SPEC["paths"]["/jobs/{id}"]) == {"get", "delete"}
