#!/usr/bin/env bash
# What the edge-security features cost: tessera gateway and nginx in front of the same
# three upstreams, plain HTTP and then each feature on, same wrk load, runs interleaved,
# medians printed as req/s, p99 and requests per proxy CPU-second, each as a ratio to
# the same proxy's plain run and to nginx doing the same thing where nginx can:
#
#   plain        HTTP/1.1 keep-alive, round robin
#   tls          HTTPS termination (ECDSA P-256 certificate, TLS 1.3, keep-alive)
#   jwt          RS256 token verified on every request (nginx OSS has no JWT check)
#   ratelimit    per-client-IP GCRA, limit high enough that all pass (nginx: limit_req)
#   shared       the same limit kept in Redis at 127.0.0.1:6379 (tessera only)
#
# Then TLS scaling: tessera with `workers = 2` next to tessera with 1, and nginx with
# `worker_processes 2` next to nginx with 1, each loaded by wrk -t1 and by wrk -t2. wrk
# and the upstreams share the same cores, so the script also prints how busy the whole
# machine was: when one worker already leaves no core idle, a second can only share it.
#
#   bench/edge.sh                      # 10 s runs, 3 rounds, wrk -t1 -c64
#   DURATION=5 ROUNDS=3 bench/edge.sh
#
# Needs wrk, nginx, openssl, redis-server (Debian packages; installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
UP=(19201 19202 19203)
TPORT=18180; TTLS=18181; TADMIN=18190; NPORT=18182; NTLS=18183; NTLS2=18186
REDIS=${REDIS:-127.0.0.1:6379}

need=()
for c in wrk nginx openssl redis-server; do command -v $c >/dev/null || need+=($c); done
if [ ${#need[@]} -gt 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --quiet --bin tessera
BIN=$PWD/target/release/tessera

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
if ! redis-cli -u "redis://$REDIS" ping >/dev/null 2>&1; then
  redis-server --port "${REDIS##*:}" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do redis-cli -u "redis://$REDIS" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
for i in 0 1 2; do $BIN upstream --bind "127.0.0.1:${UP[$i]}" --id "u$i" >/dev/null 2>&1 & pids+=($!); done

# A certificate for 127.0.0.1 (what wrk's requests name) and an RS256 key with a token.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=127.0.0.1 -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
  -keyout "$work/tls.key" -out "$work/tls.pem" 2>/dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/jwt.key" 2>/dev/null
openssl pkey -in "$work/jwt.key" -pubout -out "$work/jwt.pem"
TOKEN=$(python3 - "$work/jwt.key" <<'PY'
import base64, json, subprocess, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "bench", "iss": "bench", "aud": "edge", "exp": int(time.time()) + 86400}).encode())
sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", sys.argv[1]],
                     input=f"{head}.{body}".encode(), capture_output=True, check=True).stdout
print(f"{head}.{body}.{b64(sig)}")
PY
)

cat >"$work/gateway.toml" <<CONF
listen = "127.0.0.1:$TPORT"
admin = "127.0.0.1:$TADMIN"
workers = 1
[tls]
listen = "127.0.0.1:$TTLS"
certificates = [{ cert = "$work/tls.pem", key = "$work/tls.key" }]
[redis]
address = "$REDIS"
[jwt.bench]
public_key_file = "$work/jwt.pem"
algorithms = ["RS256"]
issuer = "bench"
audience = "edge"
[[routes]]
path = { prefix = "/jwt" }
upstream = "u"
auth = { jwt = "bench" }
[[routes]]
path = { prefix = "/ratelimit" }
upstream = "u"
rate_limit = { rate = 1000000.0, burst = 1000000 }
[[routes]]
path = { prefix = "/shared" }
upstream = "u"
rate_limit = { rate = 1000000.0, burst = 1000000, shared = true }
[[routes]]
upstream = "u"
[upstreams.u]
endpoints = ["127.0.0.1:${UP[0]}", "127.0.0.1:${UP[1]}", "127.0.0.1:${UP[2]}"]
policy = "round_robin"
CONF
$BIN gateway --config "$work/gateway.toml" >/dev/null 2>&1 &
tpid=$!; pids+=("$tpid")
TPORT2=18184; TTLS2=18185; TADMIN2=18191
sed -e "s/:$TPORT\"/:$TPORT2\"/" -e "s/:$TTLS\"/:$TTLS2\"/" -e "s/:$TADMIN\"/:$TADMIN2\"/" \
  -e 's/^workers = 1$/workers = 2/' "$work/gateway.toml" >"$work/gateway2.toml"
