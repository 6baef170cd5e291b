#!/usr/bin/env bash
# stack.sh: the one command that starts the whole pgws stack locally.
#   1. loads the env file (default deploy/sample.env; `set -a; . file; set +a`)
#   2. scripts/ensure-services.sh  (PostgreSQL on 127.0.0.1:5432, NATS+JetStream on :4222)
#   3. cargo build --release --workspace  (binaries in ${CARGO_TARGET_DIR:-target}/release),
#      then starts pg-bridge, pg-recorder and ws-gateway in the background from the
#      repository root, logs in .stack/<service>.log
#   4. waits for each admin /readyz (gateway :9100, bridge :9101, recorder :9102), prints the
#      demo page's URL with a sample token (made by the pgws-token just built), then runs until
#      Ctrl-C / SIGTERM, which stops all three.
# Every service must become ready; if one exits or never gets ready, the stack stops with its log.
#
# Usage: scripts/stack.sh [--check [--browser]] [ENV_FILE]
#   --check   start everything, wait until ready, check the demo page and a websocket round
#             trip (two sockets on channel chat), stop everything; exit 0 if all passed.
#   --browser with --check: also run the real-browser test tests/browser/demo.mjs (after
#             scripts/browser-test-setup.sh, which installs chromium / playwright-core if missing).
# Env:   STACK_READY_TIMEOUT  seconds to wait for each service's /readyz (default 60)
#        PGWS_BRIDGE_DB_URI   the bridge's database URI (default: PGWS_DB_URI's server and
#                             database as the role pgws_bridge, set up by deploy/bridge-role.sql)
set -euo pipefail

say() { printf 'stack: %s\n' "$*" >&2; }
warn() { printf 'stack: WARNING: %s\n' "$*" >&2; }
die() { printf 'stack: ERROR: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

CHECK=0
BROWSER=0
ENV_ARG=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --check) CHECK=1 ;;
    --browser) BROWSER=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *)
      [[ -z $ENV_ARG ]] || die "only one env file can be given"
      [[ -f $1 ]] || die "env file not found: $1"
      # Resolve against the caller's directory before moving to the repository root.
      ENV_ARG=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
      ;;
  esac
  shift
done

[[ $BROWSER -eq 0 || $CHECK -eq 1 ]] || die "--browser only goes with --check"

cd "$(dirname "$0")/.."
ROOT=$PWD
ENV_FILE=${ENV_ARG:-$ROOT/deploy/sample.env}
[[ -f $ENV_FILE ]] || die "env file not found: $ENV_FILE"
STATE_DIR=$ROOT/.stack
READY_TIMEOUT=${STACK_READY_TIMEOUT:-60}

# service name -> admin port (each service's built-in default; see deploy/sample.env)
SERVICES=(pg-bridge pg-recorder ws-gateway)
# built beside them: prints the sample token
TOOLS=(pgws-token)
declare -A ADMIN_PORT=([ws-gateway]=9100 [pg-bridge]=9101 [pg-recorder]=9102)
declare -A PID=()

