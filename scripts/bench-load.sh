#!/usr/bin/env bash
# bench-load.sh: pgws against its peers on the same loads, in one run, on this machine:
#   pgws  (release ws-gateway + pg-bridge + pg-recorder, deploy/sample.env with a NATS prefix,
#          ports and listen channel of its own, no meta channel)
#   nats  (a private nats-server with a websocket block; subscribers speak the NATS protocol
#          over the websocket, the publisher is a plain NATS client)
#   node  (bench/node: pg LISTEN + ws, `npm ci` first)
# Phases (each run writes JSON into OUT_DIR, see bench/plot.py):
#   idle    IDLE_COUNTS sockets on a freshly started server of each target: RSS per socket
#   fanout  FANOUT_SOCKETS sockets on one channel, FANOUT_RATES notifications/s: deliveries/s
#           and latency for each target
#   mixed   MIXED_CHANNELS channels of MIXED_SUBSCRIBERS sockets, MIXED_RATE notifications/s
#           (pgws only): latency at a moderate delivery rate spread over many channels
#   ingest  INGEST_SOCKETS write-mode sockets for SECONDS, and the one-per-transaction baseline;
#           then the same with PGWS_NOTIFY_DEDUP=false
#   busy    (not in the default PHASES) BUSY_CHANNELS channels of BUSY_SUBSCRIBERS sockets at
#           BUSY_RATES notifications/s, on each of BUSY_TARGETS in turn (default pgws and
#           nats-server; `one` is pgws in one process), BUSY_RUNS times: the latency of busy
#           sockets (each receives rate / channels messages/s); with BASE_GATEWAY_BIN, that
#           gateway binary too (target `base`), in the same turns
#   one     (not in the default PHASES) pgws in one process (no NATS) against the split stack
#           (gateway, bridge, recorder and their NATS, all counted for CPU), in turn, ONE_RUNS
#           times: fan-out (FANOUT_SOCKETS sockets, one channel, ONE_RATE notifications/s) and
#           ingest (INGEST_SOCKETS sockets, audit on); then ONE_IDLE idle sockets on each
#           With BASE_ONE_BIN, that pgws binary too (target `onebase`, run after `one`, its
#           fan-out and ingest alike); ONE_ENV (e.g. "PGWS_POOL_SIZE=3"): settings for target
#           `one` only, so that `onebase` with BASE_ONE_BIN=target/release/pgws is the default
#   one-noaudit (not in the default PHASES) ingest on pgws in one process with PGWS_AUDIT=false
#           and with the audit (written in the NOTIFY transaction), in turn, ONE_RUNS times: what
#           the in-transaction audit costs
#   history (not in the default PHASES) the split stack without a history
#           (PGWS_HISTORY_SECONDS=0), with it (the default) and with it and every socket resuming
#           (?resume=, read through the history), in turn, HISTORY_RUNS times: fan-out
#           (FANOUT_SOCKETS sockets, one channel, ONE_RATE notifications/s; the bridge and the
#           stack's NATS counted for CPU) and ingest (INGEST_SOCKETS sockets; not resuming)
#   big     BIG=1: BIG_SOCKETS sockets over BIG_GATEWAYS gateways on one NATS, one broadcast
#   pubsub  (not in the default PHASES: about 10 minutes more) wspubsub fan-out on pgws and the
#           same on nats-server's websocket endpoint (publishers there speak NATS over a
#           websocket too): 1 topic of PUBSUB_SOCKETS subscribers at PUBSUB_RATES frames/s,
#           then PUBSUB_TOPICS topics of PUBSUB_TOPIC_SUBSCRIBERS at PUBSUB_TOPIC_RATES; a run
#           waits PUBSUB_QUIET s without a delivery before it counts the rest as lost (at
#           2M deliveries/s nats-server pauses its deliveries for 2-3 s)
# then prints the ratios (pgws / nats, pgws / node).
#
# Usage: scripts/bench-load.sh [OUT_DIR]      (default bench/results/<unix time>)
# Env:   PHASES (default "idle fanout mixed ingest"; add "big" or set BIG=1, "pubsub" alone:
#        PHASES=pubsub scripts/bench-load.sh OUT_DIR), SECONDS_EACH (10),
#        LOAD_ARGS (extra pgws-load options for every run), GATEWAY_BIN (another ws-gateway
#        binary, to compare two builds in one run), and the counts named below
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=bench$(date +%s)
OUT=${1:-bench/results/$(date +%s)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PHASES=${PHASES:-idle fanout mixed ingest}
[[ ${BIG:-0} == 1 && " $PHASES " != *" big "* ]] && PHASES="$PHASES big"
SECS=${SECONDS_EACH:-10}
IDLE_COUNTS=${IDLE_COUNTS:-1000 5000 10000 19000}
FANOUT_SOCKETS=${FANOUT_SOCKETS:-10000}
FANOUT_RATES=${FANOUT_RATES:-1 2 5 10 20 50}
MIXED_CHANNELS=${MIXED_CHANNELS:-1000}
MIXED_SUBSCRIBERS=${MIXED_SUBSCRIBERS:-10}
MIXED_RATES=${MIXED_RATES:-1000 2500 5000 10000}
INGEST_SOCKETS=${INGEST_SOCKETS:-100}
BUSY_CHANNELS=${BUSY_CHANNELS:-10}
BUSY_SUBSCRIBERS=${BUSY_SUBSCRIBERS:-100}
BUSY_RATES=${BUSY_RATES:-5000}
BUSY_RUNS=${BUSY_RUNS:-3}
BUSY_TARGETS=${BUSY_TARGETS:-pgws nats}
ONE_RUNS=${ONE_RUNS:-3}
ONE_RATE=${ONE_RATE:-50}
HISTORY_RUNS=${HISTORY_RUNS:-3}
ONE_IDLE=${ONE_IDLE:-19000}
BIG_SOCKETS=${BIG_SOCKETS:-100000}
BIG_GATEWAYS=${BIG_GATEWAYS:-6}
PUBSUB_SOCKETS=${PUBSUB_SOCKETS:-10000}
PUBSUB_RATES=${PUBSUB_RATES:-1 5 20 50 100 200}
PUBSUB_TOPICS=${PUBSUB_TOPICS:-100}
PUBSUB_TOPIC_SUBSCRIBERS=${PUBSUB_TOPIC_SUBSCRIBERS:-100}
PUBSUB_TOPIC_RATES=${PUBSUB_TOPIC_RATES:-100 500 1000 2000 5000}
PUBSUB_QUIET=${PUBSUB_QUIET:-10} # seconds without a delivery that end a run's drain

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/pgws-target}"
bash scripts/ensure-services.sh >/dev/null
cargo build --release --locked -p ws-gateway -p pg-bridge -p pg-recorder -p pgws -p pgws-load >&2
BIN=$CARGO_TARGET_DIR/release
LOAD=$BIN/pgws-load

