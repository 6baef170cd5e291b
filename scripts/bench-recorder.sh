#!/usr/bin/env bash
# bench-recorder.sh: pg-recorder's sustained rows per second into pgws_audit.messages, on this
# machine, with the real NATS (JetStream) and PostgreSQL. Release build; a database and a NATS
# prefix of its own (removed at the end).
#
#   1. drain: RECORDS records are published into the audit stream while no recorder runs, then
#      REPLICAS recorders start and record the backlog; the rate is rows / (last commit - first
#      commit), read from the table's recorded_at.
#   2. live: one recorder runs while RECORDS more are published as fast as JetStream takes
#      them (the publisher shares the cores); the same rate, and the publish rate.
#   3. one-statement baseline: PostgreSQL alone, the same rows as one INSERT ... SELECT and as
#      one COPY into the same table, so the figures above can be read as ratios to what the
#      database itself does on these cores.
#
# The database server: PGWS_DB_URI's (a superuser's URI; the run makes its database there, and
# its COPY files are the server's, so the server runs on this machine), or else the machine's
# cluster, postgres://postgres@127.0.0.1:5432/postgres (scripts/ensure-services.sh starts it
# when absent; it is never reconfigured or restarted from here).
#
# Usage: scripts/bench-recorder.sh [RECORDS] [REPLICAS]     (defaults 500000 and 1)
# Env:   PGWS_RECORDER_BATCH_SIZE (default 5000), PGWS_RECORDER_BATCH_WAIT (default 20),
#        PGWS_DB_URI (see above), RECORDER_BIN (another pg-recorder build to run instead of
#        this tree's, for before/after figures)
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS=${1:-500000}
REPLICAS=${2:-1}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/pgws-target}"
DEFAULT_DB_URI=postgres://postgres@127.0.0.1:5432/postgres
ADMIN_URI=${PGWS_DB_URI:-$DEFAULT_DB_URI}
if [[ $ADMIN_URI == "$DEFAULT_DB_URI" ]]; then
  bash scripts/ensure-services.sh >/dev/null
else
  bash scripts/ensure-services.sh --nats >/dev/null
fi
cargo build --release --locked -p pg-recorder -p pgws-tests >&2
BIN=$CARGO_TARGET_DIR/release

RUN=bench$(date +%s)
DB=pgws_$RUN
# ADMIN_URI with its database replaced by $1 (scheme://[user@]host[:port][/database][?query]).
with_database() {
  local base=${ADMIN_URI%%\?*} query="" scheme rest
  [[ $ADMIN_URI == *\?* ]] && query="?${ADMIN_URI#*\?}"
  scheme=${base%%://*}
  rest=${base#*://}
  printf '%s://%s/%s%s\n' "$scheme" "${rest%%/*}" "$1" "$query"
}
export PGWS_DB_URI
PGWS_DB_URI=$(with_database "$DB")
export PGWS_NATS_URL=nats://127.0.0.1:4222
export PGWS_NATS_PREFIX=$RUN
export PGWS_LISTEN_CHANNEL=postgres-websockets-listener
# Room for the whole backlog (records are about 300 bytes in the stream).
export PGWS_AUDIT_MAX_BYTES=$((RECORDS * 2 * 600 + 64 * 1024 * 1024))
export PGWS_RECORDER_BATCH_SIZE=${PGWS_RECORDER_BATCH_SIZE:-5000}
export PGWS_RECORDER_BATCH_WAIT=${PGWS_RECORDER_BATCH_WAIT:-20}
export RUST_LOG=${RUST_LOG:-warn}
LOGS=$(mktemp -d)
PIDS=()

psql() { command psql -qAtX -v ON_ERROR_STOP=1 "$@"; }
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -d "$ADMIN_URI" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  # The stream holds the benchmark's records: remove it (JetStream API over plain NATS).
  "$BIN/pgws-audit-bench" remove-stream >/dev/null 2>&1 || true
  rm -rf "$LOGS"
}
trap cleanup EXIT

recorder() { # $1 = replica number: starts one recorder, waits for /readyz
  local port=$((19300 + $1))
  PGWS_ADMIN_PORT=$port "${RECORDER_BIN:-$BIN/pg-recorder}" >"$LOGS/recorder-$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && return 0
    sleep 0.1
  done
  cat "$LOGS/recorder-$1.log" >&2
  echo "recorder $1 did not become ready" >&2
  exit 1
}
# CPU seconds (user + system) used so far by the processes named $1 (or by pid $1).
cpu() {
  local pids
  if [[ $1 =~ ^[0-9]+$ ]]; then pids=$1; else pids=$(pgrep -x "$1" | xargs); fi
  [[ -n $pids ]] || { echo 0; return; }
  # shellcheck disable=SC2086
  for p in $pids; do cat "/proc/$p/stat" 2>/dev/null || true; done |
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); t += $12 + $13 } END { printf "%.2f", t / hz }'
}
stop_recorders() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "versions: $(command psql --version), nats-server $(nats-server --version 2>/dev/null | awk '{print $NF}')"
echo "parameters: records=$RECORDS replicas=$REPLICAS batch_size=$PGWS_RECORDER_BATCH_SIZE batch_wait=${PGWS_RECORDER_BATCH_WAIT}ms"
psql -d "$ADMIN_URI" -c "CREATE DATABASE $DB"

