# Sourced by the benchmarks that compare tessera with etcd under one wrk load
# (bench/registry.sh, bench/cluster.sh): the wrk runner, the result rows, and the ten
# passing "web" instances the read scenario reads from both. Needs DURATION, CONNS and
# THREADS set.

rate() { # wrk args... → requests/s; fails loudly on non-2xx answers
  local out
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" "$@")
  if grep -q "Non-2xx" <<<"$out"; then echo "non-2xx answers in: $*" >&2; echo "$out" >&2; exit 1; fi
  awk '/Requests\/sec/ {print $2}' <<<"$out"
}
ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }
row() { printf '%-34s %12s %12s %8s\n' "$1" "$2" "$3" "$4"; }

# seed_web TESSERA_URL ETCD_URL: ten passing instances of "web", registered in tessera and
# put into etcd as ten keys under services/web/.
seed_web() {
  local i key val
  for i in $(seq 1 10); do
    curl -sf -X PUT "$1/v1/agent/service/register" \
      -d "{\"Name\":\"web\",\"ID\":\"web$i\",\"Address\":\"10.0.0.$i\",\"Port\":8080,\"Tags\":[\"v1\"],\"Check\":{\"TTL\":\"1h\",\"Status\":\"passing\"}}" >/dev/null
    key=$(printf 'services/web/web%s' "$i" | base64 -w0)
    val=$(printf '{"Name":"web","ID":"web%s","Address":"10.0.0.%s","Port":8080,"Tags":["v1"],"Status":"passing"}' "$i" "$i" | base64 -w0)
    curl -sf -X POST "$2/v3/kv/put" -d "{\"key\":\"$key\",\"value\":\"$val\"}" >/dev/null
  done
}