set -a
# shellcheck disable=SC1091
. deploy/sample.env
set +a
unset PGWS_META_CHANNEL PGWS_ROOT_PATH PGWS_ADMIN_PORT
# The machine's PostgreSQL unless one is given (deploy/sample.env names none).
export PGWS_DB_URI=${PGWS_DB_URI:-postgres://postgres@127.0.0.1:5432/postgres}
export PGWS_NATS_PREFIX=$RUN
export PGWS_LISTEN_CHANNEL=$RUN-listen
export PGWS_HOST=127.0.0.1
export PGWS_AUDIT_MAX_BYTES=$((512 << 20))
export PGWS_LOG=${PGWS_LOG:-warn}
NODE_LISTEN=$RUN-node
# pgws in one process: a stack of its own (prefix, hence leader lock, and listen channel).
ONE_LISTEN=$RUN-one-listen
ONE_PORT=13050
NATS_CLIENT_PORT=14222
NATS_WS_PORT=14280
NODE_PORT=13100
GW_PORT=13000 # gateway i: 13000+i, admin 19110+i
LOGS=$(mktemp -d)
declare -A PID=()

say() { printf 'bench-load: %s\n' "$*" >&2; }
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
  "$@" >"$LOGS/$name.log" 2>&1 &
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
cleanup() {
  stop "${!PID[@]}"
  rm -rf "$LOGS"
}
trap cleanup EXIT

start_bridge() {
  start bridge env PGWS_ADMIN_PORT=19101 "$BIN/pg-bridge"
  start recorder env PGWS_ADMIN_PORT=19102 "$BIN/pg-recorder"
  wait_http http://127.0.0.1:19101/readyz
  wait_http http://127.0.0.1:19102/readyz
}
recorder_drained() { # waits (at most 120 s) until the split recorder has nothing pending
  local pending started=$SECONDS
  for _ in $(seq 1200); do
    pending=$(curl -fs -m 1 http://127.0.0.1:19102/metrics | awk '/^pgws_recorder_pending_messages /{print $2}')
    if [[ ${pending:-1} == 0 ]]; then
      say "the recorder drained the audit stream $((SECONDS - started)) s after the load ended" |&
        tee -a "$OUT/report.txt"
      return 0
    fi
    sleep 0.1
  done
  say "the recorder still has ${pending:-?} records pending after 120 s"
}
start_gateway() { # i [binary]
  start "gw$1" env PGWS_PORT=$((GW_PORT + $1)) PGWS_ADMIN_PORT=$((19110 + $1)) "${2:-${GATEWAY_BIN:-$BIN/ws-gateway}}"
  wait_http "http://127.0.0.1:$((19110 + $1))/readyz"
}
start_one() { # [binary]; ONE_ENV applies without one
  local extra=()
  [[ -z ${1:-} && -n ${ONE_ENV:-} ]] && read -ra extra <<<"$ONE_ENV"
  start one env -u PGWS_NATS_URL "${extra[@]}" PGWS_AUDIT="${ONE_AUDIT:-true}" PGWS_NATS_PREFIX="${RUN}one" PGWS_LISTEN_CHANNEL="$ONE_LISTEN" \
    PGWS_PORT=$ONE_PORT PGWS_ADMIN_PORT=19150 "${1:-$BIN/pgws}"
  wait_http http://127.0.0.1:19150/readyz
}
start_nats() {
  cat >"$LOGS/nats.conf" <<CONF
listen: 127.0.0.1:$NATS_CLIENT_PORT
max_connections: 200000
websocket {
  host: 127.0.0.1
  port: $NATS_WS_PORT
  no_tls: true
  compression: false
}
CONF
  start nats /usr/sbin/nats-server -c "$LOGS/nats.conf"
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$NATS_WS_PORT") 2>/dev/null && return 0
    sleep 0.1
  done
  say "nats-server did not start"
  cat "$LOGS/nats.log" >&2
  exit 1
}
start_node() {
  start node env PORT=$NODE_PORT PGWS_LISTEN_CHANNEL="$NODE_LISTEN" node bench/node/server.js
  wait_http "http://127.0.0.1:$NODE_PORT/"
}
url() { # target -> websocket base URL
  case $1 in
    pgws | base) echo "ws://127.0.0.1:$GW_PORT" ;;
    nats) echo "ws://127.0.0.1:$NATS_WS_PORT" ;;
    node) echo "ws://127.0.0.1:$NODE_PORT" ;;
    one | onebase) echo "ws://127.0.0.1:$ONE_PORT" ;;
  esac
}
pid_of() { # target -> pid of its server (pgws: and of its NATS when BUS_PID is set)
  case $1 in
    pgws) echo "${PID[gw0]}${BUS_PID:+,$BUS_PID}" ;;
    base) echo "${PID[gw0]}" ;;
    nats) echo "${PID[nats]}" ;;
    node) echo "${PID[node]}" ;;
    one | onebase) echo "${PID[one]}" ;;
  esac
}
start_target() {
  case $1 in
    pgws) start_gateway 0 ;;
    base) start_gateway 0 "$BASE_GATEWAY_BIN" ;;
    nats) start_nats ;;
    node) start_node ;;
    one) start_one ;;
    onebase) start_one "$BASE_ONE_BIN" ;;
  esac
}
stop_target() {
  case $1 in
    pgws | base) stop gw0 ;;
    nats) stop nats ;;
    node) stop node ;;
    one | onebase) stop one ;;
  esac
}
load() { # target, json name, mode and options...
  local target=$1 name=$2
  shift 2
  local listen=$PGWS_LISTEN_CHANNEL kind=$target
  [[ $target == node ]] && listen=$NODE_LISTEN
  [[ $target == one || $target == onebase ]] && listen=$ONE_LISTEN && kind=pgws
  [[ $target == base ]] && kind=pgws
  say "run $name: pgws-load $* --target $target"
  "$LOAD" "$@" --target "$kind" --gateways "$(url "$target")" --gateway-pid "$(pid_of "$target")" \
    --listen-channel "$listen" --nats-url "nats://127.0.0.1:$NATS_CLIENT_PORT" \
    --label "$name" --json "$OUT/$name.json" ${LOAD_ARGS:-} | tee -a "$OUT/report.txt"
}

