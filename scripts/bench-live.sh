#!/usr/bin/env bash
# bench-live.sh: /live table topics end to end (plain SQL inserts -> the leader bridge's change
# capture -> NATS -> the gateway -> websockets), on this machine, in one run:
#   classes     SOCKETS sockets in CLASSES permission classes (one role, CLASSES tenants; the
#               table's policy reads the claim `tenant` only), ROWS rows inserted in
#               transactions of TXN_ROWS: authorised events delivered per second
#   baseline    the same sockets and rows with the bridge's PGWS_LIVE_CLASSES=subscriber (one
#               class, so one visibility check per batch, per socket)
#   throughput  one socket, one class, THROUGHPUT_ROWS rows in transactions of 1,000: row
#               changes per second from SQL to a socket
#   users       USERS sockets, each a user of its own (its `tenant` claim is its own, so the
#               per-user policy makes it a class of one, routed by value), USER_ROWS rows in
#               transactions of TXN_ROWS spread over them: events/s
#   users-baseline  the same with PGWS_LIVE_CLASSES=subscriber (not routed: one check per
#               batch per user)
#   users-latency   USERS users subscribed, LATENCY_ROWS rows one per transaction at
#               LATENCY_RATE rows/s: insert-to-event latency
#   latency     one socket, one class; for each rate of LATENCY_RATES (rows/s), LATENCY_SECONDS
#               of rows inserted on schedule (one per transaction up to 1,000/s, then
#               transactions of rate/1,000 rows, 1,000 a second): commit-to-socket latency
# One release pg-bridge and one release ws-gateway (deploy/sample.env with a NATS prefix, ports,
# listen channel, replication slot and schema of their own; no recorder), restarted between
# the phases; tests/src/bin/pgws-live-bench.rs does the measuring. Each phase writes its JSON
# into OUT_DIR (each phase starts from an empty replication slot); then the ratio (events/s
# classes / events/s baseline) and rows/s are printed.
# At the end (and on failure): the processes are stopped, the audit stream, the replication
# slot, its publication, the schema and its role are removed.
# The database: PGWS_DB_URI from the environment (a superuser's URI: the run makes a schema, a
# role and a replication slot), or else the machine's cluster,
# postgres://postgres@127.0.0.1:5432/postgres (deploy/sample.env sets no PGWS_DB_URI;
# scripts/ensure-services.sh starts that cluster when absent). Change capture needs
# wal_level=logical: when the server lacks it, the run stops at once and says so. The server
# is never reconfigured or restarted from here: for the machine's cluster run
# `scripts/ensure-services.sh --reconfigure-postgres`, or point PGWS_DB_URI at a server that
# has it, such as a running scripts/stack.sh's own cluster
# (postgres://postgres@127.0.0.1:54329/postgres).
# NATS: deploy/sample.env's PGWS_NATS_URL (the machine's, started by ensure-services.sh).
#
# Usage: scripts/bench-live.sh [OUT_DIR]      (default bench/results/<date>-live)
# Env:   SOCKETS (1000), CLASSES (10), ROWS (20000), TXN_ROWS (500), THROUGHPUT_ROWS (100000),
#        USERS (1000), USER_ROWS (100000), LATENCY_RATE (100), LATENCY_ROWS (3000),
#        LATENCY_RATES ("1000 20000"), LATENCY_SECONDS (10),
#        PHASES (default "classes baseline throughput"; "users users-baseline users-latency"
#        for per-user policies; "latency"), BRIDGE_BIN and GATEWAY_BIN (other builds of the
#        two services to run instead, e.g. an earlier commit's, for a same-run comparison), BASELINE_QUIET (180: seconds without an
#        event before the baseline counts what arrived), KEEP_LOGS=1 (keep the services' logs
#        in OUT_DIR/logs). On 2 cores the baseline takes about 2.5 minutes at ROWS=20000 and
#        50 s at ROWS=5000 (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=live$(date +%s)
OUT=${1:-bench/results/$(date +%Y-%m-%d)-live}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SOCKETS=${SOCKETS:-1000}
CLASSES=${CLASSES:-10}
ROWS=${ROWS:-20000}
TXN_ROWS=${TXN_ROWS:-500}
THROUGHPUT_ROWS=${THROUGHPUT_ROWS:-100000}
USERS=${USERS:-1000}
USER_ROWS=${USER_ROWS:-100000}
LATENCY_RATE=${LATENCY_RATE:-100}
LATENCY_ROWS=${LATENCY_ROWS:-3000}
LATENCY_RATES=${LATENCY_RATES:-1000 20000}
LATENCY_SECONDS=${LATENCY_SECONDS:-10}
PHASES=${PHASES:-classes baseline throughput}

