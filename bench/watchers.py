#!/usr/bin/env python3
"""10,000 concurrent blocking queries on one service, one change: how long until every
watcher has its answer, and the server's memory before and after the watchers connect.

Usage: watchers.py HOST:PORT SERVER_PID [N]
"""

import asyncio
import json
import resource
import sys
import time
import urllib.request


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def http(method, url, body=None):
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req) as r:
        return r.headers, r.read()


class Watcher(asyncio.Protocol):
    """One blocking query on its own connection. A bare protocol (not streams) so the
    client's own overhead stays small next to the server's."""

    def __init__(self, request, connected, done):
        self.request, self.connected, self.done = request, connected, done
        self.buf = b""
        self.need = None

    def connection_made(self, transport):
        transport.write(self.request)
        self.connected.append(1)

    def data_received(self, data):
        self.buf += data
        if self.need is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buf[:end].split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            self.need = end + 4 + length
        if len(self.buf) >= self.need and not self.done.done():
            self.done.set_result(time.monotonic())


async def watcher(loop, host, port, request, connected):
    done = loop.create_future()
    transport, _ = await loop.create_connection(lambda: Watcher(request, connected, done), host, port)
    t = await done
    transport.close()
    return t


async def main():
    addr, pid = sys.argv[1], int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    host, port = addr.split(":")
    port = int(port)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    base = f"http://{addr}"
    http("PUT", f"{base}/v1/agent/service/register", json.dumps({"Name": "watched", "ID": "w0"}).encode())
    headers, _ = http("GET", f"{base}/v1/health/service/watched")
    index = int(headers["X-Consul-Index"])
    rss_before = rss_kib(pid)

    loop = asyncio.get_running_loop()
    request = f"GET /v1/health/service/watched?index={index}&wait=5m HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    ready = []
    tasks = []
    # Connect in batches so the accept queue never overflows.
    for start in range(0, n, 500):
        for _ in range(start, min(n, start + 500)):
            tasks.append(asyncio.create_task(watcher(loop, host, port, request, ready)))
        while len(ready) < min(n, start + 500):
            await asyncio.sleep(0.01)
    await asyncio.sleep(2.0)  # let the server read every request and park it
    rss_watching = rss_kib(pid)
    early = [t for t in tasks if t.done()]
    assert not early, f"{len(early)} watchers answered before any change"

    t0 = time.monotonic()
    await asyncio.to_thread(
        http, "PUT", f"{base}/v1/agent/service/register", json.dumps({"Name": "watched", "ID": "w1"}).encode()
    )
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    t_last = max(results)
    t_first = min(results)
    print(json.dumps({
        "watchers": n,
        "first_answer_ms": round((t_first - t0) * 1000, 1),
        "all_answered_ms": round((t_last - t0) * 1000, 1),
        "rss_before_kib": rss_before,
        "rss_with_watchers_kib": rss_watching,
        "kib_per_watcher": round((rss_watching - rss_before) / n, 2),
    }))


asyncio.run(main())
