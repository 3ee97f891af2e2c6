"""py-consul (a client nobody here wrote) driving `tessera server`."""

import http.server
import threading

import consul
from grpc_health.v1 import health_pb2

from conftest import wait_until


def client(tessera):
    host, port = tessera
    return consul.Consul(host=host, port=port)


def test_ttl_check_lifecycle(tessera):
    c = client(tessera)
    assert c.agent.service.register(
        "web", service_id="web1", address="127.0.0.1", port=8080, tags=["v1"], check=consul.Check.ttl("30s")
    )
    _, nodes = c.health.service("web", passing=True)
    assert nodes == [], "a TTL check starts critical"
    c.agent.check.ttl_pass("service:web1", notes="warmed up")
    index, nodes = c.health.service("web", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["web1"]
    assert nodes[0]["Service"]["Port"] == 8080
    assert nodes[0]["Service"]["Tags"] == ["v1"]
    check = [ch for ch in nodes[0]["Checks"] if ch["CheckID"] == "service:web1"][0]
    assert check["Status"] == "passing" and check["Output"] == "warmed up"

    # A blocking health query returns when the check changes.
    result = {}

    def watch():
        result["value"] = c.health.service("web", index=index, wait="30s", passing=True)

    t = threading.Thread(target=watch)
    t.start()
    c.agent.check.ttl_fail("service:web1")
    t.join(60)
    new_index, nodes = result["value"]
    assert int(new_index) > int(index)
    assert nodes == []

    services = c.agent.services()
    assert services["web1"]["Service"] == "web"
    assert c.agent.service.deregister("web1")
    _, nodes = c.health.service("web")
    assert nodes == []


def test_http_check_runs(tessera):
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"fine")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = client(tessera)
        url = f"http://127.0.0.1:{srv.server_address[1]}/health"
        c.agent.service.register("api", service_id="api1", port=srv.server_address[1],
                                 check=consul.Check.http(url, "200ms", timeout="2s"))
        wait_until("http check passing", lambda: c.health.service("api", passing=True)[1])
        checks = c.agent.checks()
        assert checks["service:api1"]["Status"] == "passing"
        assert "fine" in checks["service:api1"]["Output"]
    finally:
        srv.shutdown()


def test_tcp_and_grpc_checks(tessera, grpc_health):
    server, servicer, port = grpc_health
    try:
        servicer.set("shop.Orders", health_pb2.HealthCheckResponse.SERVING)
        c = client(tessera)
        c.agent.service.register("orders", service_id="orders1", port=port,
                                 check=consul.Check.grpc(f"127.0.0.1:{port}/shop.Orders", "200ms"))
        c.agent.service.register("orders-tcp", service_id="orders-tcp1", port=port,
                                 check=consul.Check.tcp("127.0.0.1", port, "200ms"))
        wait_until("grpc check passing", lambda: c.health.service("orders", passing=True)[1])
        wait_until("tcp check passing", lambda: c.health.service("orders-tcp", passing=True)[1])
        servicer.set("shop.Orders", health_pb2.HealthCheckResponse.NOT_SERVING)
        wait_until("grpc check critical", lambda: c.agent.checks()["service:orders1"]["Status"] == "critical")
        assert "NOT_SERVING" in c.agent.checks()["service:orders1"]["Output"]
        servicer.set("shop.Orders", health_pb2.HealthCheckResponse.SERVING)
        wait_until("grpc check passing again", lambda: c.health.service("orders", passing=True)[1])
    finally:
        server.stop(0)
    wait_until("tcp check critical after the server stops",
               lambda: c.agent.checks()["service:orders-tcp1"]["Status"] == "critical")


