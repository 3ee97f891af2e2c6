"""Fixtures: a real `tessera server` process on an ephemeral port."""

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

BIN = os.environ.get("TESSERA_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "target", "debug", "tessera"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, cond, timeout=60.0, interval=0.05):
    """Polls `cond` up to a generous deadline: a loaded machine is slower, never wrong."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(interval)


@pytest.fixture
def tessera():
    data = tempfile.mkdtemp(prefix="tessera-peer-")
    proc = subprocess.Popen(
        [BIN, "server", "--bind", "127.0.0.1:0", "--node", "peer-node", "--data-dir", data],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    m = re.search(r"http://([\d.]+):(\d+)", line)
    assert m, f"no address in {line!r}"
    host, port = m.group(1), int(m.group(2))
    try:
        yield host, port
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(data, ignore_errors=True)


def start_gateway(config_text, env=None):
    """Starts `tessera gateway` with the given TOML on ephemeral ports (and `env` added to
    its environment); returns (process, "host:port" of the proxy, "host:port" of the admin
    API, config dir)."""
    work = tempfile.mkdtemp(prefix="tessera-gw-")
    path = os.path.join(work, "gateway.toml")
    with open(path, "w") as f:
        f.write(config_text)
    proc = subprocess.Popen(
        [BIN, "gateway", "--config", path, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = proc.stdout.readline()
    m = re.search(r"http://([\d.]+:\d+) \(admin http://([\d.]+:\d+)", line)
    assert m, f"no addresses in {line!r}"
    return proc, m.group(1), m.group(2), work


@pytest.fixture
def gateway():
    started = []

    def start(config_text, env=None):
        g = start_gateway(config_text, env)
        started.append(g)
        return g[1], g[2]

    yield start
    for proc, _, _, work in started:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def grpc_health():
    """A real grpcio server with the standard health service on an ephemeral port:
    yields (server, servicer, port); the test may stop the server early."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield server, servicer, port
    finally:
        server.stop(0)


def h2c_connect(addr):
    """A socket to `addr` ("host:port") with the HTTP/2 preface and settings already sent
    (h2c, prior knowledge), and the `h2` connection that made them. Tests write their own
    frames after it."""
    import h2.config
    import h2.connection

    host, port = addr.split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def split_frames(buf):
    """The complete HTTP/2 frames at the start of `buf`, and the bytes after them."""
    from hyperframe.frame import Frame

    frames = []
    while len(buf) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
        if len(buf) < 9 + length:
            break
        frame.parse_body(memoryview(buf[9:9 + length]))
        frames.append(frame)
        buf = buf[9 + length:]
    return frames, buf


def serve_http(handler):
    """`handler` on an ephemeral loopback port in a thread: (server, port)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


class EchoUpstream(http.server.BaseHTTPRequestHandler):
    """An upstream that answers every GET with JSON of its path and header fields (names
    lowercased), counting what it served in `hits`."""

    hits = 0

    def do_GET(self):
        EchoUpstream.hits += 1
        fields = {k.lower(): v for k, v in self.headers.items()}
        body = json.dumps({"path": self.path, "headers": fields}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    """The port of an `EchoUpstream`."""
    srv, port = serve_http(EchoUpstream)
    try:
        yield port
    finally:
        srv.shutdown()


def call(base, method, path, body=None, token=None, headers=None):
    """One HTTP/1.1 request to `base` ("host:port"): (status, JSON or text body)."""
    import http.client

    host, port = base.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    h = dict(headers or {})
    if body is not None:
        h["content-type"] = "application/json"
    if token:
        h["authorization"] = f"Bearer {token}"
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=h)
    resp = conn.getresponse()
    data = resp.read()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data.decode(errors="replace")


def start_demo(data_dir, env=None):
    """`tessera demo` on ephemeral ports with its data in `data_dir` (and `env` added):
    returns (process, gateway "host:port", registry "host:port") once it is up. Stop it
    with SIGINT, as Ctrl-C does."""
    full = dict(os.environ)
    for k in ("TESSERA_STOP_ON_STDIN_EOF", "DATABASE_URL", "TESSERA_DATABASE_URL", "TESSERA_EVENTS"):
        full.pop(k, None)
    full.update(env or {})
    demo = subprocess.Popen(
        [BIN, "demo", "--gateway", "127.0.0.1:0", "--registry", "127.0.0.1:0", "--fresh",
         "--data-dir", str(data_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=full, text=True,
    )
    gw = registry = None
    said = []
    for line in demo.stdout:
        said.append(line)
        words = line.split()
        if words[:1] == ["gateway:"]:
            gw = words[1].removeprefix("http://")
        if words[:1] == ["registry:"]:
            registry = words[1].removeprefix("http://")
        if "Press Ctrl-C" in line:
            break
    if not (gw and registry):
        demo.kill()
        demo.wait()
        raise AssertionError("the demo did not come up:\n" + "".join(said))
    # Keep reading, so the demo never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in demo.stdout], daemon=True).start()
    return demo, gw, registry

