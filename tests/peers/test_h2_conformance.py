"""HTTP/2 requests that cannot become a safe HTTP/1.1 request (RFC 9113 section 8),
sent to `tessera gateway` over h2c as raw frames (HPACK by the Python `hpack` library, so
nothing is cleaned up on the way out). Each one must be refused with a stream reset, a
GOAWAY or a 400, and no byte of it may reach the HTTP/1.1 upstream, which records every
byte it receives. The corpus was written from the RFC's MUSTs; a few well-formed requests
check what the gateway owes an HTTP/1.1 upstream instead (one `cookie` line, an exact
body)."""

import socket
import threading
import time

import hpack
import pytest
from conftest import h2c_connect, split_frames
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame


class Upstream:
    """An HTTP/1.1 server that keeps every byte it is sent and answers each request
    `200 ok`. Deliberately minimal: it must not hide what arrived by parsing it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.raw = bytearray()
        self.requests = []  # (head, body) of each complete request
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                with self.lock:
                    self.raw += chunk
                buf += chunk
                while b"\r\n\r\n" in buf:
                    head, rest = buf.split(b"\r\n\r\n", 1)
                    fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:]]
                    names = {k.strip().lower(): v.strip() for k, v in fields if len([k, v]) == 2}
                    if names.get(b"transfer-encoding", b"").lower() == b"chunked":
                        end = rest.find(b"0\r\n\r\n")
                        if end < 0 or (end > 0 and rest[end - 2:end] != b"\r\n"):
                            break
                        body, buf = rest[:end + 5], rest[end + 5:]
                    else:
                        n = int(names.get(b"content-length", b"0"))
                        if len(rest) < n:
                            break
                        body, buf = rest[:n], rest[n:]
                    with self.lock:
                        self.requests.append((head, body))
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    def heads(self):
        with self.lock:
            return [h for h, _ in self.requests]

    def close(self):
        self.sock.close()


@pytest.fixture
def target(gateway):
    up = Upstream()
    # A small replay buffer, so a body of a few frames streams instead of being held.
    addr, _ = gateway(f"""
