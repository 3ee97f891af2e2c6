"""The shop's cart over gRPC, as clients nobody here wrote see it: grpcio with stubs that
grpcio-tools generates from `proto/`, grpcio-reflection, and the registry's gRPC health
check against a replica that stops answering."""

import importlib
import os
import signal
import subprocess
import sys

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import BIN, call, start_demo, wait_until

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CART = "tessera.shop.cart.v1.Cart"


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """cart_pb2 and cart_pb2_grpc, generated from the repository's proto by grpcio-tools."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    rc = protoc.main([
        "protoc", f"-I{os.path.join(ROOT, 'proto')}", f"--python_out={out}", f"--grpc_python_out={out}",
        "tessera/shop/cart/v1/cart.proto",
    ])
    assert rc == 0, "grpcio-tools could not compile the cart's proto"
    sys.path.insert(0, str(out))
    try:
        yield (importlib.import_module("tessera.shop.cart.v1.cart_pb2"),
               importlib.import_module("tessera.shop.cart.v1.cart_pb2_grpc"))
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo shop: yields (gateway, registry, data dir, a user's token)."""
    data = tmp_path_factory.mktemp("demo")
    proc, gw, registry = start_demo(data)
    try:
        creds = {"email": "grpc@shop.test", "password": "grpc-password-1"}
        assert call(gw, "POST", "/api/users/register", creds)[0] == 201
        _, v = call(gw, "POST", "/api/users/login", creds)
        yield gw, registry, data, v["token"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def cart_instances(registry):
    _, v = call(registry, "GET", "/v1/health/service/cart?passing")
    return [f"{e['Service']['Address']}:{e['Service']['Port']}" for e in v]


def test_the_cart_over_grpc_through_the_gateway_with_a_jwt(demo, stubs):
    gw, _, _, token = demo
    pb, pb_grpc = stubs
    auth = [("authorization", f"Bearer {token}")]
    with grpc.insecure_channel(gw) as channel:
        cart = pb_grpc.CartStub(channel)
        view = cart.AddItem(pb.AddItemRequest(product_id="mug", quantity=2), metadata=auth, timeout=30)
        assert [(i.product_id, i.quantity) for i in view.items] == [("mug", 2)]
        view = cart.AddItem(pb.AddItemRequest(product_id="filter"), metadata=auth, timeout=30)
        got = cart.GetCart(pb.GetCartRequest(), metadata=auth, timeout=30)
        assert got == view
        assert [(i.product_id, i.quantity) for i in got.items] == [("filter", 1), ("mug", 2)]
        # The same cart as the REST API's.
        s, v = call(gw, "GET", "/api/cart", token=token)
        assert s == 200 and v["items"] == [{"product_id": "filter", "quantity": 1},
                                           {"product_id": "mug", "quantity": 2}], v
        assert v["user_id"] == got.user_id
        # The cart's own refusals arrive as statuses with its message.
        with pytest.raises(grpc.RpcError) as e:
            cart.AddItem(pb.AddItemRequest(product_id="mug", quantity=5000), metadata=auth, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "quantity" in e.value.details()
        view = cart.RemoveItem(pb.RemoveItemRequest(product_id="filter"), metadata=auth, timeout=30)
        assert [i.product_id for i in view.items] == ["mug"]
        # An order's items come out once per order id; an empty Clear empties the cart.
        once = pb.ClearRequest(order_id="o-1", items=[pb.Item(product_id="mug", quantity=1)])
        assert [i.quantity for i in cart.Clear(once, metadata=auth, timeout=30).items] == [1]
        assert [i.quantity for i in cart.Clear(once, metadata=auth, timeout=30).items] == [1]
        assert list(cart.Clear(pb.ClearRequest(), metadata=auth, timeout=30).items) == []
        # No token, or a forged one: the gateway refuses, as gRPC.
        for md in ([], [("authorization", "Bearer not.a.token")]):
            with pytest.raises(grpc.RpcError) as e:
                cart.GetCart(pb.GetCartRequest(), metadata=md, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
            assert e.value.details(), "the gateway says why"


def test_reflection_lists_the_cart_and_a_client_calls_it_from_what_it_learned(demo):
    """What grpcurl does: list services, fetch the descriptors, build a request from them."""
    _, registry, _, token = demo
    addr = cart_instances(registry)[0]
    with grpc.insecure_channel(addr) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {CART, "grpc.health.v1.Health"} <= services, services
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName(CART)
        assert [m.name for m in svc.methods] == ["AddItem", "RemoveItem", "GetCart", "Clear"]
        method = svc.methods_by_name["GetCart"]
        request = GetMessageClass(method.input_type)
        response = GetMessageClass(method.output_type)
        get_cart = channel.unary_unary(
            f"/{CART}/GetCart",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )
        view = get_cart(request(), metadata=[("authorization", f"Bearer {token}")], timeout=30)
        assert view.user_id
        # Called directly, the cart checks the token itself.
        with pytest.raises(grpc.RpcError) as e:
            get_cart(request(), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def grpc_web(gw, method, message, token, text=False):
    """One gRPC-Web call over HTTP/1.1, as a browser's fetch makes it: (HTTP status,
    headers, [messages], {trailers})."""
    import base64
    import http.client
    import struct

    body = b"\0" + struct.pack(">I", len(message)) + message
    ctype = "application/grpc-web-text" if text else "application/grpc-web+proto"
    host, port = gw.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", f"/{CART}/{method}", body=base64.b64encode(body) if text else body,
                 headers={"content-type": ctype, "x-grpc-web": "1", "authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    data = resp.read()
    if text:
        data = base64.b64decode(data)
    messages, trailers = [], {}
    while data:
        flag, n = data[0], struct.unpack(">I", data[1:5])[0]
        chunk, data = data[5:5 + n], data[5 + n:]
        if flag & 0x80:
            for line in chunk.decode().split("\r\n"):
                if line:
                    k, v = line.split(":", 1)
                    trailers[k.strip()] = v.strip()
        else:
            messages.append(chunk)
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, messages, trailers


def test_grpc_web_through_the_gateway(demo, stubs):
    """A browser's gRPC-Web call, binary and base64 text, reaches the cart as gRPC."""
    gw, _, _, token = demo
    pb, _ = stubs
    add = pb.AddItemRequest(product_id="kettle", quantity=1).SerializeToString()
    status, headers, messages, trailers = grpc_web(gw, "AddItem", add, token, text=True)
    assert status == 200 and headers["content-type"] == "application/grpc-web-text+proto", headers
    assert trailers.get("grpc-status") == "0", trailers
    view = pb.CartView.FromString(messages[0])
    assert ("kettle", 1) in [(i.product_id, i.quantity) for i in view.items]

    status, headers, messages, trailers = grpc_web(gw, "GetCart", b"", token)
    assert status == 200 and headers["content-type"] == "application/grpc-web+proto", headers
    assert trailers.get("grpc-status") == "0", trailers
    assert pb.CartView.FromString(messages[0]) == view
    # A refusal is a status in the head, where a gRPC-Web client reads it.
    status, headers, messages, _ = grpc_web(gw, "GetCart", b"", "forged")
    assert (status, headers.get("grpc-status"), messages) == (200, "16", []), headers


def test_a_stopped_cart_replica_goes_critical_by_its_grpc_health_check(demo):
    """A third cart replica, SIGSTOPped: the registry's gRPC check of it times out and
    goes critical; SIGCONT, and it passes again."""
    _, registry, data, _ = demo
    extra = subprocess.Popen(
        [BIN, "shop", "cart", "--listen", "127.0.0.1:0", "--registry", registry,
         "--data-dir", str(data / "extra-cart")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = extra.stdout.readline()
        assert "listening on http://" in line, line
        addr = line.split("http://")[1].split()[0]

        def grpc_check():
            _, checks = call(registry, "GET", "/v1/health/checks/cart")
            mine = [c for c in checks if c["ServiceID"].endswith(addr.replace(":", "-"))
                    and c["Output"].startswith("gRPC check")]
            return mine[0] if mine else None

        # Passing means every check of the instance passes (its HTTP check too).
        wait_until("the replica passing, its gRPC check among its checks",
                   lambda: (grpc_check() or {}).get("Status") == "passing"
                   and addr in cart_instances(registry))
        extra.send_signal(signal.SIGSTOP)
        try:
            check = wait_until("the gRPC check critical",
                               lambda: (lambda c: c if c and c["Status"] == "critical" else None)(grpc_check()))
            assert "gRPC check" in check["Output"], check
            assert addr not in cart_instances(registry)
        finally:
            extra.send_signal(signal.SIGCONT)
        wait_until("passing again after SIGCONT",
                   lambda: (grpc_check() or {}).get("Status") == "passing"
                   and addr in cart_instances(registry))
    finally:
        extra.terminate()
        extra.wait(timeout=60)
