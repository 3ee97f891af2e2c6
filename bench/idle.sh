#!/usr/bin/env bash
# What idle keep-alive client connections cost in memory: tessera gateway (one worker
# and `workers = "auto"`) and nginx (one worker) in front of the same upstream; each
# gets CONNS connections that send one request and then stay open, idle. Prints the
# proxy's RSS growth (nginx: its worker's) per connection.
#
#   bench/idle.sh                 # 10,000 connections
#   CONNS=5000 bench/idle.sh
#   MIMALLOC_PURGE_DELAY=0 bench/idle.sh   # tessera's allocator returns freed pages at
#                                          # once: RSS then shows what is live
#
# Needs nginx (apt-get installs it if missing) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-10000}
UP=19601; T1=19610; TA=19620; N1=19612
command -v nginx >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
cargo build --release --quiet --bin tessera
BIN=$PWD/target/release/tessera
# Each process holds one end of every connection (plus a few): CONNS + 1024 descriptors.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((CONNS + 1024)) ] || { echo "need $((CONNS + 1024)) open files, the limit is $(ulimit -n)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
$BIN upstream --bind "127.0.0.1:$UP" --id u >/dev/null 2>&1 & pids+=($!)

gateway() { # port admin workers → pid
  cat >"$work/g$1.toml" <<CONF
listen = "127.0.0.1:$1"
admin = "127.0.0.1:$2"
workers = $3
max_connections_per_ip = 0
header_read_timeout = "10m"
[[routes]]
upstream = "u"
[upstreams.u]
endpoints = ["127.0.0.1:$UP"]
CONF
  $BIN gateway --config "$work/g$1.toml" >/dev/null 2>&1 &
  echo $!
}
cat >"$work/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile $((CONNS + 1024));
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections $((CONNS + 1024)); }
http {
  access_log off;
  keepalive_timeout 10m;
  keepalive_requests 1000000;
  upstream u { server 127.0.0.1:$UP; keepalive 64; }
  server { listen 127.0.0.1:$N1 backlog=4096; location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
CONF

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# Opens CONNS connections, sends one request on each, reads its answer, then holds
# them idle until stdin closes.
hold() { # port
  python3 - "$1" "$CONNS" <<'PY'
import asyncio, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
async def one(conns):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
    await r.readexactly(length)
    conns.append(w)
async def main():
    conns = []
    sem = asyncio.Semaphore(500)
    async def limited():
        async with sem:
            await one(conns)
    await asyncio.gather(*(limited() for _ in range(n)))
    print(len(conns), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
PY
}

measure() { # name pid port
  local name=$1 pid=$2 port=$3 before after fifo held
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
  before=$(rss_kib "$pid")
  fifo=$work/hold.$port; mkfifo "$fifo"
  hold "$port" <"$fifo" >"$work/held.$port" &
  local hpid=$!
  exec 9>"$fifo"
  for _ in $(seq 600); do [ -s "$work/held.$port" ] && break; sleep 0.1; done
  held=$(cat "$work/held.$port")
  # Idle a while: tessera gives a connection's buffers back after a second idle, and its
  # allocator purges freed pages a second after that (checked once a second).
  sleep 4
  after=$(rss_kib "$pid")
  exec 9>&-
  wait "$hpid" || true
  python3 -c "
b, a, n = $before, $after, int('${held:-0}' or 0)
print(f'$name: {n} idle connections, RSS {b/1024:.1f} -> {a/1024:.1f} MiB: +{(a-b)/1024:.1f} MiB, {(a-b)/max(n,1):.2f} KiB each')"
}

tpid=$(gateway $T1 $TA 1); pids+=("$tpid")
measure "tessera (1 worker)" "$tpid" $T1
kill "$tpid"
tpid=$(gateway $((T1 + 1)) $((TA + 1)) '"auto"'); pids+=("$tpid")
measure "tessera (workers = auto, $(nproc))" "$tpid" $((T1 + 1))
kill "$tpid"
nginx -c "$work/nginx.conf" -p "$work" -g "daemon off;" >/dev/null 2>&1 &
npid=$!; pids+=("$npid")
sleep 0.5
nworker=$(pgrep -P "$npid" | head -1 || echo "$npid")
measure "nginx (1 worker)" "$nworker" $N1