max_replay_body_bytes = 1024
[[routes]]
upstream = "u"
[upstreams.u]
endpoints = ["127.0.0.1:{up.port}"]
""")
    try:
        yield addr, up
    finally:
        up.close()


def base(addr, path, method="GET"):
    return [(":method", method), (":scheme", "http"), (":authority", addr), (":path", path)]


def exchange(addr, headers, data=None, trailer=None):
    """Sends one request on stream 1 of a new h2c connection, frames as given; returns
    ("reset", code), ("goaway", code), ("closed", None) or ("status", n) with the body."""
    sock, _ = h2c_connect(addr)
    enc = hpack.Encoder()
    flags = ["END_HEADERS"]
    if not data and not trailer:
        flags.append("END_STREAM")
    try:
        sock.sendall(HeadersFrame(1, data=enc.encode(headers), flags=flags).serialize())
        for i, chunk in enumerate(data or []):
            last = ["END_STREAM"] if i == len(data) - 1 and not trailer else []
            sock.sendall(DataFrame(1, data=chunk, flags=last).serialize())
        if trailer:
            block = enc.encode(trailer)
            sock.sendall(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    except OSError:
        return ("closed", None), b""
    dec = hpack.Decoder()
    buf, body, status = b"", b"", None
    sock.settimeout(1.0)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return ("closed", None), body
            if not chunk:
                return ("closed", None), body
            frames, buf = split_frames(buf + chunk)
            for frame in frames:
                if isinstance(frame, GoAwayFrame):
                    return ("goaway", frame.error_code), body
                if frame.stream_id != 1:
                    continue
                if isinstance(frame, RstStreamFrame):
                    return ("reset", frame.error_code), body
                if isinstance(frame, HeadersFrame):
                    status = int(dict(dec.decode(frame.data))[":status"])
                if isinstance(frame, DataFrame):
                    body += frame.data
                if "END_STREAM" in frame.flags:
                    return ("status", status), body
        raise AssertionError(f"no answer to {headers!r}")
    finally:
        sock.close()


# (name, headers after the pseudo-headers, data frames); each request's path is
# /bad/<name> so the upstream's record shows whether any of it arrived.
FIELDS = [
    ("connection", [("connection", "keep-alive")]),
    ("connection-close-names", [("connection", "x-secret"), ("x-secret", "1")]),
    ("transfer-encoding", [("transfer-encoding", "chunked")]),
    ("upgrade", [("upgrade", "websocket")]),
    ("keep-alive", [("keep-alive", "timeout=5")]),
    ("proxy-connection", [("proxy-connection", "keep-alive")]),
    ("te-gzip", [("te", "gzip")]),
    ("te-trailers-and-more", [("te", "trailers, deflate")]),
    ("value-cr", [("x-a", "a\rb")]),
    ("value-lf", [("x-a", "a\nx-injected: 1")]),
    ("value-crlf", [("x-a", "a\r\nx-injected: 1")]),
    ("value-nul", [("x-a", "a\x00b")]),
    ("value-leading-space", [("x-a", " a")]),
    ("value-trailing-tab", [("x-a", "a\t")]),
    ("name-uppercase", [("X-Upper", "1")]),
    ("name-space", [("x a", "1")]),
    ("name-colon", [("x:a", "1")]),
    ("name-crlf", [("x-a\r\nx-injected", "1")]),
    ("name-empty", [("", "1")]),
    ("content-length-letters", [("content-length", "abc")]),
    ("content-length-twice", [("content-length", "0"), ("content-length", "1")]),
    ("content-length-without-body", [("content-length", "5")]),
    ("host-differs", [("host", "elsewhere.example")]),
]


@pytest.mark.parametrize("name,fields", FIELDS, ids=[n for n, _ in FIELDS])
def test_malformed_fields_are_refused(target, name, fields):
    addr, up = target
    answer, _ = exchange(addr, base(addr, f"/bad/{name}") + fields)
    assert_refused(answer, name)
    assert_nothing_forwarded(addr, up)


PSEUDO = [
    ("pseudo-after-regular", [(":method", "GET"), (":scheme", "http"), ("x-a", "1"), (":path", "/bad/p1")]),
    ("pseudo-repeated", [(":method", "GET"), (":scheme", "http"), (":path", "/bad/p2"), (":path", "/bad/p2b")]),
    ("pseudo-unknown", [(":method", "GET"), (":scheme", "http"), (":path", "/bad/p3"), (":foo", "1")]),
    ("pseudo-status-in-request", [(":status", "200"), (":method", "GET"), (":scheme", "http"), (":path", "/bad/p4")]),
    ("pseudo-missing-method", [(":scheme", "http"), (":path", "/bad/p5")]),
    ("pseudo-missing-scheme", [(":method", "GET"), (":path", "/bad/p6")]),
    ("pseudo-missing-path", [(":method", "GET"), (":scheme", "http"), ("x-path", "/bad/p7")]),
    ("pseudo-empty-path", [(":method", "GET"), (":scheme", "http"), (":path", "")]),
    ("path-relative", [(":method", "GET"), (":scheme", "http"), (":path", "bad/p9")]),
    ("path-asterisk-get", [(":method", "GET"), (":scheme", "http"), (":path", "*")]),
    ("path-space", [(":method", "GET"), (":scheme", "http"), (":path", "/bad/p11 HTTP/1.1\r\nx-injected: 1")]),
    ("authority-crlf", [(":method", "GET"), (":scheme", "http"), (":authority", "a\r\nx-injected: 1"), (":path", "/bad/p12")]),
    ("authority-userinfo", [(":method", "GET"), (":scheme", "http"), (":authority", "user@example.com"), (":path", "/bad/p13")]),
    ("protocol-without-connect", [(":method", "GET"), (":scheme", "http"), (":protocol", "websocket"), (":path", "/bad/p14")]),
    ("method-space", [(":method", "GET /x"), (":scheme", "http"), (":path", "/bad/p15")]),
    ("connect", [(":method", "CONNECT"), (":authority", "127.0.0.1:1")]),
]


@pytest.mark.parametrize("name,headers", PSEUDO, ids=[n for n, _ in PSEUDO])
def test_pseudo_header_misuse_is_refused(target, name, headers):
    addr, up = target
    if not any(k == ":authority" for k, _ in headers) and name != "connect":
        headers = headers + [("host", addr)]
    answer, _ = exchange(addr, headers)
    assert_refused(answer, name, also=(405,) if name == "connect" else ())
    assert_nothing_forwarded(addr, up)


def test_request_trailers_never_reach_http1(target):
    """A body of unknown length streams (gRPC must not wait for its end), so its head is
    upstream before the trailers arrive. Trailers are not passed to an HTTP/1.1 upstream
    (nginx drops them too): some servers merge them into the header section, where a
    pseudo-header, a framing field or a forged identity field would land."""
    addr, up = target
    for i, trailer in enumerate([[(":path", "/bad/trailer"), ("x-injected", "1")],
                                 [("content-length", "0"), ("x-injected", "2")],
                                 [("host", "x-injected.example")]]):
        path = f"/good/trailers/{i}"
        answer, _ = exchange(addr, base(addr, path, "POST"), data=[b"hello"], trailer=trailer)
        # Whether refused or passed without them, the body's head went upstream.
        assert answer[0] != "status" or answer[1] in (200, 400), answer
    assert_nothing_forwarded(addr, up)


BODIES = [
    # (name, content-length, data frames)
    ("body-shorter-than-length", "10", [b"12345"]),
    ("body-longer-than-length", "5", [b"1234567890"]),
    ("body-longer-in-pieces", "6", [b"1234", b"5678"]),
]


@pytest.mark.parametrize("name,length,data", BODIES, ids=[n for n, _, _ in BODIES])
def test_content_length_mismatch_is_refused(target, name, length, data):
    addr, up = target
    headers = base(addr, f"/bad/{name}", "POST") + [("content-length", length)]
    answer, _ = exchange(addr, headers, data=data)
    assert_refused(answer, name)
    assert_nothing_forwarded(addr, up)


def test_a_streamed_body_cut_short_never_completes_upstream(target):
    """Over the replay buffer the body streams, so the upstream has the head before h2
    finds the body short of its `content-length`. The gateway must then close that
    connection: the upstream never gets a whole request, and the client gets a 400 or
    a reset, not a 502 that blames the upstream."""
    addr, up = target
    headers = base(addr, "/stream/short", "POST") + [("content-length", "40000")]
    answer, _ = exchange(addr, headers, data=[b"a" * 10000] * 3)
    assert_refused(answer, "streamed-body-short")
    assert_nothing_forwarded(addr, up)
    assert not any(b"/stream/short" in h for h in up.heads()), up.heads()


def test_cookie_crumbs_reach_http1_as_one_line(target):
    addr, up = target
    headers = base(addr, "/good/cookie") + [("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")]
    answer, body = exchange(addr, headers)
    assert answer == ("status", 200), answer
    head = next(h for h in up.heads() if b"/good/cookie" in h)
    cookies = [line for line in head.split(b"\r\n") if line.lower().startswith(b"cookie:")]
    assert cookies == [b"cookie: a=1; b=2; c=3"], head


def test_a_well_formed_body_arrives_exactly(target):
    addr, up = target
    headers = base(addr, "/good/body", "POST") + [("content-length", "10"), ("te", "trailers")]
    answer, body = exchange(addr, headers, data=[b"12345", b"67890"])
    assert answer == ("status", 200), answer
    with up.lock:
        got = [(h, b) for h, b in up.requests if b"/good/body" in h]
    assert len(got) == 1 and got[0][1] == b"1234567890", got
    # And one without a length, which HTTP/1.1 gets framed by the gateway.
    answer, body = exchange(addr, base(addr, "/good/stream", "POST"), data=[b"abc", b"def"])
    assert answer == ("status", 200), answer
    with up.lock:
        got = [(h, b) for h, b in up.requests if b"/good/stream" in h]
    assert len(got) == 1 and b"abc" in got[0][1] and b"def" in got[0][1], got


def assert_refused(answer, name, also=()):
    kind, code = answer
    ok = kind in ("reset", "goaway", "closed") or (kind == "status" and code in (400, *also))
    assert ok, f"{name}: answered {answer}, expected a stream reset, GOAWAY or 400"


def assert_nothing_forwarded(addr, up):
    """A well-formed request sent after the bad one arrives upstream; by then nothing of
    the bad one may have: no /bad/ target, no injected field, no CONNECT."""
    marker = f"/good/{time.monotonic_ns()}"
    answer, _ = exchange(addr, base(addr, marker))
    assert answer == ("status", 200), answer
    deadline = time.monotonic() + 60
    while not any(marker.encode() in h for h in up.heads()):
        assert time.monotonic() < deadline, "the well-formed request never arrived"
        time.sleep(0.05)
    with up.lock:
        raw = bytes(up.raw)
    assert b"/bad/" not in raw, raw
    assert b"x-injected" not in raw.lower(), raw
    assert b"CONNECT" not in raw, raw
