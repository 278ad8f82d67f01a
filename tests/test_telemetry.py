"""Tracing with no exporter records nothing but still carries a caller's trace on to the next tier."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# The tracer provider is process-wide and set once, so each case runs in a fresh interpreter.
SCRIPT = textwrap.dedent(
    """
    import sys
    from opentelemetry import propagate, trace
    from opentelemetry.sdk.trace import TracerProvider
    from askmesh.runtime.config import TelemetrySettings
    from askmesh.runtime.telemetry import setup_telemetry

    provider = setup_telemetry("embedder", TelemetrySettings(exporter=sys.argv[1]))
    incoming = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    with trace.get_tracer("test").start_as_current_span("Embed", context=propagate.extract(incoming)) as span:
        outgoing = {}
        propagate.inject(outgoing)
        recording = span.is_recording()
    print(provider is None, isinstance(trace.get_tracer_provider(), TracerProvider), recording)
    print(outgoing["traceparent"])
    """
)


def run(exporter: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, exporter], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")


def test_no_exporter_records_no_spans_but_propagates_the_callers_trace() -> None:
    flags, traceparent = run("none")[:2]
    assert flags == "True False False"  # no SDK provider, a non-recording span
    # The same trace and the caller's own span go on to the next hop.
    assert traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_an_exporter_records_a_child_span_of_the_callers_trace() -> None:
    flags, traceparent = run("console")[:2]
    assert flags == "False True True"
    trace_id, span_id = traceparent.split("-")[1:3]
    assert trace_id == "0af7651916cd43dd8448eb211c80319c" and span_id != "b7ad6b7169203331"