def test_kv_blocking_get_and_cas(tessera):
    c = client(tessera)
    assert c.kv.put("cfg/db/url", "postgres://a")
    index, data = c.kv.get("cfg/db/url")
    assert data["Value"] == b"postgres://a"

    result = {}

    def watch():
        result["value"] = c.kv.get("cfg/db/url", index=index, wait="30s")

    t = threading.Thread(target=watch)
    t.start()
    c.kv.put("cfg/other", "x")  # unrelated key: the watcher keeps waiting
    c.kv.put("cfg/db/url", "postgres://b")
    t.join(60)
    new_index, data = result["value"]
    assert int(new_index) > int(index)
    assert data["Value"] == b"postgres://b"

    # CAS: 0 creates only if absent; otherwise the ModifyIndex must match.
    assert c.kv.put("lock", "me", cas=0) is True
    assert c.kv.put("lock", "you", cas=0) is False
    _, data = c.kv.get("lock")
    assert c.kv.put("lock", "next", cas=data["ModifyIndex"]) is True
    assert c.kv.put("lock", "stale", cas=data["ModifyIndex"]) is False

    _, keys = c.kv.get("cfg/", keys=True)
    assert keys == ["cfg/db/url", "cfg/other"]
    _, entries = c.kv.get("cfg/", recurse=True)
    assert len(entries) == 2
    assert c.kv.delete("cfg/", recurse=True)
    _, entries = c.kv.get("cfg/", recurse=True)
    assert entries is None


def test_catalog_and_agent_views(tessera):
    c = client(tessera)
    c.agent.service.register("db", service_id="db1", port=5432, tags=["primary"])
    _, services = c.catalog.services()
    assert services["db"] == ["primary"]
    _, nodes = c.catalog.nodes()
    assert nodes[0]["Node"] == "peer-node"
    _, instances = c.catalog.service("db")
    assert instances[0]["ServicePort"] == 5432
    me = c.agent.self()
    assert me["Config"]["Datacenter"] == "dc1"
    assert c.status.leader()
    assert len(c.status.peers()) == 1
    assert c.agent.service.maintenance("db1", "true", reason="upgrade")
    _, nodes = c.health.service("db", passing=True)
    assert nodes == []


def test_sessions_and_locks_elect_one_leader(tessera):
    """python-consul's session API and KV locks: the leader-election recipe."""
    c = client(tessera)
    a = c.session.create(name="a", lock_delay=0, ttl=10)
    b = c.session.create(name="b", lock_delay=0, behavior="release")
    assert c.kv.put("service/web/leader", "node-a", acquire=a) is True
    assert c.kv.put("service/web/leader", "node-b", acquire=b) is False
    _, data = c.kv.get("service/web/leader")
    assert data["Session"] == a and data["Value"] == b"node-a"
    _, info = c.session.info(a)
    assert info["ID"] == a and info["Name"] == "a" and info["TTL"] == "10s"
    assert c.session.renew(a)["ID"] == a
    _, sessions = c.session.list()
    assert sorted(s["ID"] for s in sessions) == sorted([a, b])
    _, on_node = c.session.node(info["Node"])
    assert len(on_node) == 2
    # The leader steps down (its session ends): the other contender takes over.
    assert c.session.destroy(a)
    _, info = c.session.info(a)
    assert info is None
    assert c.kv.put("service/web/leader", "node-b", acquire=b) is True
    _, data = c.kv.get("service/web/leader")
    assert data["Session"] == b and data["LockIndex"] == 2
    assert c.kv.put("service/web/leader", "", release=b) is True
    _, data = c.kv.get("service/web/leader")
    assert "Session" not in data or data["Session"] is None


def test_transactions_with_py_consul(tessera):
    import base64

    c = client(tessera)
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    r = c.txn.put([
        {"KV": {"Verb": "set", "Key": "t/a", "Value": b64("1")}},
        {"KV": {"Verb": "get", "Key": "t/a"}},
    ])
    assert r["Errors"] is None
    assert r["Results"][1]["KV"]["Value"] == b64("1")
    index = r["Results"][1]["KV"]["ModifyIndex"]
    r = c.txn.put([{"KV": {"Verb": "cas", "Key": "t/a", "Value": b64("2"), "Index": index}}])
    assert r["Errors"] is None
    _, data = c.kv.get("t/a")
    assert data["Value"] == b"2"