say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB; $(uptime)"
(cd bench/node && npm ci --no-audit --no-fund --silent)
start_bridge

for phase in $PHASES; do
  case $phase in
    idle)
      for target in pgws nats node; do
        for n in $IDLE_COUNTS; do
          start_target "$target"
          sleep 1
          load "$target" "idle-$target-$n" idle --sockets "$n" --hold 3 || true
          stop_target "$target"
        done
      done
      ;;
    fanout)
      for target in pgws nats node; do
        start_target "$target"
        for r in $FANOUT_RATES; do
          load "$target" "fanout-$target-$FANOUT_SOCKETS-r$r" fanout --channels 1 \
            --subscribers "$FANOUT_SOCKETS" --rate "$r" --seconds "$SECS" || true
        done
        stop_target "$target"
      done
      ;;
    mixed)
      start_target pgws
      for r in $MIXED_RATES; do
        load pgws "mixed-pgws-$MIXED_CHANNELS-r$r" fanout --channels "$MIXED_CHANNELS" \
          --subscribers "$MIXED_SUBSCRIBERS" --rate "$r" --seconds "$SECS" || true
      done
      stop_target pgws
      ;;
    busy)
      for ((run = 1; run <= BUSY_RUNS; run++)); do
        for target in $BUSY_TARGETS ${BASE_GATEWAY_BIN:+base}; do
          start_target "$target"
          for r in $BUSY_RATES; do
            load "$target" "busy-$target-${BUSY_CHANNELS}x$BUSY_SUBSCRIBERS-r$r-run$run" fanout \
              --channels "$BUSY_CHANNELS" --subscribers "$BUSY_SUBSCRIBERS" --rate "$r" \
              --seconds "$SECS" || true
          done
          stop_target "$target"
        done
      done
      ;;
    ingest)
      start_target pgws
      load pgws "ingest-pgws-$INGEST_SOCKETS" ingest --sockets "$INGEST_SOCKETS" --seconds "$SECS" --drain 120 --quiet 5 || true
      # The same load with PGWS_NOTIFY_DEDUP=false (at-least-once requests, no key table):
      # what executing each request at most once costs.
      stop bridge recorder
      export PGWS_NOTIFY_DEDUP=false
      start_bridge
      load pgws "ingest-pgws-$INGEST_SOCKETS-nodedup" ingest --sockets "$INGEST_SOCKETS" --seconds "$SECS" --drain 120 --quiet 5 || true
      stop bridge recorder
      unset PGWS_NOTIFY_DEDUP
      start_bridge
      stop_target pgws
      ;;
    pubsub)
      # wspubsub frames travel publisher -> gateway -> NATS -> gateway -> subscribers: the
      # stack's NATS is measured with the gateway (nats-server does it all in one process).
      BUS_PID=$(ss -Hltnp "sport = :${PGWS_NATS_URL##*:}" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
      [[ -n $BUS_PID ]] || say "the stack's NATS process was not found: gateway CPU only"
      for target in pgws nats; do
        start_target "$target"
        for shape in "1 $PUBSUB_SOCKETS $PUBSUB_RATES" \
          "$PUBSUB_TOPICS $PUBSUB_TOPIC_SUBSCRIBERS $PUBSUB_TOPIC_RATES"; do
          read -r topics subs rates <<<"$shape"
          for r in $rates; do
            load "$target" "pubsub-$target-${topics}x$subs-r$r" pubsub --topics "$topics" \
              --subscribers "$subs" --rate "$r" --seconds "$SECS" --quiet "$PUBSUB_QUIET" || true
          done
        done
        stop_target "$target"
      done
      BUS_PID=
      ;;
    one)
      # The split stack's CPU is its gateway's, its bridge's, its recorder's and its NATS's.
      nats_pid=$(ss -Hltnp "sport = :${PGWS_NATS_URL##*:}" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
      [[ -n $nats_pid ]] || say "the stack's NATS process was not found: its CPU is not counted"
      for ((run = 1; run <= ONE_RUNS; run++)); do
        for target in pgws one ${BASE_ONE_BIN:+onebase}; do
          [[ $target == pgws ]] && BUS_PID="${PID[bridge]},${PID[recorder]}${nats_pid:+,$nats_pid}"
          start_target "$target"
          load "$target" "one-$target-fanout-$FANOUT_SOCKETS-r$ONE_RATE-run$run" fanout --channels 1 \
            --subscribers "$FANOUT_SOCKETS" --rate "$ONE_RATE" --seconds "$SECS" || true
          load "$target" "one-$target-ingest-$INGEST_SOCKETS-run$run" ingest \
            --sockets "$INGEST_SOCKETS" --seconds "$SECS" --drain 120 --quiet 5 || true
          # The split recorder drains the stream behind the ingest: the next run starts after.
          [[ $target == pgws ]] && recorder_drained
          stop_target "$target"
          BUS_PID=
        done
      done
      # RSS per idle socket: the process that holds the sockets (ONE_IDLE=0: skipped).
      [[ $ONE_IDLE -gt 0 ]] && for target in pgws one; do
        start_target "$target"
        sleep 1
        load "$target" "one-$target-idle-$ONE_IDLE" idle --sockets "$ONE_IDLE" --hold 3 || true
        stop_target "$target"
      done
      ;;
    history)
      nats_pid=$(ss -Hltnp "sport = :${PGWS_NATS_URL##*:}" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
      [[ -n $nats_pid ]] || say "the stack's NATS process was not found: its CPU is not counted"
      for ((run = 1; run <= HISTORY_RUNS; run++)); do
        for mode in off on resume; do
          stop bridge recorder
          if [[ $mode == off ]]; then export PGWS_HISTORY_SECONDS=0; else unset PGWS_HISTORY_SECONDS; fi
          start_bridge
          BUS_PID="${PID[bridge]}${nats_pid:+,$nats_pid}"
          start_target pgws
          # The bridge makes the history stream in the background: give it a moment.
          sleep 1
          extra=()
          [[ $mode == resume ]] && extra=(--resume)
          load pgws "history-$mode-fanout-$FANOUT_SOCKETS-r$ONE_RATE-run$run" fanout --channels 1 \
            --subscribers "$FANOUT_SOCKETS" --rate "$ONE_RATE" --seconds "$SECS" "${extra[@]}" || true
          if [[ $mode != resume ]]; then
            load pgws "history-$mode-ingest-$INGEST_SOCKETS-run$run" ingest \
              --sockets "$INGEST_SOCKETS" --seconds "$SECS" --drain 120 --quiet 5 || true
            recorder_drained
          fi
          stop_target pgws
          BUS_PID=
        done
      done
      unset PGWS_HISTORY_SECONDS
      stop bridge recorder
      start_bridge
      ;;
    one-noaudit)
      for ((run = 1; run <= ONE_RUNS; run++)); do
        for audit in false true; do
          ONE_AUDIT=$audit start_target one
          load one "one-one-ingest-audit$audit-$INGEST_SOCKETS-run$run" ingest \
            --sockets "$INGEST_SOCKETS" --seconds "$SECS" --drain 120 --quiet 5 || true
          stop_target one
        done
      done
      ;;
    big)
      urls=()
      for ((i = 0; i < BIG_GATEWAYS; i++)); do
        start_gateway "$i"
        urls+=("ws://127.0.0.1:$((GW_PORT + i))")
      done
      pids=$(for ((i = 0; i < BIG_GATEWAYS; i++)); do echo "${PID[gw$i]}"; done | paste -sd,)
      say "run big: $BIG_SOCKETS sockets over $BIG_GATEWAYS gateways"
      "$LOAD" fanout --channels 1 --subscribers "$BIG_SOCKETS" --rate 1 --seconds 3 \
        --gateways "$(IFS=,; echo "${urls[*]}")" --gateway-pid "$pids" --concurrency 128 \
        --drain 60 --label "big-pgws-$BIG_SOCKETS" --json "$OUT/big-pgws-$BIG_SOCKETS.json" |
        tee -a "$OUT/report.txt" || true
      for ((i = 0; i < BIG_GATEWAYS; i++)); do stop "gw$i"; done
      ;;
    *) say "unknown phase $phase" ;;
  esac
done

python3 bench/plot.py --ratios "$OUT"
say "reports in $OUT (plots: python3 bench/plot.py $OUT docs/img)"
