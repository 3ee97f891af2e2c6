#!/usr/bin/env bash
# tessera server vs etcd, side by side in one run, same load client (wrk), same
# concurrency, both fsyncing every acknowledged write. Prints each rate and the ratio.
#
#   bench/registry.sh            # 10 s per scenario, 64 connections
#   DURATION=5 CONNS=64 bench/registry.sh
#
# Needs: etcd (Debian etcd-server), wrk, python3. Installs them with apt-get if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
WATCHERS=${WATCHERS:-10000}
TPORT=18500
EPORT=23790

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --quiet --bin tessera
ulimit -n 65536 2>/dev/null || true

work=$(mktemp -d)
cleanup() { kill "${tpid:-}" "${epid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$EPORT" \
     --advertise-client-urls "http://127.0.0.1:$EPORT" --listen-peer-urls http://127.0.0.1:23800 \
     --log-level error >"$work/etcd.log" 2>&1 &
epid=$!
target/release/tessera server --bind "127.0.0.1:$TPORT" --data-dir "$work/tessera" --node bench \
     >"$work/tessera.log" 2>&1 &
tpid=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$TPORT/v1/status/leader" >/dev/null && \
  curl -sf -X POST "http://127.0.0.1:$EPORT/v3/kv/range" -d '{"key":"eA=="}' >/dev/null && break
  sleep 0.1
done

# shellcheck source=bench/etcd_compare.sh
source bench/etcd_compare.sh
seed_web "http://127.0.0.1:$TPORT" "http://127.0.0.1:$EPORT"

echo "tessera $(target/release/tessera --version | awk '{print $2}') vs $(etcd --version | head -1); wrk -t$THREADS -c$CONNS -d${DURATION}s; $(nproc) cores"
row "scenario" "tessera/s" "etcd/s" "ratio"
t=$(rate -s bench/lua/tessera_kv_put.lua "http://127.0.0.1:$TPORT")
e=$(rate -s bench/lua/etcd_kv_put.lua "http://127.0.0.1:$EPORT")
row "KV put (fsynced)" "$t" "$e" "$(ratio "$t" "$e")"
t=$(rate -s bench/lua/tessera_register.lua "http://127.0.0.1:$TPORT")
e=$(rate -s bench/lua/etcd_register.lua "http://127.0.0.1:$EPORT")
row "register instance (fsynced)" "$t" "$e" "$(ratio "$t" "$e")"
t=$(rate "http://127.0.0.1:$TPORT/v1/health/service/web?passing")
e=$(rate -s bench/lua/etcd_range.lua "http://127.0.0.1:$EPORT")
row "read 10 healthy instances" "$t" "$e" "$(ratio "$t" "$e")"

rss=$(awk '/VmRSS/ {print $2}' "/proc/$tpid/status")
instances=$(curl -sf "http://127.0.0.1:$TPORT/v1/catalog/service/bench-reg" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
echo "tessera RSS after the run: ${rss} KiB with ${instances} registered instances and their TTL checks"
echo "watchers: $(python3 bench/watchers.py "127.0.0.1:$TPORT" "$tpid" "$WATCHERS")"
