"""Conversion between protobuf messages and domain dataclasses, in one place."""

from __future__ import annotations

from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

from ..domain import GenerateRequest, GenerateResult, ModelInfo


def request_from_pb(message: pb.GenerateImageRequest) -> GenerateRequest:
    return GenerateRequest(
        model_id=message.model_id,
        prompt=message.prompt,
        negative_prompt=message.negative_prompt,
        height=message.height,
        width=message.width,
        steps=message.steps,
        cfg_scale=message.cfg_scale,
        seed=message.seed,
        sampler=message.sampler_name,
        scheduler=message.scheduler,
    )


def request_to_pb(request: GenerateRequest) -> pb.GenerateImageRequest:
    return pb.GenerateImageRequest(
        model_id=request.model_id,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        height=request.height,
        width=request.width,
        steps=request.steps,
        cfg_scale=request.cfg_scale,
        seed=request.seed,
        sampler_name=request.sampler,
        scheduler=request.scheduler,
    )


def result_to_pb(result: GenerateResult) -> pb.GenerateImageResponse:
    return pb.GenerateImageResponse(
        images=result.images,
        seeds=result.seeds,
        stardust_usage=result.stardust_usage,
        stardust_balance=result.stardust_balance,
    )


def result_from_pb(message: pb.GenerateImageResponse) -> GenerateResult:
    return GenerateResult(
        images=list(message.images),
        seeds=list(message.seeds),
        stardust_usage=message.stardust_usage,
        stardust_balance=message.stardust_balance,
    )


def model_to_pb(info: ModelInfo) -> pb.Model:
    return pb.Model(
        id=info.id, name=info.name, min_size=info.min_size, max_size=info.max_size, max_steps=info.max_steps, demo=info.demo
    )


def model_from_pb(message: pb.Model) -> ModelInfo:
    return ModelInfo(
        id=message.id,
        name=message.name,
        min_size=message.min_size,
        max_size=message.max_size,
        max_steps=message.max_steps,
        demo=message.demo,
    )


def models_to_pb(infos: list[ModelInfo]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[model_to_pb(info) for info in infos])