say() { printf 'bench-live: %s\n' "$*" >&2; }
# A URI with its password hidden, for messages.
redact() { sed -E 's#^([a-z]+://[^:@/]*):[^@/]*@#\1:***@#' <<<"$1"; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/pgws-target}"
DEFAULT_DB_URI=postgres://postgres@127.0.0.1:5432/postgres
DB_URI=${PGWS_DB_URI:-$DEFAULT_DB_URI}
if [[ $DB_URI == "$DEFAULT_DB_URI" ]]; then
  bash scripts/ensure-services.sh >/dev/null
else
  bash scripts/ensure-services.sh --nats >/dev/null
fi
WAL_LEVEL=$(psql -X -w -q -At -d "$DB_URI" -c 'show wal_level' 2>&1) || {
  say "cannot connect to $(redact "$DB_URI"): $WAL_LEVEL"
  exit 1
}
if [[ $WAL_LEVEL != logical ]]; then
  say "wal_level is '$WAL_LEVEL' on $(redact "$DB_URI"): /live change capture needs" \
    "wal_level=logical. Left as it is (never reconfigured from here): for the machine's cluster" \
    "run scripts/ensure-services.sh --reconfigure-postgres (it restarts that cluster), or set" \
    "PGWS_DB_URI to a server that has it (e.g. a running scripts/stack.sh's own cluster," \
    "postgres://postgres@127.0.0.1:54329/postgres)"
  exit 1
fi
cargo build --release --locked -p ws-gateway -p pg-bridge -p pgws-tests \
  --bin ws-gateway --bin pg-bridge --bin pgws-live-bench >&2
BIN=$CARGO_TARGET_DIR/release
BENCH=$BIN/pgws-live-bench
BRIDGE_BIN=${BRIDGE_BIN:-$BIN/pg-bridge}
GATEWAY_BIN=${GATEWAY_BIN:-$BIN/ws-gateway}

set -a
# shellcheck disable=SC1091
. deploy/sample.env
set +a
export PGWS_DB_URI=$DB_URI # the environment's (or the machine's cluster), not the env file's
unset PGWS_META_CHANNEL PGWS_ROOT_PATH PGWS_ADMIN_PORT
export PGWS_NATS_PREFIX=$RUN
export PGWS_LISTEN_CHANNEL=$RUN-listen
export PGWS_HOST=127.0.0.1
export PGWS_LOG=${PGWS_LOG:-warn}
export PGWS_CAPTURE_SLOT=${RUN}_slot
export PGWS_TABLE_TOPICS=$RUN.items
export BENCH_SCHEMA=$RUN
GW_PORT=13400
GW_ADMIN=19410
BRIDGE_ADMIN_PORT=19401
BRIDGE_ADMIN=127.0.0.1:$BRIDGE_ADMIN_PORT
LOGS=$(mktemp -d)
declare -A PID=()

