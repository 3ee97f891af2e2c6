#!/usr/bin/env bash
# Sagas per second: three HTTP steps each (against `tessera upstream`, which answers 200),
# posted by wrk for DURATION seconds, counted until every saga has finished; on SQLite
# (the default store) and on PostgreSQL. Printed beside a reference on the same machine:
# single-row INSERTs committed one by one (what a store without group commit pays per
# transition; SQLite via python3's sqlite3 in WAL + synchronous=FULL, PostgreSQL via
# pgbench), so the ratio shows what the coordinator's store achieves per transition.
# Then the same on PostgreSQL with two servers sharing the database (wrk split between
# them), against the one-server PostgreSQL run: issue 17's target is >= 1.5x.
#
# On two cores, PostgreSQL, wrk, the participant and the servers share one machine, so
# a second server brings no CPU of its own. SERVER_CPUS=0.5 puts each server in a cgroup
# of its own capped at half a core (root; cgroup v1 or v2), as if each ran on a machine of
# its own size: then the two-server row shows whether the shared database lets servers
# scale out. Each run prints the CPU its servers used.
#
#   bench/coordinator.sh                  # 10 s of posting, wrk -c16
#   DURATION=5 CONNS=32 bench/coordinator.sh
#   DURATION=5 CONNS=64 SERVER_CPUS=0.5 bench/coordinator.sh
#
# Needs wrk (apt-get installs it if missing), python3, and PostgreSQL on 127.0.0.1:5432
# (trust auth, user root) for the PostgreSQL half (skipped if absent).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-16}
PG_ADMIN=${PG_ADMIN:-postgres://root@127.0.0.1:5432/test}
SERVER_CPUS=${SERVER_CPUS:-}
PORT=18500; UP=19401
command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
cargo build --release --quiet --bin tessera
BIN=$PWD/target/release/tessera
work=$(mktemp -d)
pids=()
cleanup() {
  # Servers started inside $(...) subshells record their pids in $work/pids.
  for p in "${pids[@]}" $(cat "$work/pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS tessera_bench WITH (FORCE)" >/dev/null 2>&1 || true
  for d in $(cat "$work/cgroups" 2>/dev/null); do rmdir "$d" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

$BIN upstream --bind "127.0.0.1:$UP" --id participant >/dev/null 2>&1 &
pids+=($!)

step() { # name
  printf '{"name":"%s","action":{"url":"http://127.0.0.1:%s","path":"/%s/do"},"compensation":{"url":"http://127.0.0.1:%s","path":"/%s/undo"},"timeout":"10s"}' "$1" "$UP" "$1" "$UP" "$1"
}
saga="{\"name\":\"bench\",\"steps\":[$(step reserve),$(step charge),$(step confirm)]}"
cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[$saga]]
LUA

metric() { # status [port]
  curl -sf "http://127.0.0.1:${2:-$PORT}/v1/tessera/coordinator/metrics" |
    awk -v s="$1" -F' ' '$1 == "tessera_sagas{status=\""s"\"}" {print $2}'
}

drain() { # waits (up to 5 min) until no saga is left running or compensating
  local r c
  for _ in $(seq 3000); do
    r=$(metric running); c=$(metric compensating)
    [ $(( ${r:-1} + ${c:-0} )) -eq 0 ] && return
    sleep 0.1
  done
}

# The machine's busy share over a run (from /proc/stat): whether a run was CPU-bound.
cpu_mark() { awk '/^cpu / {print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }
cpu_busy() { # start-mark end-mark -> percent busy
  python3 -c "import sys; b0,i0,b1,i1=map(int,sys.argv[1:]); print(f'{100*(b1-b0)/max(1,(b1-b0)+(i1-i0)):.0f}')" $1 $2
}

# With SERVER_CPUS, moves a server (all its threads) into a cgroup of its own, capped.
# The quota is counted per 10 ms (not the default 100 ms): a server that spends its share
# early waits at most the rest of 10 ms, as on a slower machine, not for a 100 ms stall.
confine() { # pid name
  [ -n "$SERVER_CPUS" ] || return 0
  local period=10000 quota d
  quota=$(python3 -c "print(int(float('$SERVER_CPUS') * $period))")
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
    d=/sys/fs/cgroup/tessera-bench-$2
    mkdir -p "$d"; echo "$quota $period" >"$d/cpu.max"
  else
    d=/sys/fs/cgroup/cpu/tessera-bench-$2
    mkdir -p "$d"; echo "$period" >"$d/cpu.cfs_period_us"; echo "$quota" >"$d/cpu.cfs_quota_us"
  fi
  echo "$1" >"$d/cgroup.procs"
  echo "$d" >>"$work/cgroups"
}

# CPU seconds a process has used so far (user + system).
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); print ($12 + $13) / hz}' "/proc/$1/stat"; }

run() { # label [--database-url URL]
  local label=$1; shift
  $BIN server --bind "127.0.0.1:$PORT" --data-dir "$work/data-$label" "$@" >/dev/null 2>&1 &
  local spid=$!
  echo "$spid" >>"$work/pids"
  confine "$spid" "$label"
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/v1/status/leader" >/dev/null && break; sleep 0.1; done
  local t0 t1 done_n
  t0=$(date +%s.%N); c0=$(cpu_mark)
  wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$work/post.lua" "http://127.0.0.1:$PORT/v1/sagas" >"$work/wrk-$label.txt"
  drain
  t1=$(date +%s.%N)
  echo "$label: machine busy $(cpu_busy "$c0" "$(cpu_mark)")% of both cores during the run; server used $(cpu_secs "$spid") CPU-s" >&2
  done_n=$(metric completed)
  kill "$spid"; wait "$spid" 2>/dev/null || true
  python3 -c "import sys; n=int(sys.argv[1]); s=float(sys.argv[3])-float(sys.argv[2]); print(f'{n} {s:.2f} {n/s:.0f} {4*n/s:.0f}')" "$done_n" "$t0" "$t1"
}

run_two() { # URL: two servers on one PostgreSQL database, wrk -c(CONNS/2) on each
  local url=$1 p2=$((PORT + 1)) spids=() t0 t1 done_n
  for i in 1 2; do
    $BIN server --bind "127.0.0.1:$((PORT + i - 1))" --data-dir "$work/data-two-$i" --node "two-$i" \
      --database-url "$url" >"$work/two-$i.log" 2>&1 &
    spids+=($!)
    echo $! >>"$work/pids"
    confine $! "two-$i"
  done
  for p in "$PORT" "$p2"; do
    up=
    for _ in $(seq 300); do curl -sf "http://127.0.0.1:$p/v1/status/leader" >/dev/null && up=1 && break; sleep 0.1; done
    [ -n "$up" ] || { echo "server on $p did not start:" >&2; cat "$work"/two-*.log >&2; exit 1; }
  done
  t0=$(date +%s.%N); c0=$(cpu_mark)
  wrk -t1 -c$((CONNS / 2)) -d"${DURATION}s" -s "$work/post.lua" "http://127.0.0.1:$PORT/v1/sagas" >"$work/wrk-two-1.txt" &
  local w1=$!
  wrk -t1 -c$((CONNS / 2)) -d"${DURATION}s" -s "$work/post.lua" "http://127.0.0.1:$p2/v1/sagas" >"$work/wrk-two-2.txt"
  wait "$w1"
  drain
  t1=$(date +%s.%N)
  echo "two servers: machine busy $(cpu_busy "$c0" "$(cpu_mark)")% of both cores during the run; servers used $(cpu_secs "${spids[0]}") and $(cpu_secs "${spids[1]}") CPU-s" >&2
  done_n=$(metric completed)
  for p in "${spids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "a server died during the run:" >&2; for f in "$work"/two-*.log; do echo "== $f" >&2; tail -n 20 "$f" >&2; done; }
  done
  kill "${spids[@]}" 2>/dev/null; wait "${spids[@]}" 2>/dev/null || true
  python3 -c "import sys; n=int(sys.argv[1]); s=float(sys.argv[3])-float(sys.argv[2]); print(f'{n} {s:.2f} {n/s:.0f} {4*n/s:.0f}')" "$done_n" "$t0" "$t1"
}

sqlite_ref() {
  python3 - "$work/ref.db" "$DURATION" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, state TEXT)")
state = "x" * 1500
end = time.time() + float(sys.argv[2]); n = 0
while time.time() < end:
    db.execute("BEGIN"); db.execute("INSERT INTO t (state) VALUES (?)", (state,)); db.execute("COMMIT"); n += 1
print(f"{n / float(sys.argv[2]):.0f}")
PY
}