$BIN gateway --config "$work/gateway2.toml" >/dev/null 2>&1 &
tpid2=$!; pids+=("$tpid2")

cat >"$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  limit_req_zone \$binary_remote_addr zone=perip:10m rate=1000000r/s;
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
    listen 127.0.0.1:$NTLS ssl;
    ssl_certificate $work/tls.pem;
    ssl_certificate_key $work/tls.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    location / { proxy_pass http://u; }
    location /ratelimit { limit_req zone=perip burst=1000000 nodelay; proxy_pass http://u; }
  }
}
CONF
nginx -c "$work/nginx.conf" -p "$work" -g "daemon off;" >/dev/null 2>&1 &
npid=$!; pids+=("$npid")
# nginx on two workers, TLS only, for the scaling runs.
mkdir "$work/n2"
sed -e 's/^worker_processes 1;$/worker_processes 2;/' -e "s|$work/nginx|$work/n2/nginx|g" \
  -e "/listen 127.0.0.1:$NPORT;/d" -e "s/:$NTLS ssl/:$NTLS2 ssl/" "$work/nginx.conf" >"$work/n2/nginx.conf"
nginx -c "$work/n2/nginx.conf" -p "$work/n2" -g "daemon off;" >/dev/null 2>&1 &
npid2=$!; pids+=("$npid2")

for url in "http://127.0.0.1:$TPORT/" "https://127.0.0.1:$TTLS/" "https://127.0.0.1:$TTLS2/" "http://127.0.0.1:$NPORT/" "https://127.0.0.1:$NTLS/" "https://127.0.0.1:$NTLS2/"; do
  for _ in $(seq 100); do curl -skf "$url" >/dev/null && break; sleep 0.1; done
done
curl -sf -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$TPORT/jwt" >/dev/null || { echo "the JWT route refused the bench token" >&2; exit 1; }
curl -sf "http://127.0.0.1:$TPORT/shared" >/dev/null || { echo "the shared-limit route failed" >&2; exit 1; }
nworker=$(pgrep -P "$npid" | head -1 || echo "$npid")
nworkers2=$(pgrep -P "$npid2" | paste -sd, -)

