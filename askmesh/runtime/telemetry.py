"""OpenTelemetry setup: one tracer provider per process, gRPC instrumented both ways.

The gRPC instrumentors must run before any server or channel is created; they put the
W3C `traceparent` into outgoing metadata and continue it from incoming metadata, so one
question is one trace across gateway, embedder, retriever and generator.
"""

from __future__ import annotations

import sys
from typing import IO

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

from askmesh.runtime.config import TelemetrySettings

_configured = False


def _one_line_json(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + "\n"


def make_exporter(settings: TelemetrySettings) -> SpanExporter | None:
    if settings.exporter == "none":
        return None
    if settings.exporter == "console":
        return ConsoleSpanExporter(out=sys.stderr, formatter=_one_line_json)
    if settings.exporter == "file":
        if settings.file is None:
            raise ValueError("telemetry.file: required when telemetry.exporter is 'file'")
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        out: IO[str] = settings.file.open("a", buffering=1)
        return ConsoleSpanExporter(out=out, formatter=_one_line_json)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.endpoint, insecure=True)


def setup_telemetry(service_name: str, settings: TelemetrySettings | None = None) -> TracerProvider | None:
    """Installs the process's tracer provider and instruments gRPC (idempotent).

    With no exporter no SDK provider is installed: the API's default tracer makes non-recording
    spans, which still carry an incoming `traceparent` on to outgoing calls (so a traced caller's
    trace continues through this process into the tiers after it) but cost a fraction of a
    recorded span on every call. Returns the SDK provider, or None when spans are not recorded."""
    global _configured
    settings = settings or TelemetrySettings()
    provider: TracerProvider | None = None
    exporter = make_exporter(settings)
    if exporter is not None:
        provider = TracerProvider(resource=Resource.create({"service.name": f"askmesh-{service_name}"}))
        # Local exporters write each span as it ends (so a crash loses nothing); OTLP batches.
        processor = BatchSpanProcessor(exporter) if settings.exporter == "otlp" else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
    if not _configured:
        if provider is not None:
            trace.set_tracer_provider(provider)
        GrpcAioInstrumentorServer().instrument()
        GrpcAioInstrumentorClient().instrument()
        _configured = True
    return provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
