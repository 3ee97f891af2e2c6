"""Clients and servers nobody here wrote, talking through `tessera gateway`: grpcio (unary,
server streaming, error statuses in trailers) over h2c, and a WebSocket echo."""

import asyncio
import threading
from concurrent import futures

import grpc
import websockets
from grpc_health.v1 import health_pb2, health_pb2_grpc


def test_grpc_unary_and_streaming_through_the_gateway(gateway, grpc_health):
    server, servicer, port = grpc_health
    try:
        servicer.set("shop.Orders", health_pb2.HealthCheckResponse.SERVING)
        addr, _ = gateway(f"""
[[routes]]
path = {{ prefix = "/grpc.health.v1.Health/" }}
upstream = "grpc"
[upstreams.grpc]
endpoints = ["127.0.0.1:{port}"]
protocol = "h2c"
""")
        with grpc.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            # Unary.
            resp = stub.Check(health_pb2.HealthCheckRequest(service="shop.Orders"), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            # An error status travels in the trailers (a trailers-only response).
            try:
                stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
                raise AssertionError("expected NOT_FOUND")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
            # Server streaming: each status change arrives as its own message.
            stream = stub.Watch(health_pb2.HealthCheckRequest(service="shop.Orders"), timeout=30)
            first = next(stream)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            servicer.set("shop.Orders", health_pb2.HealthCheckResponse.NOT_SERVING)
            second = next(stream)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stream.cancel()
    finally:
        server.stop(0)


def test_websocket_echo_through_the_gateway(gateway):
    ready = threading.Event()
    state = {}

    async def echo(ws):
        async for message in ws:
            await ws.send(f"echo: {message}")

    def serve():
        async def main():
            async with websockets.serve(echo, "127.0.0.1", 0) as srv:
                state["port"] = srv.sockets[0].getsockname()[1]
                state["loop"] = asyncio.get_running_loop()
                state["stop"] = asyncio.Event()
                ready.set()
                await state["stop"].wait()
        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(30)
    try:
        addr, _ = gateway(f"""
[[routes]]
path = {{ prefix = "/ws" }}
upstream = "ws"
[upstreams.ws]
endpoints = ["127.0.0.1:{state['port']}"]
""")

        async def client():
            async with websockets.connect(f"ws://{addr}/ws/chat") as ws:
                for i in range(5):
                    await ws.send(f"hello {i}")
                    assert await ws.recv() == f"echo: hello {i}"
                big = "x" * 200_000
                await ws.send(big)
                assert await ws.recv() == f"echo: {big}"

        asyncio.run(client())
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        t.join(10)


def test_grpc_client_and_bidi_streaming_through_the_gateway(gateway):
    """Raw-bytes gRPC methods (no generated code): client streaming sums, bidi echoes."""

    def total(request_iterator, context):
        return str(sum(int(r) for r in request_iterator)).encode()

    def chat(request_iterator, context):
        for r in request_iterator:
            yield b"echo " + r

    handler = grpc.method_handlers_generic_handler("demo.Stream", {
        "Total": grpc.stream_unary_rpc_method_handler(total),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        addr, _ = gateway(f"""
[[routes]]
path = {{ prefix = "/demo.Stream/" }}
upstream = "grpc"
[upstreams.grpc]
endpoints = ["127.0.0.1:{port}"]
protocol = "h2c"
""")
        with grpc.insecure_channel(addr) as channel:
            total_rpc = channel.stream_unary("/demo.Stream/Total")
            assert total_rpc(iter([b"1", b"2", b"39"]), timeout=10) == b"42"
            chat_rpc = channel.stream_stream("/demo.Stream/Chat")
            replies = list(chat_rpc(iter([b"a", b"b", b"c"]), timeout=10))
            assert replies == [b"echo a", b"echo b", b"echo c"]
    finally:
        server.stop(0)


def test_the_gateways_own_failures_reach_grpcio_as_statuses(gateway, grpc_health, tmp_path):
    """What the gateway refuses by itself is a gRPC status for a gRPC caller (trailers-only,
    `grpc-status` and `grpc-message`), not an HTTP error grpcio can only call UNKNOWN: no
    route → UNIMPLEMENTED, an upstream that refuses connections → UNAVAILABLE, no token on
    an authenticated route → UNAUTHENTICATED, a spent rate limit → RESOURCE_EXHAUSTED; and
    a route that works still answers."""
    server, _, port = grpc_health
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 48 + b"\n")
    from conftest import free_port
    dead = free_port()
    addr, _ = gateway(f'''
[jwt.t]
hs256_secret_file = "{secret}"
algorithms = ["HS256"]

[[routes]]
name = "health"
path = {{ prefix = "/grpc.health.v1.Health/" }}
upstream = "grpc"
rate_limit = {{ rate = 0.001, burst = 2, key = "ip" }}

[[routes]]
name = "dead"
path = {{ prefix = "/dead.Svc/" }}
upstream = "dead"

[[routes]]
name = "private"
path = {{ prefix = "/private.Svc/" }}
upstream = "grpc"
auth = {{ jwt = "t" }}

[upstreams.grpc]
endpoints = ["127.0.0.1:{port}"]
protocol = "h2c"

[upstreams.dead]
endpoints = ["127.0.0.1:{dead}"]
protocol = "h2c"
''')
    with grpc.insecure_channel(addr) as channel:
        def status_of(method):
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            try:
                call(b"", timeout=30)
            except grpc.RpcError as e:
                return e.code(), e.details()
            return grpc.StatusCode.OK, ""

        code, details = status_of("/nowhere.Svc/Call")
        assert code == grpc.StatusCode.UNIMPLEMENTED, (code, details)
        assert "no route matches" in details
        code, details = status_of("/dead.Svc/Call")
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "cannot connect to upstream dead" in details
        code, details = status_of("/private.Svc/Call")
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(2):
            assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status == \
                health_pb2.HealthCheckResponse.SERVING
        try:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            raise AssertionError("the third call is over the limit")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            assert "rate limit" in e.details()