cpu_ticks() { # pid[,pid...] → user+system ticks of them all
  local t=0 p
  for p in ${1//,/ }; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat") )); done
  echo "$t"
}
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $6 + $7 + $8}' /proc/stat; }
hz=$(getconf CLK_TCK)
run() { # pid[,pid...] url [header] → "rps p99_ms req_per_cpu_s machine_cores"; WRK_THREADS
  local pid=$1 url=$2 before after mbefore mafter out
  local wrk_args=(-t"${WRK_THREADS:-1}" -c"$CONNS" -d"${DURATION}s" --latency)
  if [ $# -gt 2 ]; then wrk_args+=(-H "$3"); fi
  before=$(cpu_ticks "$pid"); mbefore=$(machine_ticks)
  out=$(wrk "${wrk_args[@]}" "$url")
  after=$(cpu_ticks "$pid"); mafter=$(machine_ticks)
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "errors during the run on $url" >&2; echo "$out" >&2; fi
  python3 - "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")" \
    "$(( after - before ))" "$hz" "$DURATION" "$(( mafter - mbefore ))" <<'PY'
import sys
def ms(s):
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if s.endswith(unit): return float(s[:-len(unit)]) * f
    return float(s)
rps, p99, ticks, hz, dur = float(sys.argv[1]), ms(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
cpu, machine = ticks / hz, int(sys.argv[6]) / hz
print(f"{rps:.0f} {p99:.3f} {rps*dur/cpu if cpu > 0 else 0:.0f} {machine/dur:.2f}")
PY
}

declare -A res
for r in $(seq "$ROUNDS"); do
  res[t_plain]+="$(run "$tpid" "http://127.0.0.1:$TPORT/");"
  res[n_plain]+="$(run "$nworker" "http://127.0.0.1:$NPORT/");"
  res[t_tls]+="$(run "$tpid" "https://127.0.0.1:$TTLS/");"
  res[n_tls]+="$(run "$nworker" "https://127.0.0.1:$NTLS/");"
  res[t_jwt]+="$(run "$tpid" "http://127.0.0.1:$TPORT/jwt" "Authorization: Bearer $TOKEN");"
  res[t_ratelimit]+="$(run "$tpid" "http://127.0.0.1:$TPORT/ratelimit");"
  res[n_ratelimit]+="$(run "$nworker" "http://127.0.0.1:$NPORT/ratelimit");"
  res[t_shared]+="$(run "$tpid" "http://127.0.0.1:$TPORT/shared");"
  for t in 1 2; do
    export WRK_THREADS=$t
    res[s_t1_t$t]+="$(run "$tpid" "https://127.0.0.1:$TTLS/");"
    res[s_t2_t$t]+="$(run "$tpid2" "https://127.0.0.1:$TTLS2/");"
    res[s_n1_t$t]+="$(run "$nworker" "https://127.0.0.1:$NTLS/");"
    res[s_n2_t$t]+="$(run "$nworkers2" "https://127.0.0.1:$NTLS2/");"
  done
  unset WRK_THREADS
done

echo "wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS interleaved rounds, medians; 3 upstreams; $(nproc) cores"
echo "nginx $(nginx -v 2>&1 | sed 's/.*\///') (1 worker), tessera $($BIN --version | awk '{print $2}'), redis $(redis-server --version | awk '{print $3}' | cut -d= -f2)"
args=()
for k in "${!res[@]}"; do args+=("$k=${res[$k]}"); done
python3 - "${args[@]}" <<'PY'
import statistics, sys
rows = {}
for arg in sys.argv[1:]:
    key, raw = arg.split("=", 1)
    runs = [list(map(float, r.split())) for r in raw.strip(";").split(";")]
    rows[key] = [statistics.median(col) for col in zip(*runs)]
print(f"{'feature':10} {'proxy':8} {'req/s':>8} {'p99 ms':>8} {'req/CPU-s':>10}  {'vs own plain':>14}  {'vs nginx same':>14}")
for feat in ["plain", "tls", "jwt", "ratelimit", "shared"]:
    for who, tag in (("tessera", "t"), ("nginx", "n")):
        r = rows.get(f"{tag}_{feat}")
        if r is None:
            continue
        base = rows[f"{tag}_plain"]
        own = f"{r[0]/base[0]:.2f}x {r[2]/base[2]:.2f}x"
        n = rows.get(f"n_{feat}")
        vs = f"{r[0]/n[0]:.2f}x {r[2]/n[2]:.2f}x" if (n and who == "tessera") else "-"
        print(f"{feat:10} {who:8} {r[0]:8.0f} {r[1]:8.3f} {r[2]:10.0f}  {own:>14}  {vs:>14}")
print("ratios: req/s and req/CPU-s; 'vs own plain' is the feature's cost for that proxy")
print()
print("TLS (keep-alive) on 1 and 2 workers; cores busy: the proxy's / the whole machine's")
print(f"{'wrk':4} {'proxy':8} {'1 worker req/s':>14} {'cores':>10} {'2 workers req/s':>15} {'cores':>10}  {'req/s':>6} {'req/CPU-s':>9}")
for t in (1, 2):
    for who, tag in (("tessera", "t"), ("nginx", "n")):
        one, two = rows[f"s_{tag}1_t{t}"], rows[f"s_{tag}2_t{t}"]
        busy = lambda r: f"{r[0]/r[2]:.2f}/{r[3]:.2f}"
        print(f"-t{t:<2} {who:8} {one[0]:14.0f} {busy(one):>10} {two[0]:15.0f} {busy(two):>10}  "
              f"{two[0]/one[0]:5.2f}x {two[2]/one[2]:8.2f}x")
PY
