"""OTLP export: spans reach a real OTLP/gRPC collector; the transport is TLS unless asked otherwise."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.common.tracing import otlp_insecure

ROOT = Path(__file__).resolve().parents[2]


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: object) -> object:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_are_exported_to_an_otlp_collector() -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        script = textwrap.dedent(f"""
            from services.common.tracing import setup_tracing, shutdown_tracing
            tracer = setup_tracing("otlp-test", "http://127.0.0.1:{port}", "")
            with tracer.start_as_current_span("igw.test.v1.Test/Call") as span:
                span.set_attribute("rpc.method", "Call")
            shutdown_tracing()
        """)
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
    finally:
        server.stop(None)
    spans = [
        (span, rs.resource)
        for req in collector.requests for rs in req.resource_spans for ss in rs.scope_spans for span in ss.spans
    ]
    assert [s.name for s, _ in spans] == ["igw.test.v1.Test/Call"]
    resource = {a.key: a.value.string_value for a in spans[0][1].attributes}
    assert resource["service.name"] == "igw-otlp-test"


def test_tracing_is_off_without_an_endpoint_or_file() -> None:
    from services.common.tracing import setup_tracing

    assert setup_tracing("off", "", "") is None


@pytest.mark.parametrize(
    ("endpoint", "insecure"),
    [
        ("http://collector:4317", True),
        ("https://collector:4317", False),
        ("collector.example.com:4317", False),
        ("localhost:4317", True),
        ("127.0.0.1:4317", True),
        ("[::1]:4317", True),
    ],
)
def test_otlp_transport_is_tls_unless_plaintext_is_asked_for_or_local(endpoint: str, insecure: bool) -> None:
    assert otlp_insecure(endpoint) is insecure
