"""The gateway's spans as OpenTelemetry's own protobuf classes read them
(`opentelemetry-proto`, the collector's schema): exported over OTLP/HTTP to a receiver
here, configured only by the standard OTEL_* variables."""

import http.client
import http.server
import json
import signal

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from conftest import call, serve_http, start_demo, wait_until

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


def test_a_demo_checkout_is_one_trace_read_by_opentelemetry_proto(receiver, tmp_path):
    """`tessera demo` with a collector: one checkout, sent with a traceparent, is one trace
    of correctly parented spans from the gateway, orders, the server's coordinator, catalog
    and payments, as OpenTelemetry's own protobuf classes read it."""
    demo, gw, _ = start_demo(tmp_path, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    })
    try:
        creds = {"email": "peer@shop.test", "password": "peer-password-1"}
        assert call(gw, "POST", "/api/users/register", creds)[0] == 201
        _, v = call(gw, "POST", "/api/users/login", creds)
        token = v["token"]
        s, v = call(gw, "POST", "/api/cart/items", {"product_id": "mug", "quantity": 1}, token)
        assert s < 300, v
        s, v = call(gw, "POST", "/api/orders/checkout", None, token,
                    {"traceparent": f"00-{TRACE}-{CALLER}-01", "idempotency-key": "peer-checkout"})
        assert s < 300, v

        def trace():
            spans = {}
            for _, _, r in Receiver.requests:
                for rs in r.resource_spans:
                    service = attrs(rs.resource.attributes)["service.name"]
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            if sp.trace_id.hex() == TRACE:
                                spans[sp.span_id.hex()] = (service, sp)
            return spans

        want = {"gateway", "orders", "tessera-server", "catalog", "payments"}

        def whole():
            spans = trace()
            services = {svc for svc, _ in spans.values()}
            sagas = [sp for _, sp in spans.values() if sp.name == "saga checkout"]
            # Every span's parent is the caller or another span of the trace.
            parented = all(sp.parent_span_id.hex() in spans or sp.parent_span_id.hex() == CALLER
                           for _, sp in spans.values())
            return spans if want <= services and sagas and parented else None

        spans = wait_until("the checkout's whole trace", whole)
        roots = [sp for _, sp in spans.values() if sp.parent_span_id.hex() == CALLER]
        assert [(s.name, s.kind) for s in roots] == [("POST orders", Span.SPAN_KIND_SERVER)], roots
        # The saga's steps are client spans under the saga's span, and each participant's
        # server span is a child of its step's.
        saga = next(sp for _, sp in spans.values() if sp.name == "saga checkout")
        steps = [sp for _, sp in spans.values() if sp.parent_span_id == saga.span_id]
        assert steps and all(sp.kind == Span.SPAN_KIND_CLIENT for sp in steps), steps
        for participant in ("catalog", "payments"):
            served = [sp for svc, sp in spans.values() if svc == participant and sp.kind == Span.SPAN_KIND_SERVER]
            assert any(sp.parent_span_id in {st.span_id for st in steps} for sp in served), participant
    finally:
        demo.send_signal(signal.SIGINT)  # as Ctrl-C stops it
        demo.wait(timeout=60)