# ---------------------------------------------------------------- stopping
stop_all() {
  local name pid alive i
  for name in "${SERVICES[@]}"; do
    pid=${PID[$name]:-}
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for ((i = 0; i < 100; i++)); do # up to 10 s for a clean shutdown
    alive=0
    for name in "${SERVICES[@]}"; do
      pid=${PID[$name]:-}
      [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && alive=1
    done
    [[ $alive -eq 0 ]] && break
    sleep 0.1
  done
  for name in "${SERVICES[@]}"; do
    pid=${PID[$name]:-}
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
      warn "$name (pid $pid) did not stop within 10 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for name in "${SERVICES[@]}"; do
    pid=${PID[$name]:-}
    if [[ -n $pid ]]; then wait "$pid" 2>/dev/null || true; fi
    PID[$name]=""
  done
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ ${#PID[@]} -gt 0 ]]; then
    say "stopping the stack"
    stop_all
    say "stopped"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'say "signal received"; exit 0' INT TERM

log_tail() {
  local name=$1
  printf -- '----- last lines of %s -----\n' "$STATE_DIR/$name.log" >&2
  tail -n 30 "$STATE_DIR/$name.log" >&2 || true
  printf -- '-----\n' >&2
}

# ---------------------------------------------------------------- configuration
say "loading $ENV_FILE"
set -a
# shellcheck disable=SC1090 # the env file is chosen at run time
. "$ENV_FILE"
set +a
if [[ -n ${PGWS_ADMIN_PORT:-} ]]; then
  warn "PGWS_ADMIN_PORT=$PGWS_ADMIN_PORT is ignored: the three services share this host, each" \
    "uses its own admin port (gateway 9100, bridge 9101, recorder 9102)"
  unset PGWS_ADMIN_PORT
fi
ADMIN_HOST=${PGWS_ADMIN_HOST:-127.0.0.1}
case $ADMIN_HOST in
  0.0.0.0) ADMIN_HOST=127.0.0.1 ;;
  :: | "[::]") ADMIN_HOST="[::1]" ;;
  *:*) [[ $ADMIN_HOST == \[* ]] || ADMIN_HOST="[$ADMIN_HOST]" ;;
esac
WS_PORT=${PGWS_PORT:-3000}

# ---------------------------------------------------------------- services, build
# (after loading the env file, so the database login is checked with its PGWS_DB_URI)
"$ROOT/scripts/ensure-services.sh" || die "PostgreSQL / NATS are not available (see above)"

say "building: cargo build --release --workspace"
cargo build --release --workspace || die "cargo build failed"
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
BIN_DIR=$TARGET_DIR/release
for name in "${SERVICES[@]}" "${TOOLS[@]}"; do
  [[ -x $BIN_DIR/$name ]] || die "$BIN_DIR/$name was not built"
done

# ---------------------------------------------------------------- the bridges' database role
# pg-bridge connects as pgws_bridge, not as the env file's user (a superuser on a local
# cluster): a token can then act only as the roles granted to pgws_bridge. The env file's
# user runs deploy/bridge-role.sql (creates the role, or hands it the schemas the bridges
# keep) and the bridge gets PGWS_DB_URI with pgws_bridge's login (a password kept in
# .stack/bridge-db-password). PGWS_BRIDGE_DB_URI set: the bridge uses it as it is.
BRIDGE_ENV=()
if [[ -n ${PGWS_BRIDGE_DB_URI:-} ]]; then
  BRIDGE_ENV=("PGWS_DB_URI=$PGWS_BRIDGE_DB_URI")
else
  ADMIN_DB_URI=${PGWS_DB_URI:-postgres://postgres@127.0.0.1:5432/postgres}
  [[ $ADMIN_DB_URI == *://* ]] ||
    die "PGWS_DB_URI is not a URI (postgres://...): set PGWS_BRIDGE_DB_URI for the bridge"
  command -v psql >/dev/null 2>&1 ||
    die "psql is needed to set up the bridges' database role (or set PGWS_BRIDGE_DB_URI)"
  mkdir -p "$STATE_DIR"
  PASSWORD_FILE=$STATE_DIR/bridge-db-password
  if [[ ! -s $PASSWORD_FILE ]]; then
    (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$PASSWORD_FILE")
  fi
  BRIDGE_PASSWORD=$(cat "$PASSWORD_FILE")
  psql -X -q -w -d "$ADMIN_DB_URI" -v bridge_password="$BRIDGE_PASSWORD" \
    -v keys_table="${PGWS_PUBSUB_KEYS_TABLE:-apikeys}" -f "$ROOT/deploy/bridge-role.sql" >/dev/null ||
    die "cannot set up the database role pgws_bridge as the user of PGWS_DB_URI" \
      "(deploy/bridge-role.sql needs a superuser or CREATEROLE); or set PGWS_BRIDGE_DB_URI"
  scheme=${ADMIN_DB_URI%%://*}
  rest=${ADMIN_DB_URI#*://}
  [[ $rest == *@* ]] && rest=${rest#*@}
  BRIDGE_ENV=("PGWS_DB_URI=$scheme://pgws_bridge:$BRIDGE_PASSWORD@$rest")
  say "pg-bridge connects as the database role pgws_bridge (deploy/bridge-role.sql)"
fi

# ---------------------------------------------------------------- start
port_busy() {
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}
for port in "$WS_PORT" "${ADMIN_PORT[@]}"; do
  if port_busy "$port"; then
    die "port $port is already in use on 127.0.0.1 (another stack still running? try" \
      "'ss -ltnp | grep :$port')"
  fi
done

mkdir -p "$STATE_DIR"
for name in "${SERVICES[@]}"; do
  : >"$STATE_DIR/$name.log"
  extra=()
  [[ $name == pg-bridge ]] && extra=("${BRIDGE_ENV[@]}")
  env "${extra[@]}" "$BIN_DIR/$name" >>"$STATE_DIR/$name.log" 2>&1 &
  PID[$name]=$!
  say "started $name (pid ${PID[$name]}), log .stack/$name.log"
done

# ---------------------------------------------------------------- readiness
ready() {
  local code
  code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$ADMIN_HOST:${ADMIN_PORT[$1]}/readyz" || true)
  [[ $code == 200 ]]
}

# Returns when the service is ready; exits with its log tail if it stops or never gets ready.
wait_ready() {
  local name=$1 deadline rc
  deadline=$((SECONDS + READY_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ready "$name"; then
      say "$name is ready (http://$ADMIN_HOST:${ADMIN_PORT[$name]}/readyz)"
      return 0
    fi
    if ! kill -0 "${PID[$name]}" 2>/dev/null; then
      rc=0
      wait "${PID[$name]}" || rc=$?
      PID[$name]=""
      log_tail "$name"
      die "$name exited with status $rc before it was ready"
    fi
    sleep 0.25
  done
  log_tail "$name"
  die "$name is not ready after ${READY_TIMEOUT}s (http://$ADMIN_HOST:${ADMIN_PORT[$name]}/readyz)"
}

wait_ready pg-bridge
wait_ready pg-recorder
wait_ready ws-gateway

# ---------------------------------------------------------------- sample token
# A token for the demo page: channel chat and the meta channel, read and write, for a day,
# printed by pgws-token with the stack's PGWS_JWT_SECRET (--local: the public sample secret is
# fine here). None when the secret is a JWK/JWKS (pgws-token would need the private key).
META=${PGWS_META_CHANNEL:-}
TOKEN_CHANNELS=chat${META:+,$META}
TOKEN=$("$BIN_DIR/pgws-token" --channels "$TOKEN_CHANNELS" --mode rw --sub demo --exp 24h --local 2>"$STATE_DIR/pgws-token.err") || {
  warn "no sample token: $(cat "$STATE_DIR/pgws-token.err")"
  TOKEN=""
}
PAGE_URL="http://localhost:$WS_PORT/"
PAGE_HASH="#token=$TOKEN&channel=chat${META:+&meta=$META}&listen=${PGWS_LISTEN_CHANNEL:-postgres-websockets-listener}"

# ---------------------------------------------------------------- --check
websocket_node() {
  # Prints the node command line that has a global WebSocket, or nothing.
  if node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null; then
    echo node
  elif node --experimental-websocket -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null; then
    echo "node --experimental-websocket"
  fi
}

run_check() {
  local failed=0 code node_cmd
  code=$(curl -s -o "$STATE_DIR/index.html" -m 5 -w '%{http_code}' "http://127.0.0.1:$WS_PORT/" || true)
  if [[ $code == 200 ]] && grep -q 'pgws' "$STATE_DIR/index.html"; then
    say "check: demo page served (GET http://127.0.0.1:$WS_PORT/ -> 200)"
  else
    warn "check: GET http://127.0.0.1:$WS_PORT/ -> $code (expected 200 with the demo page)"
    failed=1
  fi

  if ! command -v node >/dev/null 2>&1; then
    warn "check: node not found; websocket round trip skipped"
  elif [[ -z $TOKEN ]]; then
    warn "check: no sample token (JWK secret); websocket round trip skipped"
  else
    node_cmd=$(websocket_node)
    if [[ -z $node_cmd ]]; then
      warn "check: this node has no WebSocket (needs >= 22, or 20 with --experimental-websocket); round trip skipped"
    else
      # shellcheck disable=SC2086 # node_cmd is "node" plus an optional flag
      if $node_cmd --no-warnings - "ws://127.0.0.1:$WS_PORT" "$TOKEN" <<'JS'; then
// Two sockets on channel chat: A sends a unique frame, both must get its envelope.
const [base, token] = process.argv.slice(2);
const text = `stack-check ${process.pid} ${Date.now()}`;
const fail = (msg) => { console.error(`stack: check: ${msg}`); process.exit(1); };
const timer = setTimeout(() => fail(`no echo of ${JSON.stringify(text)} within 10 s`), 10000);
const open = (url) => new Promise((resolve, reject) => {
  const ws = new WebSocket(url);
  ws.got = false;
  ws.onopen = () => resolve(ws);
  ws.onerror = () => reject(new Error(`cannot connect to ${url.replace(token, '<token>')}`));
  ws.onclose = (e) => { if (!ws.got) fail(`socket closed (${e.code} ${e.reason})`); };
  ws.onmessage = (e) => {
    let env;
    try { env = JSON.parse(e.data); } catch { return; }
    if (env.event === 'Error') fail(`gateway error: ${env.error}`);
    if (env.channel === 'chat' && env.payload === text) {
      ws.got = true;
      if (sockets.every((s) => s.got)) {
        clearTimeout(timer);
        console.error(`stack: check: websocket round trip ok (${sockets.length} sockets got the envelope)`);
        sockets.forEach((s) => s.close());
        process.exit(0);
      }
    }
  };
});
let sockets = [];
(async () => {
  try {
    sockets = [await open(`${base}/chat/${token}`), await open(`${base}/chat?token=${token}`)];
  } catch (err) { fail(err.message); }
  sockets[0].send(text);
})();
JS
        :
      else
        failed=1
      fi
    fi
  fi

  if [[ $BROWSER -eq 1 ]]; then
    if [[ -z $TOKEN ]]; then
      warn "check: no sample token (JWK secret); browser test skipped"
      failed=1
    # shellcheck disable=SC2086 # node_cmd is "node" plus an optional flag
    elif "$ROOT/scripts/browser-test-setup.sh" && node_cmd=$(websocket_node) && [[ -n $node_cmd ]] &&
      PGWS_BROWSER_SCREENSHOT=${PGWS_BROWSER_SCREENSHOT:-$STATE_DIR/browser.png} \
        $node_cmd "$ROOT/tests/browser/demo.mjs" "http://127.0.0.1:$WS_PORT" "$TOKEN"; then
      say "check: browser test passed"
    else
      warn "check: browser test failed"
      failed=1
    fi
  fi
  return "$failed"
}

if [[ $CHECK -eq 1 ]]; then
  rc=0
  run_check || rc=1
  if [[ $rc -eq 0 ]]; then say "check passed"; else say "check FAILED"; fi
  exit "$rc"
fi

# ---------------------------------------------------------------- running
cat <<EOF

  pgws stack is running (env: ${ENV_FILE#"$ROOT"/})
    demo page:      $PAGE_URL$PAGE_HASH
    sample token:   ${TOKEN:-(none)}   {"mode":"rw","channels":["${TOKEN_CHANNELS//,/\",\"}"],"sub":"demo"}, 24 h
                    more: $BIN_DIR/pgws-token --help
    websocket:      ws://localhost:$WS_PORT/chat/$TOKEN
    admin:          gateway http://$ADMIN_HOST:9100  bridge http://$ADMIN_HOST:9101  recorder http://$ADMIN_HOST:9102
                    (/healthz /readyz /metrics)
    logs:           .stack/ws-gateway.log .stack/pg-bridge.log .stack/pg-recorder.log
  Press Ctrl-C to stop.

EOF

# Run until a signal (the trap stops everything) or until a required service dies.
while true; do
  done_pid=""
  rc=0
  wait -n -p done_pid || rc=$?
  [[ -n $done_pid ]] || continue
  # On Ctrl-C the whole process group gets SIGINT: let our trap run first (it exits), so a
  # service that stopped on that same signal is not reported as a failure.
  sleep 0.5
  for name in "${SERVICES[@]}"; do
    [[ ${PID[$name]} == "$done_pid" ]] || continue
    PID[$name]=""
    log_tail "$name"
    if [[ $name == pg-recorder ]]; then
      warn "pg-recorder exited (status $rc); the rest of the stack keeps running"
    else
      die "$name exited unexpectedly (status $rc)"
    fi
  done
done
