"""HTTP/2 abuse against `tessera gateway` with frames built by the Python `h2`/`hpack`/
`hyperframe` libraries (h2c, prior knowledge): rapid reset (CVE-2023-44487), a
CONTINUATION flood and an HPACK bomb. Each must end in a refused stream or a closed
connection, reach the upstream with nothing it should not, and leave the gateway serving."""

import http.client
import http.server
import socket
import threading
import time

import hpack
import pytest
from conftest import h2c_connect, split_frames
from hyperframe.frame import ContinuationFrame, GoAwayFrame, HeadersFrame, RstStreamFrame


class Counting(http.server.BaseHTTPRequestHandler):
    hits = 0
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        Counting.hits += 1
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def target(gateway):
    Counting.hits = 0
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    addr, _ = gateway(f"""
[[routes]]
upstream = "u"
[upstreams.u]
endpoints = ["127.0.0.1:{srv.server_address[1]}"]
""")
    try:
        yield addr
    finally:
        srv.shutdown()


def request_headers(addr, path="/"):
    return [(":method", "GET"), (":scheme", "http"), (":authority", addr), (":path", path)]


def read_frames(sock, deadline_s=30.0, done=lambda frames: False):
    """Frames the server sends until it closes the connection, sends GOAWAY, `done`
    says enough, or the (generous) deadline passes; the connection counts as closed on
    EOF or a reset. A slow server only makes this wait longer."""
    frames, buf, closed = [], b"", False
    sock.settimeout(1.0)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and not done(frames):
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        parsed, buf = split_frames(buf + chunk)
        frames.extend(parsed)
        if any(isinstance(f, GoAwayFrame) for f in frames):
            break
    return frames, closed


def still_serves(addr):
    host, port = addr.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", "/after")
    status = c.getresponse().status
    c.close()
    return status == 200


def test_rapid_reset_closes_the_connection(target):
    sock, conn = h2c_connect(target)
    sent = 0
    try:
        for _ in range(2000):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, request_headers(target), end_stream=True)
            conn.reset_stream(sid)
            sock.sendall(conn.data_to_send())
            sent += 1
    except OSError:
        pass  # the gateway closed the connection while we were still resetting
    frames, closed = read_frames(sock)
    sock.close()
    goaway = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaway or closed, "the connection survived 2000 resets"
    if goaway:
        # ENHANCE_YOUR_CALM (11) is what hyper's h2 answers a reset flood with.
        assert goaway[0].error_code in (0, 1, 11), goaway[0].error_code
    assert Counting.hits < 100, f"{Counting.hits} of {sent} reset requests were proxied"
    assert still_serves(target)


def test_continuation_flood_is_cut_off(target):
    sock, conn = h2c_connect(target)
    enc = hpack.Encoder()
    sid = conn.get_next_available_stream_id()
    block = enc.encode(request_headers(target))
    first = HeadersFrame(sid, data=block, flags=["END_STREAM"])
    sent = 0
    cut_off = False
    try:
        sock.sendall(first.serialize())
        # Each CONTINUATION adds ~16 KiB of headers and never ends the block.
        junk = enc.encode([(f"x-flood-{i}", "v" * 200) for i in range(70)])
        for _ in range(1000):
            sock.sendall(ContinuationFrame(sid, data=junk).serialize())
            sent += len(junk)
    except OSError:
        cut_off = True
    frames, closed = read_frames(sock)
    sock.close()
    refused = cut_off or closed or any(isinstance(f, (GoAwayFrame, RstStreamFrame)) for f in frames)
    assert refused, f"{sent} bytes of CONTINUATION accepted without a refusal"
    assert Counting.hits == 0, "the flooded request reached the upstream"
    assert still_serves(target)


def test_hpack_bomb_is_refused(target):
    sock, conn = h2c_connect(target)
    # One 4000-byte header in the dynamic table, then a block naming it 500 times:
    # a few kilobytes on the wire, 2 MB decoded.
    enc = hpack.Encoder()
    big = ("x-big", "a" * 4000)
    first = enc.encode(request_headers(target, "/seed") + [big])
    sock.sendall(HeadersFrame(1, data=first, flags=["END_STREAM", "END_HEADERS"]).serialize())
    bomb = enc.encode(request_headers(target, "/bomb") + [big] * 500)
    assert len(bomb) < 4000, len(bomb)
    sock.sendall(HeadersFrame(3, data=bomb, flags=["END_STREAM", "END_HEADERS"]).serialize())
    # Done once anything arrives on the bomb's stream (a response or a reset).
    frames, closed = read_frames(
        sock, done=lambda fs: any(f.stream_id == 3 for f in fs)
    )
    sock.close()
    # Response heads in order through one decoder (they share its dynamic table).
    dec, status_of = hpack.Decoder(), {}
    for f in frames:
        if isinstance(f, HeadersFrame):
            status_of.setdefault(f.stream_id, dict(dec.decode(f.data)).get(":status"))
    refused = closed or any(isinstance(f, (GoAwayFrame, RstStreamFrame)) for f in frames)
    # A response on the bomb's stream can only be the refusal.
    assert status_of.get(3) in (None, "400", "431"), status_of
    assert refused or status_of.get(3), frames
    assert Counting.hits <= 1, "the bomb reached the upstream"
    assert still_serves(target)
