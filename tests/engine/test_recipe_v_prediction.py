"""An image's recipe says what makes it again: A1111's `CFG Rescale φ` when the request has a
RescaleCFG multiplier, and in ComfyUI's graph a ModelSamplingDiscrete node for a v-prediction
model and a RescaleCFG node in front of KSampler's model input."""

import json

import pytest

from t2i.domain import GenerateRequest, LoraSpec
from t2i.engine.recipe import comfyui_prompt, parameters

from ..support.a1111 import parse_parameters

BASE = GenerateRequest(model_id=2, prompt="1girl", negative_prompt="lowres", width=64, height=64, steps=12, cfg_scale=5.0,
                       seed=5, sampler="euler_ancestral", scheduler="karras")


def model_chain(graph: dict) -> list[str]:
    """The class types from KSampler's model input back to the checkpoint loader."""
    chain, node = [], graph["3"]["inputs"]["model"][0]
    while True:
        chain.append(graph[node]["class_type"])
        if graph[node]["class_type"] == "CheckpointLoaderSimple":
            return chain
        node = graph[node]["inputs"]["model"][0]


def test_a1111_parameters_carry_the_rescale_only_when_there_is_one():
    plain = parse_parameters(parameters(BASE, 5, "noob", None, {}))
    assert "CFG Rescale φ" not in plain and plain["CFG scale"] == "5"
    rescaled_text = parameters(GenerateRequest(**{**BASE.__dict__, "cfg_rescale": 0.7}), 5, "noob", None, {})
    assert "CFG scale: 5, CFG Rescale φ: 0.7, Seed: 5" in rescaled_text
    assert parse_parameters(rescaled_text)["CFG Rescale φ"] == "0.7"


@pytest.mark.parametrize("prediction, zsnr, rescale, chain", [
    ("epsilon", False, 0.0, ["CheckpointLoaderSimple"]),
    ("epsilon", False, 0.7, ["RescaleCFG", "CheckpointLoaderSimple"]),
    ("v_prediction", True, 0.7, ["RescaleCFG", "ModelSamplingDiscrete", "CheckpointLoaderSimple"]),
    ("v_prediction", False, 0.0, ["ModelSamplingDiscrete", "CheckpointLoaderSimple"]),
])
def test_the_comfyui_graph_samples_the_model_as_the_service_does(prediction, zsnr, rescale, chain):
    request = GenerateRequest(**{**BASE.__dict__, "cfg_rescale": rescale})
    graph = json.loads(comfyui_prompt(request, 5, "noob.safetensors", prediction, zsnr))
    assert model_chain(graph) == chain
    for node in graph.values():
        if node["class_type"] == "ModelSamplingDiscrete":
            assert node["inputs"]["sampling"] == "v_prediction" and node["inputs"]["zsnr"] is zsnr
        if node["class_type"] == "RescaleCFG":
            assert node["inputs"]["multiplier"] == rescale


def test_loras_sit_between_the_model_sampling_and_the_rescale():
    request = GenerateRequest(**{**BASE.__dict__, "cfg_rescale": 0.5, "loras": (LoraSpec("a", 0.8), LoraSpec("b", 0.3))})
    graph = json.loads(comfyui_prompt(request, 5, "noob.safetensors", "v_prediction", True))
    assert model_chain(graph) == ["RescaleCFG", "LoraLoader", "LoraLoader", "ModelSamplingDiscrete", "CheckpointLoaderSimple"]
    # Node ids are unique: every node is in the graph once.
    assert len(graph) == 7 + 4  # the seven nodes every graph has, and these four
    # The text encoders still take the last LoRA's clip.
    clip = graph["6"]["inputs"]["clip"][0]
    assert graph[clip]["class_type"] == "LoraLoader" and graph[clip]["inputs"]["lora_name"] == "b.safetensors"
