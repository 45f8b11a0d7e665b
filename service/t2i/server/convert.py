"""Conversion between protobuf messages and domain dataclasses, in one place.

Scalar fields convert by name: a domain field maps to the proto field of the same name unless
RENAMED says otherwise, so a new scalar request field needs no code here.
"""

from __future__ import annotations

import dataclasses

from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

from ..domain import GenerateRequest, GenerateResult, ModelInfo

# domain field -> proto field, where the names differ (the proto keeps the documented JSON names)
RENAMED = {GenerateRequest: {"sampler": "sampler_name"}}


def _pairs(cls: type) -> list[tuple[str, str]]:
    renamed = RENAMED.get(cls, {})
    return [(f.name, renamed.get(f.name, f.name)) for f in dataclasses.fields(cls)]


def _from_pb(cls: type, message):
    values = {}
    for domain_name, proto_name in _pairs(cls):
        value = getattr(message, proto_name)
        # Repeated fields arrive as protobuf containers: the domain holds plain lists.
        values[domain_name] = list(value) if hasattr(value, "extend") else value
    return cls(**values)


def _to_pb(message_type, value):
    return message_type(**{proto_name: getattr(value, domain_name) for domain_name, proto_name in _pairs(type(value))})


def request_from_pb(message: pb.GenerateImageRequest) -> GenerateRequest:
    return _from_pb(GenerateRequest, message)


def request_to_pb(request: GenerateRequest) -> pb.GenerateImageRequest:
    return _to_pb(pb.GenerateImageRequest, request)


def result_from_pb(message: pb.GenerateImageResponse) -> GenerateResult:
    return _from_pb(GenerateResult, message)


def result_to_pb(result: GenerateResult) -> pb.GenerateImageResponse:
    return _to_pb(pb.GenerateImageResponse, result)


def model_from_pb(message: pb.Model) -> ModelInfo:
    return _from_pb(ModelInfo, message)


def models_to_pb(infos: list[ModelInfo]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[_to_pb(pb.Model, info) for info in infos])
