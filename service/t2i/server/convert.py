"""Conversion between protobuf messages and domain dataclasses, in one place.

Fields convert by name: a domain field maps to the proto field of the same name unless
RENAMED says otherwise, so a new scalar request field needs no code here. Fields holding other
messages name their domain class in NESTED; optional proto fields (presence) map to None.
"""

from __future__ import annotations

import dataclasses
import typing

from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

from ..domain import (
    Event, Failed, GenerateRequest, GenerateResult, HiresFix, JobWebhook, LoraDescription, LoraSpec, ModelInfo, Preview,
    Progress, Queued, Started,
)

# domain field -> proto field, where the names differ (the proto keeps the documented JSON names)
RENAMED = {GenerateRequest: {"sampler": "sampler_name"}}
# domain field -> (domain class, proto message class) of fields that hold messages (repeated
# ones are tuples in the domain; a single one is None when the message is not set)
NESTED = {
    (GenerateRequest, "loras"): (LoraSpec, pb.LoraSettings),
    (GenerateRequest, "hires_fix"): (HiresFix, pb.HiresFix),
    (GenerateRequest, "webhook"): (JobWebhook, pb.JobWebhook),
}


def _pairs(cls: type) -> list[tuple[str, str]]:
    renamed = RENAMED.get(cls, {})
    return [(f.name, renamed.get(f.name, f.name)) for f in dataclasses.fields(cls)]


def _from_pb(cls: type, message):
    values = {}
    hints = typing.get_type_hints(cls)
    optional = {f.name for f in message.DESCRIPTOR.fields if f.has_presence and f.type != f.TYPE_MESSAGE}
    for domain_name, proto_name in _pairs(cls):
        if proto_name in optional and not message.HasField(proto_name):
            continue  # unset: the domain default decides
        value = getattr(message, proto_name)
        nested = NESTED.get((cls, domain_name))
        if nested is not None and not hasattr(value, "extend"):
            value = _from_pb(nested[0], value) if message.HasField(proto_name) else None
        elif nested is not None:
            value = tuple(_from_pb(nested[0], item) for item in value)
        elif hasattr(value, "extend"):
            # Repeated fields arrive as protobuf containers: the domain holds tuples or lists.
            value = tuple(value) if typing.get_origin(hints[domain_name]) is tuple else list(value)
        values[domain_name] = value
    return cls(**values)


def _to_pb(message_type, value):
    fields = {}
    for domain_name, proto_name in _pairs(type(value)):
        item = getattr(value, domain_name)
        nested = NESTED.get((type(value), domain_name))
        if nested is not None and isinstance(item, tuple):
            item = [_to_pb(nested[1], element) for element in item]
        elif nested is not None and item is not None:
            item = _to_pb(nested[1], item)
        if item is not None:
            fields[proto_name] = item
    return message_type(**fields)


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


def loras_to_pb(loras: list[LoraDescription]) -> pb.ListLorasResponse:
    return pb.ListLorasResponse(loras=[_to_pb(pb.Lora, lora) for lora in loras])


def loras_from_pb(message: pb.ListLorasResponse) -> list[LoraDescription]:
    return [_from_pb(LoraDescription, lora) for lora in message.loras]


# Event class -> (GenerateImageEvent field, its message class)
EVENTS = {
    Queued: ("queued", pb.QueuedEvent), Started: ("started", pb.StartedEvent), Progress: ("progress", pb.ProgressEvent),
    Preview: ("preview", pb.PreviewEvent), GenerateResult: ("result", pb.GenerateImageResponse),
    Failed: ("error", pb.ErrorEvent),
}
_EVENT_CLASSES = {name: cls for cls, (name, _) in EVENTS.items()}


def event_to_pb(event: Event) -> pb.GenerateImageEvent:
    field, message = EVENTS[type(event)]
    return pb.GenerateImageEvent(**{field: _to_pb(message, event)})


def event_from_pb(message: pb.GenerateImageEvent) -> Event:
    field = message.WhichOneof("event")
    return _from_pb(_EVENT_CLASSES[field], getattr(message, field))


def _time(value) -> str:
    return value.isoformat().replace("+00:00", "Z") if value is not None else ""


def job_to_pb(job, position: int = 0, deliveries=(), progress: bytes | None = None) -> pb.Job:
    """A stored job (t2i.jobs.store.Job) as callers see it, with its webhook deliveries
    (t2i.jobs.store.Delivery) and, while it runs, its last progress event (stored bytes)."""
    from ..errors import http_status_of

    message = pb.Job(
        id=job.id, status=job.status, created_at=_time(job.created_at), started_at=_time(job.started_at),
        finished_at=_time(job.finished_at), position=position if job.status == "queued" else 0,
        stardust_price=job.cost, stardust_usage=job.usage or 0, stardust_balance=job.balance or 0,
        image_urls=[f"/jobs/{job.id}/images/{n}" for n in range(job.image_count or 0)] if job.status == "succeeded" else [],
        attempts=job.attempts, results_expire_at=_time(job.results_expire_at) if job.status == "succeeded" else "",
    )
    for delivery in deliveries:
        message.webhook_deliveries.append(pb.WebhookDelivery(
            id=delivery.id, event=delivery.event, status=delivery.status, attempts=delivery.attempts,
            last_status=delivery.last_status or 0, last_error=delivery.last_error or "",
            next_attempt_at=_time(delivery.next_attempt_at) if delivery.status == "pending" else "",
        ))
    if job.status == "failed":
        message.error.CopyFrom(pb.JobError(code=http_status_of(job.error_status or ""), status=job.error_status or "",
                                           message=job.error_message or ""))
    if progress is not None and job.status == "running":
        message.progress.CopyFrom(pb.GenerateImageEvent.FromString(progress).progress)
    return message


def job_event_to_pb(number: int, event) -> pb.JobEvent:
    """A watched job's event: a stored GenerateImageEvent (bytes), or the ended job."""
    if isinstance(event, bytes):
        stored = pb.GenerateImageEvent.FromString(event)
        field = stored.WhichOneof("event")
        return pb.JobEvent(id=number, **{field: getattr(stored, field)})
    return pb.JobEvent(id=number, ended=job_to_pb(event))