# The first recorder creates the stream, the consumer and the schema; then none runs.
recorder 0
stop_recorders

echo "== drain: $RECORDS records published first, then $REPLICAS recorder(s) start"
"$BIN/pgws-audit-bench" publish "$RECORDS" >"$LOGS/drain.out" &
BENCH=$!
until grep -q '^published=' "$LOGS/drain.out" 2>/dev/null; do
  kill -0 $BENCH 2>/dev/null || { cat "$LOGS/drain.out"; exit 1; }
  sleep 0.2
done
pg0=$(cpu postgres) nats0=$(cpu nats-server)
for r in $(seq 1 "$REPLICAS"); do recorder "$r"; done
wait $BENCH
cat "$LOGS/drain.out"
rec=0
for p in "${PIDS[@]}"; do rec=$(awk -v a="$rec" -v b="$(cpu "$p")" 'BEGIN { print a + b }'); done
awk -v n="$RECORDS" -v pg="$(awk -v a="$pg0" -v b="$(cpu postgres)" 'BEGIN { print b - a }')" \
  -v nats="$(awk -v a="$nats0" -v b="$(cpu nats-server)" 'BEGIN { print b - a }')" -v rec="$rec" 'BEGIN {
  printf "drain CPU seconds per 100,000 rows: postgres %.2f, nats-server %.2f, recorder(s) %.2f\n",
    pg * 1e5 / n, nats * 1e5 / n, rec * 1e5 / n }'
stop_recorders

echo "== live: one recorder records while $RECORDS more are published"
recorder 1
"$BIN/pgws-audit-bench" publish "$RECORDS"
stop_recorders

echo "== PostgreSQL alone: the last $RECORDS rows again, as one statement each"
psql -d "$PGWS_DB_URI" <<SQL
CREATE TABLE pgws_audit.bench_src AS
  SELECT id || '-again' AS id, channel, event, payload, claims::text AS claims,
         extract(epoch FROM received_at) AS at, notify_channel
  FROM pgws_audit.messages ORDER BY recorded_at DESC LIMIT $RECORDS;
COPY (SELECT id || '-copy', channel, event, payload, claims, to_timestamp(at), notify_channel
      FROM pgws_audit.bench_src) TO '/tmp/$RUN.tsv';
SQL
t0=$(date +%s.%N)
psql -d "$PGWS_DB_URI" -c "INSERT INTO pgws_audit.messages (id, channel, event, payload, claims, received_at, notify_channel)
  SELECT id, channel, event, payload, claims::jsonb, to_timestamp(at), notify_channel FROM pgws_audit.bench_src
  ON CONFLICT DO NOTHING"
t1=$(date +%s.%N)
psql -d "$PGWS_DB_URI" -c "COPY pgws_audit.messages (id, channel, event, payload, claims, received_at, notify_channel) FROM '/tmp/$RUN.tsv'"
t2=$(date +%s.%N)
rm -f "/tmp/$RUN.tsv"
awk -v n="$RECORDS" -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN {
  printf "one INSERT ... SELECT ... ON CONFLICT: %.0f rows/s; one COPY (text): %.0f rows/s\n", n / (b - a), n / (c - b) }'