pg_ref() {
  local url=${PG_ADMIN%/*}/tessera_bench
  psql "$url" -qc "CREATE TABLE IF NOT EXISTS t (id BIGSERIAL PRIMARY KEY, state TEXT)" >/dev/null
  echo "INSERT INTO t (state) VALUES (repeat('x', 1500));" >"$work/insert.sql"
  PGBENCH=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench | head -1)
  "$PGBENCH" -n -c "$CONNS" -j 1 -T "$DURATION" -f "$work/insert.sql" "$url" 2>/dev/null |
    awk '/^tps/ {printf "%.0f\n", $3}'
}

echo "three-step sagas, posted by wrk -t1 -c$CONNS for ${DURATION}s, timed until all finished; 2 cores${SERVER_CPUS:+; each server capped at $SERVER_CPUS cores}"
printf '%-11s %9s %8s %9s %14s %18s %7s\n' store sagas seconds sagas/s transitions/s "reference commits/s" ratio
read -r n s rate tr < <(run sqlite)
ref=$(sqlite_ref)
printf '%-11s %9s %8s %9s %14s %18s %6.1fx\n' sqlite "$n" "$s" "$rate" "$tr" "$ref" "$(python3 -c "print($tr/$ref)")"
if psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS tessera_bench WITH (FORCE)" >/dev/null 2>&1 &&
   psql "$PG_ADMIN" -qc "CREATE DATABASE tessera_bench" >/dev/null 2>&1; then
  read -r n s rate tr < <(run postgres --database-url "${PG_ADMIN%/*}/tessera_bench")
  ref=$(pg_ref)
  printf '%-11s %9s %8s %9s %14s %18s %6.1fx\n' postgres "$n" "$s" "$rate" "$tr" "$ref" "$(python3 -c "print($tr/$ref)")"
  one=$rate
  psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS tessera_bench WITH (FORCE)" >/dev/null
  psql "$PG_ADMIN" -qc "CREATE DATABASE tessera_bench" >/dev/null
  read -r n s rate tr < <(run_two "${PG_ADMIN%/*}/tessera_bench")
  printf '%-11s %9s %8s %9s %14s %18s %6.2fx\n' "pg, 2 srv" "$n" "$s" "$rate" "$tr" "(vs 1 server)" "$(python3 -c "print($rate/$one)")"
else
  echo "postgres: skipped (no PostgreSQL at $PG_ADMIN)"
fi
echo "(transitions = 4 committed writes per three-step saga; reference = one INSERT per commit)"
