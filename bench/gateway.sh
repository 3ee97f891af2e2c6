#!/usr/bin/env bash
# tessera gateway vs nginx vs HAProxy in front of the same three upstreams, same wrk load,
# runs interleaved (T N H T N H ...), medians printed; then a failover run per proxy
# (SIGKILL one upstream at 3 s, restart it at 6 s of a 10 s run) counting client errors.
#
#   bench/gateway.sh                        # 10 s runs, 5 rounds, wrk -t1 -c64
#   DURATION=5 ROUNDS=3 CONNS=64 bench/gateway.sh
#   ONLY=tracing bench/gateway.sh           # only what tracing costs (see below)
#
# Needs wrk, nginx, haproxy (Debian packages; installed with apt-get if missing).
# The gateway batches its writes through io_uring where the kernel allows it;
# TESSERA_IO_URING=off bench/gateway.sh measures the one-send-per-write path.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-5}
CONNS=${CONNS:-64}
UP=(19101 19102 19103)
TPORT=18080; NPORT=18081; HPORT=18082; TADMIN=18090; NPORT2=18083; HPORT2=18084

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx)
command -v haproxy >/dev/null || need+=(haproxy)
command -v h2load >/dev/null || need+=(nghttp2-client)
if [ ${#need[@]} -gt 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --quiet --bin tessera
BIN=target/release/tessera

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$work"/up*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_upstream() { # index; the pid goes to $work/up$1.pid (subshells can restart one)
  $BIN upstream --bind "127.0.0.1:${UP[$1]}" --id "u$1" >/dev/null 2>&1 &
  echo $! >"$work/up$1.pid"
}
uppid() { cat "$work/up$1.pid"; }
for i in 0 1 2; do start_upstream "$i"; done

cat >"$work/gateway.toml" <<CONF
listen = "127.0.0.1:$TPORT"
admin = "127.0.0.1:$TADMIN"
workers = 1
[[routes]]
upstream = "u"
[upstreams.u]
endpoints = ["127.0.0.1:${UP[0]}", "127.0.0.1:${UP[1]}", "127.0.0.1:${UP[2]}"]
policy = "round_robin"
CONF
$BIN gateway --config "$work/gateway.toml" >/dev/null 2>&1 &
tpid=$!; pids+=("$tpid")

cat >"$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream u {
    server 127.0.0.1:${UP[0]}; server 127.0.0.1:${UP[1]}; server 127.0.0.1:${UP[2]};
    # Sized like tessera's pool (idle connections per endpoint, no request cap): with
    # keepalive 64 shared by three servers nginx reopened an upstream connection every
    # ~40 requests, a cost that is the config's, not nginx's.
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NPORT;
    location / {
      proxy_pass http://u;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  server {
    listen 127.0.0.1:$NPORT2 http2;
    location / {
      proxy_pass http://u;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
nginx -c "$work/nginx.conf" -p "$work" -g "daemon off;" >/dev/null 2>&1 &
npid=$!; pids+=("$npid")

cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend f
  bind 127.0.0.1:$HPORT
  default_backend b
frontend f2
  bind 127.0.0.1:$HPORT2 proto h2
  default_backend b
backend b
  balance roundrobin
  retry-on conn-failure empty-response response-timeout
  option redispatch
  server u0 127.0.0.1:${UP[0]}
  server u1 127.0.0.1:${UP[1]}
  server u2 127.0.0.1:${UP[2]}
CONF
haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>&1 &
hpid=$!; pids+=("$hpid")

for port in "${UP[@]}" $TPORT $NPORT $HPORT; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
done

# nginx forks its worker: measure the worker's CPU (the only process doing the work).
nworker=$(pgrep -P "$npid" | head -1 || echo "$npid")

# CPU of a pid, or of several (comma-separated: nginx's workers), in ticks.
stats() { for p in ${1//,/ }; do cat "/proc/$p/stat"; done; }
cpu_ticks() { stats "$1" | awk '{t += $14 + $15} END {print t}'; }
user_sys() { stats "$1" | awk '{u += $14; s += $15} END {print u, s}'; }
hz=$(getconf CLK_TCK)

# → "rps p50_ms p99_ms req_per_cpu_s user_us_per_req sys_us_per_req": the user/system
# split shows how much of a proxy's CPU is its own code and how much the kernel's
# TCP work, which no proxy on the same sockets can avoid.
run() { # name pid port
  local name=$1 pid=$2 port=$3 before after out rps p50 p99 cpu us0 us1
  before=$(cpu_ticks "$pid")
  us0=$(user_sys "$pid")
  out=$(wrk -t"${WRK_THREADS:-1}" -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/")
  after=$(cpu_ticks "$pid")
  us1=$(user_sys "$pid")
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "$name: errors during the run" >&2; echo "$out" >&2; fi
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  cpu=$(python3 -c "print(($after-$before)/$hz)")
  python3 - "$rps" "$p50" "$p99" "$cpu" "$DURATION" "$us0" "$us1" "$hz" <<'PY'
import sys
def ms(s):
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if s.endswith(unit): return float(s[:-len(unit)]) * f
    return float(s)
rps, p50, p99, cpu, dur = float(sys.argv[1]), ms(sys.argv[2]), ms(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
(u0, s0), (u1, s1), hz = map(int, sys.argv[6].split()), map(int, sys.argv[7].split()), int(sys.argv[8])
n = rps * dur
user, system = ((u1 - u0) / hz * 1e6 / n, (s1 - s0) / hz * 1e6 / n) if n else (0, 0)
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {rps*dur/cpu if cpu > 0 else 0:.0f} {user:.2f} {system:.2f}")
PY
}

table() { # tessera nginx haproxy direct → the comparison table
python3 - "$@" <<'PY'
import statistics, sys
names = ["tessera", "nginx", "haproxy"]
rows = {}
for name, raw in zip(names, sys.argv[1:4]):
    runs = [list(map(float, r.split())) for r in raw.strip(";").split(";")]
    rows[name] = [statistics.median(col) for col in zip(*runs)]
d = list(map(float, sys.argv[4].split()))
print(f"{'proxy':10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'req/CPU-s':>10} {'user us':>8} {'sys us':>7}   vs nginx (req/s, req/CPU-s)")
for name in names:
    r = rows[name]
    n = rows["nginx"]
    print(f"{name:10} {r[0]:10.0f} {r[1]:8.3f} {r[2]:8.3f} {r[3]:10.0f} {r[4]:8.2f} {r[5]:7.2f}   {r[0]/n[0]:.2f}x {r[3]/n[3]:.2f}x")
print("(user us, sys us: the proxy's CPU per request in its own code and in the kernel)")
print(f"{'direct':10} {d[0]:10.0f} {d[1]:8.3f} {d[2]:8.3f}   (one upstream, no proxy)")
PY
}

# What tracing costs: the same one-worker gateway with OTLP export on, sampling 0
# (OTEL_TRACES_SAMPLER=traceidratio, ARG=0: wrk sends no traceparent, so every request
# is a root the sampler declines) and sampling 100% (always_on: a server span and a
# client span per request, exported to a sink), against tracing off. The sink is a
# `tessera upstream` answering every POST 200: it takes what the exporter sends.
tracing_table() {
  local SINK=19110 variants=(off ratio0 all) ports=($TPORT 18092 18094) admins=($TADMIN 18093 18095) tpids=("$tpid")
  $BIN upstream --bind "127.0.0.1:$SINK" --id sink >/dev/null 2>&1 &
  pids+=("$!")
  for i in 1 2; do
    sed -e "s/:$TPORT\"/:${ports[$i]}\"/" -e "s/:$TADMIN\"/:${admins[$i]}\"/" "$work/gateway.toml" >"$work/gateway-trace$i.toml"
    if [ "$i" = 1 ]; then sampler=(OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0); else sampler=(OTEL_TRACES_SAMPLER=always_on); fi
    env OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK" OTEL_SERVICE_NAME=bench "${sampler[@]}" \
      $BIN gateway --config "$work/gateway-trace$i.toml" >/dev/null 2>&1 &
    tpids+=("$!"); pids+=("$!")
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
  done
  declare -A tr
  for r in $(seq "$ROUNDS"); do
    for i in 0 1 2; do tr[${variants[$i]}]+="$(run "${variants[$i]}" "${tpids[$i]}" "${ports[$i]}");"; done
  done
  local exported dropped
  exported=$(curl -sf "http://127.0.0.1:${admins[2]}/metrics" | awk '$1=="tessera_trace_spans_exported_total" {print $2}')
  dropped=$(curl -sf "http://127.0.0.1:${admins[2]}/metrics" | awk '$1=="tessera_trace_spans_dropped_total" {print $2}')
  echo "tracing: wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS interleaved rounds, medians; tessera workers = 1"
  python3 - "${tr[off]}" "${tr[ratio0]}" "${tr[all]}" "$exported" "$dropped" <<'PY'
import statistics, sys
names = ["off", "sampling 0", "sampling 100%"]
rows = {}
for name, raw in zip(names, sys.argv[1:4]):
    runs = [list(map(float, r.split())) for r in raw.strip(";").split(";")]
    rows[name] = [statistics.median(col) for col in zip(*runs)]
print(f"{'tracing':14} {'req/s':>10} {'p99 ms':>8} {'req/CPU-s':>10} {'user us':>8}   vs off (req/s, req/CPU-s)")
off = rows["off"]
for name in names:
    r = rows[name]
    print(f"{name:14} {r[0]:10.0f} {r[2]:8.3f} {r[3]:10.0f} {r[4]:8.2f}   {r[0]/off[0]:.3f}x {r[3]/off[3]:.3f}x")
print(f"(sampling 100%: {sys.argv[4]} spans exported, {sys.argv[5]} dropped over every round)")
PY
}
if [ "${ONLY:-}" = tracing ]; then
  tracing_table
  exit 0
fi

declare -A results
direct=$(run direct "$(uppid 0)" "${UP[0]}")
for r in $(seq "$ROUNDS"); do
  results[tessera]+="$(run tessera "$tpid" $TPORT);"
  results[nginx]+="$(run nginx "$nworker" $NPORT);"
  results[haproxy]+="$(run haproxy "$hpid" $HPORT);"
done

echo "wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS interleaved rounds, medians; 3 upstreams; $(nproc) cores"
echo "nginx $(nginx -v 2>&1 | sed 's/.*\///') (1 worker), haproxy $(haproxy -v | head -1 | awk '{print $3}') (1 thread), tessera $($BIN --version | awk '{print $2}')"
table "${results[tessera]}" "${results[nginx]}" "${results[haproxy]}" "$direct"

# The same, with every proxy on its multi-core defaults: nginx worker_processes auto,
# HAProxy nbthread = cores, tessera workers = "auto"; wrk -t2 (one wrk thread would
# be the bottleneck). CPU counts every nginx worker and every tessera/HAProxy thread.
TPORT3=18085; NPORT3=18086; HPORT3=18087; TADMIN3=18091
sed -e "s/:$TPORT\"/:$TPORT3\"/" -e "s/:$TADMIN\"/:$TADMIN3\"/" -e 's/^workers = 1$/workers = "auto"/' \
  "$work/gateway.toml" >"$work/gateway-cores.toml"
$BIN gateway --config "$work/gateway-cores.toml" >/dev/null 2>&1 &
tpid3=$!; pids+=("$tpid3")
sed -e 's/^worker_processes 1;/worker_processes auto;/' -e "s/:$NPORT;/:$NPORT3;/" -e "s/:$NPORT2 http2;/:18088 http2;/" \
  -e "s|$work/nginx.pid|$work/nginx3.pid|" "$work/nginx.conf" >"$work/nginx-cores.conf"
nginx -c "$work/nginx-cores.conf" -p "$work" -g "daemon off;" >/dev/null 2>&1 &
npid3=$!; pids+=("$npid3")
sed -e "s/nbthread 1/nbthread $(nproc)/" -e "s/:$HPORT\$/:$HPORT3/" -e "/^frontend f2/,/default_backend b/d" \
  "$work/haproxy.cfg" >"$work/haproxy-cores.cfg"
haproxy -f "$work/haproxy-cores.cfg" -db >/dev/null 2>&1 &
hpid3=$!; pids+=("$hpid3")
for port in $TPORT3 $NPORT3 $HPORT3; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
done
nworkers3=$(pgrep -P "$npid3" | paste -sd, || echo "$npid3")
declare -A cores
for r in $(seq "$ROUNDS"); do
  cores[tessera]+="$(WRK_THREADS=2 run tessera "$tpid3" $TPORT3);"
  cores[nginx]+="$(WRK_THREADS=2 run nginx "$nworkers3" $NPORT3);"
  cores[haproxy]+="$(WRK_THREADS=2 run haproxy "$hpid3" $HPORT3);"
done
echo
echo "multi-core defaults: wrk -t2 -c$CONNS -d${DURATION}s, $ROUNDS interleaved rounds, medians; nginx $(pgrep -P "$npid3" | wc -l) workers, haproxy nbthread $(nproc), tessera workers = \"auto\" ($(nproc))"
table "${cores[tessera]}" "${cores[nginx]}" "${cores[haproxy]}" "$direct"
echo

h2run() { # pid port → "rps req_per_cpu_s" with h2load (h2c prior knowledge)
  local pid=$1 port=$2 before after out rps cpu
  before=$(cpu_ticks "$pid")
  out=$(h2load -c 16 -m 10 -D "$DURATION" "http://127.0.0.1:$port/" 2>&1)
  after=$(cpu_ticks "$pid")
  rps=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' <<<"$out")
  cpu=$(python3 -c "print(($after-$before)/$hz)")
  python3 -c "r=float('$rps'); c=$cpu; print(f'{r:.0f} {r*$DURATION/c if c else 0:.0f}')"
}
declare -A h2
for r in $(seq "$ROUNDS"); do
  h2[tessera]+="$(h2run "$tpid" $TPORT);"
  h2[nginx]+="$(h2run "$nworker" $NPORT2);"
  h2[haproxy]+="$(h2run "$hpid" $HPORT2);"
done
echo "HTTP/2 (h2c, h2load -c16 -m10 -D${DURATION}), medians; upstreams stay HTTP/1.1:"
python3 - "${h2[tessera]}" "${h2[nginx]}" "${h2[haproxy]}" <<'PY'
import statistics, sys
names = ["tessera", "nginx", "haproxy"]
rows = {}
for name, raw in zip(names, sys.argv[1:4]):
    runs = [list(map(float, r.split())) for r in raw.strip(";").split(";")]
    rows[name] = [statistics.median(col) for col in zip(*runs)]
print(f"{'proxy':10} {'req/s':>10} {'req/CPU-s':>10}   vs nginx")
for name in names:
    r, n = rows[name], rows["nginx"]
    print(f"{name:10} {r[0]:10.0f} {r[1]:10.0f}   {r[0]/n[0]:.2f}x {r[1]/n[1]:.2f}x")
PY

failover() { # name port → errors seen by the client
  local port=$1 out
  (sleep 3; kill -9 "$(uppid 1)"; sleep 3; start_upstream 1) 2>/dev/null &
  local ctl=$!
  out=$(wrk -t1 -c"$CONNS" -d10s "http://127.0.0.1:$port/")
  wait "$ctl" || true
  sleep 0.5
  python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
sock = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
total = int(m.group(1)) if (m := re.search(r"(\d+) requests in", out)) else 0
print(f"{non2xx + sock} errors of {total} requests (non-2xx {non2xx}, socket {sock})")
PY
}
echo "failover (SIGKILL upstream u1 at 3 s, restart at 6 s, 10 s of GETs):"
echo "  tessera: $(failover $TPORT)"
echo "  nginx:   $(failover $NPORT)"
echo "  haproxy: $(failover $HPORT)"

echo
tracing_table
