"""A small synchronous client of the gateway, used by the CLI, `askmesh up` and the tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from askmesh.runtime.channels import CHANNEL_OPTIONS
from askmesh.runtime.config import check_address
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

TEXT_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text"}


def connect(address: str) -> grpc.Channel:
    try:
        check_address(address)
    except ValueError as error:
        raise ValueError(f"--address: {error}") from error
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def document_from_file(path: Path, root: Path | None = None) -> gateway_pb2.Document:
    """A text or Markdown file as a document: id from its name, title from its first heading."""
    text = path.read_text(encoding="utf-8")
    title = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("# ")), path.stem)
    metadata = struct_pb2.Struct()
    source = str(path.relative_to(root)) if root else path.name
    metadata.update({"source": source, "format": TEXT_SUFFIXES.get(path.suffix.lower(), "text")})
    return gateway_pb2.Document(id=path.stem, title=title, text=text, metadata=metadata)


def add_documents(
    channel: grpc.Channel, knowledge_base: str, documents: Sequence[gateway_pb2.Document], timeout_s: float = 600
) -> gateway_pb2.AddDocumentsResponse:
    stub = gateway_pb2_grpc.GatewayStub(channel)
    request = gateway_pb2.AddDocumentsRequest(knowledge_base=knowledge_base, documents=documents)
    response: gateway_pb2.AddDocumentsResponse = stub.AddDocuments(request, timeout=timeout_s)
    return response


def load_samples(channel: grpc.Channel, samples_dir: Path, knowledge_base: str = "default") -> gateway_pb2.AddDocumentsResponse:
    paths = sorted(p for p in samples_dir.iterdir() if p.suffix.lower() in TEXT_SUFFIXES)
    return add_documents(channel, knowledge_base, [document_from_file(p, samples_dir.parent) for p in paths])


def parse_filter(text: str) -> common_pb2.MetadataFilter:
    """`key=value` as an equality filter; the value is typed as bool, int, float or string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--filter: {text!r} is not key=value")
    value = common_pb2.FilterValue()
    if raw.lower() in ("true", "false"):
        value.bool_value = raw.lower() == "true"
    else:
        try:
            value.int_value = int(raw)
        except ValueError:
            try:
                value.double_value = float(raw)
            except ValueError:
                value.string_value = raw
    return common_pb2.MetadataFilter(field=key, equals=value)


def ask(
    channel: grpc.Channel, request: gateway_pb2.AskRequest, timeout_s: float | None = None
) -> Iterator[gateway_pb2.AskResponse]:
    stub = gateway_pb2_grpc.GatewayStub(channel)
    yield from stub.Ask(request, timeout=timeout_s)