wait_http() { # url: waits up to 30 s for 200
  for _ in $(seq 300); do
    curl -fs -o /dev/null -m 1 "$1" && return 0
    sleep 0.1
  done
  say "not ready: $1"
  tail -n 20 "$LOGS"/*.log >&2 || true
  exit 1
}
start() { # name, command...: starts in the background, log in $LOGS/name.log
  local name=$1
  shift
  "$@" >>"$LOGS/$name.log" 2>&1 &
  PID[$name]=$!
}
stop() { # name...
  local n
  for n in "$@"; do
    [[ -n ${PID[$n]:-} ]] || continue
    kill -TERM "${PID[$n]}" 2>/dev/null || true
  done
  for n in "$@"; do
    [[ -n ${PID[$n]:-} ]] || continue
    for _ in $(seq 100); do kill -0 "${PID[$n]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${PID[$n]}" 2>/dev/null || true
    wait "${PID[$n]}" 2>/dev/null || true
    unset "PID[$n]"
  done
}
sql() { PGOPTIONS=--client-min-messages=warning psql -X -q -v ON_ERROR_STOP=1 -d "$PGWS_DB_URI" -c "$1"; }
drop_slot() { # the capture's slot and publication (the next bridge starts from an empty slot)
  sql "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
        WHERE slot_name = '$PGWS_CAPTURE_SLOT' AND NOT active" >/dev/null
  sql "DROP PUBLICATION IF EXISTS $PGWS_CAPTURE_SLOT" >/dev/null
}
cleanup() {
  local rc=$?
  set +e
  stop "${!PID[@]}"
  if [[ $rc != 0 ]]; then
    say "failed ($rc); the services' last log lines:"
    tail -n 30 "$LOGS"/*.log >&2
  fi
  "$BENCH" remove-stream >/dev/null 2>&1
  drop_slot
  sql "DROP SCHEMA IF EXISTS $RUN CASCADE" >/dev/null
  sql "DROP ROLE IF EXISTS ${RUN}_reader" >/dev/null
  if [[ ${KEEP_LOGS:-0} == 1 ]]; then
    mkdir -p "$OUT/logs" && cp "$LOGS"/*.log "$OUT/logs/"
  fi
  rm -rf "$LOGS"
}
trap cleanup EXIT

start_stack() { # extra bridge environment...
  start bridge env PGWS_ADMIN_PORT=$BRIDGE_ADMIN_PORT "$@" "$BRIDGE_BIN"
  wait_http "http://$BRIDGE_ADMIN/readyz"
  start gateway env PGWS_PORT=$GW_PORT PGWS_ADMIN_PORT=$GW_ADMIN "$GATEWAY_BIN"
  wait_http "http://127.0.0.1:$GW_ADMIN/readyz"
  NATS_PID=$(ss -Hltnp "sport = :${PGWS_NATS_URL##*:}" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
  export BENCH_PIDS="gateway=${PID[gateway]},bridge=${PID[bridge]}${NATS_PID:+,nats=$NATS_PID}"
}
stop_stack() {
  stop gateway bridge
  drop_slot
}
run() { # json name, pgws-live-bench arguments...
  local name=$1
  shift
  say "run $name: pgws-live-bench $*"
  PGWS_URL=ws://127.0.0.1:$GW_PORT BRIDGE_ADMIN=$BRIDGE_ADMIN GATEWAY_ADMIN=127.0.0.1:$GW_ADMIN \
    "$BENCH" "$@" >"$OUT/$name.json"
  cat "$OUT/$name.json" >&2
}

MACHINE="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB; $(uptime)"
say "machine: $MACHINE"
echo "$MACHINE" >"$OUT/machine.txt"
"$BENCH" setup "$RUN"

for phase in $PHASES; do
  case $phase in
    classes)
      start_stack
      run "deliver-$SOCKETS-classes-$CLASSES" deliver "$SOCKETS" "$CLASSES" "$ROWS" "$TXN_ROWS"
      stop_stack
      ;;
    baseline)
      # One class per socket: the capture checks each batch once per subscriber.
      start_stack PGWS_LIVE_CLASSES=subscriber
      # A batch's events are published once all its checks ran: allow for a long silence.
      PGWS_LIVE_CLASSES=subscriber BENCH_QUIET=${BASELINE_QUIET:-180} run "deliver-$SOCKETS-baseline" deliver "$SOCKETS" "$CLASSES" "$ROWS" "$TXN_ROWS"
      stop_stack
      ;;
    throughput)
      start_stack
      run "throughput-$THROUGHPUT_ROWS" throughput "$THROUGHPUT_ROWS" 1000
      stop_stack
      ;;
    users)
      start_stack
      run "users-$USERS-routed" deliver "$USERS" "$USERS" "$USER_ROWS" "$TXN_ROWS"
      stop_stack
      ;;
    users-baseline)
      start_stack PGWS_LIVE_CLASSES=subscriber
      PGWS_LIVE_CLASSES=subscriber BENCH_QUIET=${BASELINE_QUIET:-180} run "users-$USERS-baseline" deliver "$USERS" "$USERS" "$USER_ROWS" "$TXN_ROWS"
      stop_stack
      ;;
    users-latency)
      start_stack
      BENCH_RATE=$LATENCY_RATE run "users-$USERS-latency-r$LATENCY_RATE" deliver "$USERS" "$USERS" "$LATENCY_ROWS" 1
      stop_stack
      ;;
    latency)
      for rate in $LATENCY_RATES; do
        start_stack
        BENCH_RATE=$rate run "latency-r$rate" deliver 1 1 $((rate * LATENCY_SECONDS)) $(((rate + 999) / 1000))
        stop_stack
      done
      ;;
    *) say "unknown phase $phase" ;;
  esac
done

python3 - "$OUT" "$SOCKETS" "$CLASSES" "$THROUGHPUT_ROWS" <<'PY' | tee "$OUT/summary.txt"
import json, os, sys
out, sockets, classes, rows = sys.argv[1:]
def load(name):
    path = os.path.join(out, name + ".json")
    return json.load(open(path)) if os.path.exists(path) else None
import glob
for path in sorted(glob.glob(os.path.join(out, "users-*.json")) + glob.glob(os.path.join(out, "latency-*.json"))):
    r = json.load(open(path))
    lat = r.get("latency_ms")
    print(f"{os.path.basename(path)[:-5]:28} events/s {r['events_per_s']:>10,.0f}  "
          f"received {r['received_events']:,}/{r['expected_events']:,}  checks {r.get('capture_checks', '?')}"
          + (f"  latency p50 {lat['p50']} p99 {lat['p99']} ms" if lat else ""))
c = load(f"deliver-{sockets}-classes-{classes}")
b = load(f"deliver-{sockets}-baseline")
t = load(f"throughput-{rows}")
for name, r in (("classes", c), ("baseline", b), ("throughput", t)):
    if r:
        print(f"{name:10} events/s {r['events_per_s']:>10,.0f}  rows/s {r['rows_per_s']:>8,.0f}  "
              f"received {r['received_events']:,}/{r['expected_events']:,}  "
              f"checks {r.get('capture_checks', '?')}  seconds {r['seconds']}")
if c and b and b["events_per_s"]:
    print(f"ratio classes/baseline: {c['events_per_s'] / b['events_per_s']:.1f}x (target 20x)")
if t:
    print(f"SQL -> socket: {t['rows_per_s']:,.0f} row changes/s (target 10,000)")
incomplete = [n for n, r in (("classes", c), ("baseline", b), ("throughput", t))
              if r and not r.get("complete", True)]
repeated = [os.path.basename(p)[:-5] for p in sorted(glob.glob(os.path.join(out, "*.json")))
            if json.load(open(p)).get("repeated_events", 0)]
if incomplete:
    print("INCOMPLETE (events missing or sockets closed): " + ", ".join(incomplete))
if repeated:
    print("REPEATED (a socket received an event twice): " + ", ".join(repeated))
if incomplete or repeated:
    sys.exit(1)
PY
say "reports in $OUT"
