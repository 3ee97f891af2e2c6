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

rate() { # wrk args... → requests/s; fails loudly on non-2xx answers
  local out
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" "$@")
  if grep -q "Non-2xx" <<<"$out"; then echo "non-2xx answers in: $*" >&2; echo "$out" >&2; exit 1; fi
  awk '/Requests\/sec/ {print $2}' <<<"$out"
}
ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }
row() { printf '%-34s %12s %12s %8s\n' "$1" "$2" "$3" "$4"; }

# Ten passing instances of "web" in each store for the read scenario.
for i in $(seq 1 10); do
  curl -sf -X PUT "http://127.0.0.1:$TPORT/v1/agent/service/register" \
    -d "{\"Name\":\"web\",\"ID\":\"web$i\",\"Address\":\"10.0.0.$i\",\"Port\":8080,\"Tags\":[\"v1\"],\"Check\":{\"TTL\":\"1h\",\"Status\":\"passing\"}}" >/dev/null
  key=$(printf 'services/web/web%s' "$i" | base64 -w0)
  val=$(printf '{"Name":"web","ID":"web%s","Address":"10.0.0.%s","Port":8080,"Tags":["v1"],"Status":"passing"}' "$i" "$i" | base64 -w0)
  curl -sf -X POST "http://127.0.0.1:$EPORT/v3/kv/put" -d "{\"key\":\"$key\",\"value\":\"$val\"}" >/dev/null
done

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
