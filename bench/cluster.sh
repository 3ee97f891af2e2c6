#!/usr/bin/env bash
# Three tessera servers on one 3-member etcd cluster, against that same etcd driven
# directly with the same wrk load, in one run. Prints each rate and the ratio.
#
#   bench/cluster.sh                 # 10 s per scenario, 64 connections
#   DURATION=5 CONNS=64 bench/cluster.sh
#
# Scenarios (issue 17's targets in brackets):
#   - KV put: tessera's PUT /v1/kv (one etcd transaction per write, compared on the key's
#     revision, plus the marker key) vs a plain etcd put  [>= 0.8x];
#   - read 10 healthy instances: GET /v1/health/service/web?passing served from the
#     server's memory vs an etcd range over 10 keys      [>= 5x];
#   - cross-server wake-up: a write through server 1 waking a blocking query on server 2
#     (p50/p99 over 200 writes)                           [p99 < 100 ms].
#
# Needs: etcd + etcdctl (Debian etcd-server, etcd-client), wrk, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --quiet --bin tessera
ulimit -n 65536 2>/dev/null || true

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

CL=(24379 24479 24579); PE=(24380 24480 24580); TP=(18600 18601 18602)
initial="e0=http://127.0.0.1:${PE[0]},e1=http://127.0.0.1:${PE[1]},e2=http://127.0.0.1:${PE[2]}"
for i in 0 1 2; do
  etcd --name "e$i" --data-dir "$work/e$i" --log-level error \
    --listen-client-urls "http://127.0.0.1:${CL[$i]}" --advertise-client-urls "http://127.0.0.1:${CL[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${PE[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${PE[$i]}" \
    --initial-cluster "$initial" --initial-cluster-state new >"$work/e$i.log" 2>&1 &
  pids+=($!)
done
endpoints="127.0.0.1:${CL[0]},127.0.0.1:${CL[1]},127.0.0.1:${CL[2]}"
for _ in $(seq 300); do ETCDCTL_API=3 etcdctl --endpoints="$endpoints" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
for i in 0 1 2; do
  target/release/tessera server --bind "127.0.0.1:${TP[$i]}" --data-dir "$work/t$i" --node "t$i" \
    --store "etcd://$endpoints" >"$work/t$i.log" 2>&1 &
  pids+=($!)
done
for i in 0 1 2; do
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:${TP[$i]}/v1/status/leader" >/dev/null && break; sleep 0.1; done
done
E="http://127.0.0.1:${CL[0]}"; T="http://127.0.0.1:${TP[0]}"

# shellcheck source=bench/etcd_compare.sh
source bench/etcd_compare.sh
seed_web "$T" "$E"

echo "3 tessera servers on 3 $(etcd --version | head -1) members vs that etcd directly; wrk -t$THREADS -c$CONNS -d${DURATION}s; $(nproc) cores"
row "scenario" "tessera/s" "etcd/s" "ratio"
t=$(rate -s bench/lua/tessera_kv_put.lua "$T")
e=$(rate -s bench/lua/etcd_kv_put.lua "$E")
row "KV put" "$t" "$e" "$(ratio "$t" "$e")"
t=$(rate "http://127.0.0.1:${TP[1]}/v1/health/service/web?passing")
e=$(rate -s bench/lua/etcd_range.lua "$E")
row "read 10 healthy instances" "$t" "$e" "$(ratio "$t" "$e")"

python3 - "$T" "http://127.0.0.1:${TP[1]}" <<'PY'
import json, sys, threading, time, urllib.request
writer, reader = sys.argv[1], sys.argv[2]
def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return int(r.headers["X-Consul-Index"])
def put(url, body):
    req = urllib.request.Request(url, data=body, method="PUT")
    urllib.request.urlopen(req, timeout=30).read()
lat = []
put(f"{writer}/v1/kv/wake", b"0")
for n in range(200):
    index = get(f"{reader}/v1/kv/wake?consistent")
    woke = {}
    def wait():
        get(f"{reader}/v1/kv/wake?index={index}&wait=30s")
        woke["t"] = time.monotonic()
    t = threading.Thread(target=wait); t.start()
    time.sleep(0.005)  # let the query park before the write
    start = time.monotonic()
    put(f"{writer}/v1/kv/wake", str(n + 1).encode())
    t.join()
    lat.append((woke["t"] - start) * 1000)
lat.sort()
print(f"cross-server wake-up (write on 1, waiter on 2): p50 {lat[len(lat)//2]:.1f} ms, p99 {lat[int(len(lat)*0.99)-1]:.1f} ms over {len(lat)} writes")
PY
