#!/usr/bin/env bash
# Unary gRPC calls through `tessera gateway` against the same calls made directly, at the
# same concurrency, by a load client of our own (`tessera grpc-load`, Rust, hyper h2).
# The server is `tessera upstream --grpc`: the SDK's GrpcServer (tonic, prost) answering
# grpc.health.v1.Health/Check. The gateway runs WORKERS workers (default 1, so its
# figures are per core; "auto" is one per core); client, server and gateway share this
# machine's cores. Rounds interleave direct and
# gateway runs; medians printed: calls/s, p99, the gateway's CPU per call, and the ratio
# of gateway to direct calls/s (target: at least 0.5).
#
#   bench/grpc.sh                          # 10 s runs, 3 rounds, 64 in flight on 4 connections
#   DURATION=5 ROUNDS=5 CONC=32 bench/grpc.sh
#   WORKERS=auto bench/grpc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONC=${CONC:-64}
CONNS=${CONNS:-4}
WORKERS=${WORKERS:-1}
UP=19301; GW=19380; ADMIN=19390

cargo build --release --quiet --bin tessera
BIN=$PWD/target/release/tessera
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

$BIN upstream --grpc --bind "127.0.0.1:$UP" --id grpc >/dev/null 2>&1 & pids+=($!)
cat > "$work/gateway.toml" <<TOML
listen = "127.0.0.1:$GW"
admin = "127.0.0.1:$ADMIN"
workers = $( [ "$WORKERS" = auto ] && echo '"auto"' || echo "$WORKERS" )
[[routes]]
path = { prefix = "/grpc.health.v1.Health/" }
upstream = "grpc"
[upstreams.grpc]
endpoints = ["127.0.0.1:$UP"]
protocol = "h2c"
TOML
$BIN gateway --config "$work/gateway.toml" >/dev/null 2>&1 & gw=$!; pids+=($gw)
for port in $UP $GW; do
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
load() { $BIN grpc-load --target "$1" --concurrency "$CONC" --connections "$CONNS" --duration "${DURATION}s"; }
load "127.0.0.1:$GW" >/dev/null  # warm: connections, the gateway's pool
for r in $(seq "$ROUNDS"); do
  load "127.0.0.1:$UP" >> "$work/direct"
  t0=$(ticks $gw)
  out=$(load "127.0.0.1:$GW")
  t1=$(ticks $gw)
  echo "$out $((t1 - t0))" >> "$work/gateway"
  echo "round $r/$ROUNDS done" >&2
done

python3 - "$work" "$(getconf CLK_TCK)" "$CONC" "$CONNS" "$WORKERS" <<'PY'
import json, statistics, sys
work, hz, conc, conns, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
direct = [json.loads(l) for l in open(f"{work}/direct")]
via = []
for line in open(f"{work}/gateway"):
    j, ticks = line.rsplit(" ", 1)
    v = json.loads(j)
    v["cpu_us_per_call"] = int(ticks) / hz * 1e6 / max(v["calls"], 1)
    via.append(v)
med = lambda rows, k: statistics.median(r[k] for r in rows)
errors = sum(r["errors"] for r in direct + via)
print(f"unary gRPC (grpc.health.v1.Health/Check), {conc} in flight on {conns} connections, "
      f"gateway workers {workers}, {len(direct)} rounds, medians")
print(f"{'':10} {'calls/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'gateway CPU µs/call':>20}")
print(f"{'direct':10} {med(direct, 'rps'):>10.0f} {med(direct, 'p50_ms'):>8.2f} {med(direct, 'p99_ms'):>8.2f} {'':>20}")
print(f"{'gateway':10} {med(via, 'rps'):>10.0f} {med(via, 'p50_ms'):>8.2f} {med(via, 'p99_ms'):>8.2f} "
      f"{med(via, 'cpu_us_per_call'):>20.1f}")
ratio = med(via, 'rps') / med(direct, 'rps')
print(f"gateway / direct calls/s: {ratio:.2f}x (target >= 0.5x); failed calls: {errors}")
PY
