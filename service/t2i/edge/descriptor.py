"""The descriptor set Envoy's gRPC-JSON transcoder loads, built from the generated protobuf
module (itself checked against proto/ by `make proto-check`), so it needs no protoc."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from illustrious.texttoimage.v1 import text_to_image_pb2


def descriptor_set() -> bytes:
    """A FileDescriptorSet of the API and everything it imports, dependencies first."""
    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(descriptor: FileDescriptor) -> None:
        if descriptor.name in seen:
            return
        seen.add(descriptor.name)
        for dependency in descriptor.dependencies:
            add(dependency)
        # serialized_pb is the file exactly as compiled, options (google.api.http) included.
        files.file.append(descriptor_pb2.FileDescriptorProto.FromString(descriptor.serialized_pb))

    add(text_to_image_pb2.DESCRIPTOR)
    return files.SerializeToString(deterministic=True)


def write_descriptor(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(descriptor_set())
    return path
