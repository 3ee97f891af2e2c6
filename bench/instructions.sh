#!/usr/bin/env bash
# User-space instructions per proxied request, tessera gateway vs nginx, counted by
# valgrind's callgrind: unlike requests/s, the count repeats run after run on a shared,
# noisy machine, so it is the number to drive down between commits.
#
#   bench/instructions.sh
#
# Needs valgrind, wrk, nginx (apt-get installs them if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for c in valgrind wrk nginx; do command -v $c >/dev/null || need+=($c); done
if [ ${#need[@]} -gt 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --quiet --bin tessera
BIN=$PWD/target/release/tessera
UP=(19301 19302 19303); TPORT=18480; NPORT=18481
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for i in 0 1 2; do $BIN upstream --bind "127.0.0.1:${UP[$i]}" --id "u$i" >/dev/null 2>&1 & pids+=($!); done

cat >"$work/gateway.toml" <<CONF
listen = "127.0.0.1:$TPORT"
admin = "127.0.0.1:$((TPORT + 10))"
workers = 1
[[routes]]
upstream = "u"
[upstreams.u]
endpoints = ["127.0.0.1:${UP[0]}", "127.0.0.1:${UP[1]}", "127.0.0.1:${UP[2]}"]
policy = "round_robin"
CONF
cat >"$work/nginx.conf" <<CONF
worker_processes 1;
master_process off;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream u { server 127.0.0.1:${UP[0]}; server 127.0.0.1:${UP[1]}; server 127.0.0.1:${UP[2]}; keepalive 256; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NPORT; location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
CONF

measure() { # name port command... → instructions per request
  local name=$1 port=$2; shift 2
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.$name.%p" "$@" >/dev/null 2>&1 &
  local vpid=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.2; done
  wrk -t1 -c8 -d3s "http://127.0.0.1:$port/" >/dev/null        # warm-up
  callgrind_control -z "$vpid" >/dev/null 2>&1
  local out n ir
  out=$(wrk -t1 -c8 -d8s "http://127.0.0.1:$port/")
  callgrind_control -d "$vpid" >/dev/null 2>&1
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  kill "$vpid"; wait "$vpid" 2>/dev/null || true
  ir=$(awk '/^totals:/ {print $2}' "$(ls "$work"/cg.$name.*.1 | head -1)")
  echo "$name: $((ir / n)) instructions per request ($n requests)"
}
measure tessera $TPORT "$BIN" gateway --config "$work/gateway.toml"
measure nginx $NPORT nginx -c "$work/nginx.conf" -p "$work"
# The same gateway with OTLP export on and sampling 0 (wrk sends no traceparent, so each
# request is a root the sampler declines): what an unrecorded request pays for tracing.
$BIN upstream --bind 127.0.0.1:19310 --id sink >/dev/null 2>&1 & pids+=($!)
OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:19310 OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0 \
  measure tessera-traced-sampling-0 $TPORT "$BIN" gateway --config "$work/gateway.toml"
