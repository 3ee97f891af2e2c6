"""The gateway's spans as OpenTelemetry's own protobuf classes read them
(`opentelemetry-proto`, the collector's schema): exported over OTLP/HTTP to a receiver
here, configured only by the standard OTEL_* variables."""

import http.client
import http.server
import json

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from conftest import serve_http, wait_until

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"


class Receiver(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        Receiver.requests.append((self.path, self.headers["content-type"], req))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    """The port of a `Receiver`, its record emptied."""
    Receiver.requests = []
    srv, port = serve_http(Receiver)
    try:
        yield port
    finally:
        srv.shutdown()


def attrs(kvs):
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value"))
    return out


def test_gateway_spans_read_by_opentelemetry_proto(gateway, receiver, upstream):
    addr, _ = gateway(
        f'[[routes]]\nname = "api"\nupstream = "u"\n[upstreams.u]\nendpoints = ["127.0.0.1:{upstream}"]\n',
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver}",
            "OTEL_SERVICE_NAME": "edge",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=peer%20test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/orders?x=1", headers={"traceparent": f"00-{TRACE}-{CALLER}-01"})
    resp = conn.getresponse()
    seen = json.loads(resp.read())["headers"]["traceparent"]
    assert resp.status == 200

    spans = wait_until(
        "two spans at the receiver",
        lambda: (lambda s: s if len(s) >= 2 else None)(
            [(rs, sp) for _, _, r in Receiver.requests for rs in r.resource_spans
             for ss in rs.scope_spans for sp in ss.spans]
        ),
    )
    path, content_type, _ = Receiver.requests[0]
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    resource = attrs(spans[0][0].resource.attributes)
    assert resource["service.name"] == "edge"
    assert resource["deployment.environment"] == "peer test"

    by_kind = {sp.kind: sp for _, sp in spans}
    server, client = by_kind[Span.SPAN_KIND_SERVER], by_kind[Span.SPAN_KIND_CLIENT]
    assert server.trace_id.hex() == TRACE and client.trace_id.hex() == TRACE
    assert server.parent_span_id.hex() == CALLER
    assert client.parent_span_id == server.span_id
    assert seen == f"00-{TRACE}-{client.span_id.hex()}-01"
    assert server.name == "GET api"
    assert server.start_time_unix_nano <= client.start_time_unix_nano
    assert client.end_time_unix_nano <= server.end_time_unix_nano
    sa, ca = attrs(server.attributes), attrs(client.attributes)
    assert sa["http.request.method"] == "GET"
    assert sa["url.path"] == "/orders"
    assert sa["http.response.status_code"] == 200
    assert ca["server.port"] == upstream
    assert ca["http.response.status_code"] == 200
    assert server.status.code == Status.STATUS_CODE_UNSET
