#!/usr/bin/env bash
# Event store: appends per second (wrk posting one-event appends with unique ids to 100
# streams) beside a reference on the same machine (single-row SQLite INSERTs committed
# one at a time, WAL + synchronous=FULL, as each append is fsynced before its answer);
# then subscription fan-out: SUBS server-sent-event subscribers on `*`, ROUNDS events
# appended one at a time, and the time from each append's answer to each subscriber
# receiving it (p50, p99, max).
#
#   bench/events.sh                       # 10 s of appends, wrk -c16; 100 subscribers
#   DURATION=5 SUBS=200 bench/events.sh
#
# Needs wrk (apt-get installs it if missing) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-16}
SUBS=${SUBS:-100}
ROUNDS=${ROUNDS:-50}
PORT=18600
command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
cargo build --release --quiet --bin tessera
BIN=$PWD/target/release/tessera
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

start_server() { # port [extra args...]
  local port=$1; shift
  $BIN server --bind "127.0.0.1:$port" --data-dir "$work/data-$port" "$@" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/v1/status/leader" >/dev/null && break; sleep 0.1; done
}

cat >"$work/append.lua" <<'LUA'
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"events":[{"id":"bench-%d","type":"Tick","data":{"n":%d,"pad":"%s"}}]}', n, n, string.rep("x", 200))
  return wrk.format("POST", "/v1/streams/bench-" .. (n % 100), {["Content-Type"] = "application/json"}, body)
end
LUA

append_rate() { # port → "rate p99 non2xx"
  local out
  out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$work/append.lua" "http://127.0.0.1:$1/")
  echo "$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out") $(awk '$1 == "99%" {print $2}' <<<"$out") $(awk '/Non-2xx/ {print $NF}' <<<"$out" | grep . || echo 0)"
}

start_server "$PORT"
read -r rate p99 non2xx < <(append_rate "$PORT")

ref=$(python3 - "$work/ref.db" "$DURATION" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, state TEXT)")
state = "x" * 300
end = time.time() + float(sys.argv[2]); n = 0
while time.time() < end:
    db.execute("BEGIN"); db.execute("INSERT INTO t (state) VALUES (?)", (state,)); db.execute("COMMIT"); n += 1
print(f"{n / float(sys.argv[2]):.0f}")
PY
)

fanout() { python3 - "$1" "$SUBS" "$ROUNDS" <<'PY'
import asyncio, json, sys, time
port, subs, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
received = {}  # event id -> list of receive times
async def subscriber(ready):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET /v1/streams/fanout-*/subscribe HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    await w.drain()
    await r.readuntil(b"\r\n\r\n")
    ready.set_result(None)
    buf = b""
    while True:
        chunk = await r.read(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                i = line.find(b"data:")
                if i >= 0:
                    e = json.loads(line[i + 5:])
                    received.setdefault(e["id"], []).append(time.perf_counter())
async def append(i):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"events": [{"id": f"fan-{i}", "type": "Tick", "data": {}}]}).encode()
    w.write(b"POST /v1/streams/fanout-1 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
    await w.drain()
    await r.read()
    w.close()
    return time.perf_counter()
async def main():
    loop = asyncio.get_running_loop()
    readies = [loop.create_future() for _ in range(subs)]
    tasks = [asyncio.create_task(subscriber(f)) for f in readies]
    await asyncio.gather(*readies)
    await asyncio.sleep(0.5)
    lat = []
    for i in range(rounds):
        t = await append(i)
        deadline = time.perf_counter() + 10
        while len(received.get(f"fan-{i}", [])) < subs and time.perf_counter() < deadline:
            await asyncio.sleep(0.001)
        lat += [max(0.0, x - t) * 1000 for x in received.get(f"fan-{i}", [])]
        await asyncio.sleep(0.02)
    lat.sort()
    got = len(lat); want = subs * rounds
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    print(f"{got}/{want} deliveries; p50 {pick(0.5):.2f} ms, p99 {pick(0.99):.2f} ms, max {lat[-1]:.2f} ms")
    for t in tasks: t.cancel()
asyncio.run(main())
PY
}

echo "tessera event store; 2 cores; wrk -t1 -c$CONNS -d${DURATION}s, one-event appends (~300 B) to 100 streams"
printf '%-34s %10s\n' "appends/s (each fsynced)" "$rate"
printf '%-34s %10s\n' "append p99" "$p99"
printf '%-34s %10s\n' "non-2xx answers" "${non2xx:-0}"
printf '%-34s %10s\n' "reference: SQLite commits/s" "$ref"
printf '%-34s %9.1fx\n' "ratio" "$(python3 -c "print($rate/$ref)")"
echo "fan-out to $SUBS subscribers on fanout-*, $ROUNDS events: $(fanout "$PORT")"

# The same on NATS JetStream (`--events nats://...`), beside JetStream publishes/s from
# nats-py (16 concurrent publishers awaiting their acks) as the reference.
NATS=${NATS:-nats://127.0.0.1:4222}
if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  python3 -m venv "$work/venv" && "$work/venv/bin/pip" install -q nats-py==2.9.0 >/dev/null
  ns="bench$$"
  start_server $((PORT + 1)) --events "$NATS" --events-namespace "$ns"
  read -r nrate np99 nnon2xx < <(append_rate $((PORT + 1)))
  nref=$("$work/venv/bin/python" - "$NATS" "$DURATION" "$CONNS" "$ns" <<'PY'
import asyncio, sys, time
import nats
async def main():
    url, duration, conns, ns = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    nc = await nats.connect(url)
    js = nc.jetstream()
    name = f"{ns.upper()}_REF"
    await js.add_stream(name=name, subjects=[f"{ns}.ref.>"], storage="file")
    end = time.time() + duration
    count = 0
    async def publisher(k):
        nonlocal count
        i = 0
        while time.time() < end:
            i += 1
            await js.publish(f"{ns}.ref.s{(k * 7 + i) % 100}", b"x" * 300, headers={"Nats-Msg-Id": f"{k}-{i}"})
            count += 1
    await asyncio.gather(*(publisher(k) for k in range(conns)))
    print(f"{count / duration:.0f}")
    await js.delete_stream(name)
    await nc.close()
asyncio.run(main())
PY
)
  echo "on NATS JetStream (tessera server --events $NATS):"
  printf '%-34s %10s\n' "appends/s" "$nrate"
  printf '%-34s %10s\n' "append p99" "$np99"
  printf '%-34s %10s\n' "non-2xx answers" "${nnon2xx:-0}"
  printf '%-34s %10s\n' "reference: nats-py publishes/s" "$nref"
  printf '%-34s %9.1fx\n' "ratio" "$(python3 -c "print($nrate/$nref)")"
  echo "fan-out to $SUBS subscribers on fanout-*, $ROUNDS events: $(fanout $((PORT + 1)))"
  "$work/venv/bin/python" - "$NATS" "$ns" <<'PY'
import asyncio, sys
import nats
async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    for s in ("EVENTS", "OFFSETS"):
        try:
            await js.delete_stream(f"{sys.argv[2].upper()}_{s}")
        except Exception:
            pass
    await nc.close()
asyncio.run(main())
PY
else
  echo "NATS: skipped (nothing on 127.0.0.1:4222)"
fi
