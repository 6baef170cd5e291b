#!/usr/bin/env bash
# stack.sh: the one command that starts the whole pgws stack locally. It touches nothing it did
# not create: a database of yours is used as it is, never reconfigured or restarted.
#   1. loads the env file (default deploy/sample.env; `set -a; . file; set +a`); PGWS_DB_URI and
#      PGWS_NATS_URL set in the environment win over the env file's
#   2. the database:
#      - PGWS_DB_URI set (in the environment or the env file): that database, as it is. It must
#        answer; its wal_level is checked (/live table topics need logical: without it the
#        stack stops when PGWS_TABLE_TOPICS is set, and goes on with a warning otherwise).
#      - otherwise the stack's own PostgreSQL cluster in .stack/pg: made on first use by the
#        installed PostgreSQL's initdb (as the OS user postgres when run as root; the server
#        programs are installed by `scripts/ensure-services.sh --postgres-binaries` when
#        missing), listening on 127.0.0.1:STACK_PG_PORT only, trust auth, wal_level=logical;
#        started with the stack and stopped when it stops, its data kept for the next start.
#   3. NATS only with --split, or when PGWS_NATS_URL is set in the environment:
#      `scripts/ensure-services.sh --nats` (NATS with JetStream on 127.0.0.1:4222, started if
#      absent and left running) when the URL is that local default; any other URL is used as
#      it is.
#   4. cargo build --release -p pgws -p pgws-token (--split: pg-bridge, pg-recorder and
#      ws-gateway instead of pgws; binaries in ${CARGO_TARGET_DIR:-target}/release), then
#      starts pgws (--split: pg-bridge, pg-recorder and ws-gateway) in the background from the
#      repository root, logs in .stack/<name>.log
#   5. waits for each admin /readyz (pgws: PGWS_ADMIN_PORT, default 9100; --split: gateway
#      :9100, bridge :9101, recorder :9102), prints the demo page's URL with a sample token
#      (made by the pgws-token just built), then runs until Ctrl-C / SIGTERM, which stops it
#      all (the services, then the stack's own PostgreSQL cluster).
# Everything must become ready; if a process exits or never gets ready, the stack stops with its log.
#
# Usage: scripts/stack.sh [--split] [--check [--browser]] [ENV_FILE]
#   (default) pgws: the gateway, the bridge and the recorder in one process, talking over an
#             in-process bus (no NATS). The env file's PGWS_NATS_URL is not used; set
#             PGWS_NATS_URL in the environment to run pgws over NATS.
#   --split   the three services ws-gateway, pg-bridge and pg-recorder, talking over NATS.
#   --check   start everything, wait until ready, check the demo page and a websocket round
#             trip (two sockets on channel chat), stop everything; exit 0 if all passed.
#   --browser with --check: also run the real-browser test tests/browser/demo.mjs (after
#             scripts/browser-test-setup.sh, which installs chromium / playwright-core if missing).
# The bridge connects as the database role pgws_bridge (not a superuser), set up by
# deploy/bridge-role.sql as PGWS_DB_URI's user, password in .stack/bridge-db-password. pgws
# reads one PGWS_DB_URI for all its roles: it connects as pgws_bridge, to which
# deploy/bridge-role.sql then hands the audit schema pgws_audit too, unless
# PGWS_RECORDER_DISPATCHER names a function of yours; then as PGWS_DB_URI's user (it says
# which, and why).
# Env:   STACK_READY_TIMEOUT  seconds to wait for each service's /readyz (default 60)
#        STACK_PG_PORT        the port of the stack's own PostgreSQL cluster (default 54329)
#        PGWS_DB_URI          your database (see 2.)
#        PGWS_BRIDGE_DB_URI   the bridge's database URI, used as it is (default: PGWS_DB_URI's
#                             server and database as the role pgws_bridge); pgws uses it too
#        PGWS_NATS_URL        (in the environment) pgws talks over NATS
set -euo pipefail

say() { printf 'stack: %s\n' "$*" >&2; }
warn() { printf 'stack: WARNING: %s\n' "$*" >&2; }
die() { printf 'stack: ERROR: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

CHECK=0
BROWSER=0
SPLIT=0
ENV_ARG=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --check) CHECK=1 ;;
    --browser) BROWSER=1 ;;
    --split) SPLIT=1 ;;
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

# The stack's own PostgreSQL cluster (when PGWS_DB_URI is not given): scripts/lib/pg-cluster.sh
# makes, starts and stops it (PGC_STARTED is set once this run starts it: it stops it at the end).
# shellcheck source=scripts/lib/pg-cluster.sh
. "$ROOT/scripts/lib/pg-cluster.sh"
PGC_ROOT=$ROOT
PGC_PORT=${STACK_PG_PORT:-54329}
if ! [[ $PGC_PORT =~ ^[0-9]{1,5}$ ]] || ((PGC_PORT < 1 || PGC_PORT > 65535)); then
  die "STACK_PG_PORT must be a port number, not '$PGC_PORT'"
fi
PGC_DIR=$STATE_DIR/pg
PGC_SHOWN=.stack/pg
PGC_WHOSE="the stack's"
pgc_paths

# What the user set in the environment, before the env file is loaded.
ENV_DB_URI=${PGWS_DB_URI:-}
ENV_NATS_URL=${PGWS_NATS_URL:-}

if [[ $SPLIT -eq 1 ]]; then
  # service name -> admin port (each service's built-in default; see deploy/sample.env)
  SERVICES=(pg-bridge pg-recorder ws-gateway)
  declare -A ADMIN_PORT=([ws-gateway]=9100 [pg-bridge]=9101 [pg-recorder]=9102)
else
  SERVICES=(pgws)
  declare -A ADMIN_PORT=() # PGWS_ADMIN_PORT, read below
fi
# built beside them: prints the sample token
TOOLS=(pgws-token)
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
  fi
  pgc_stop
  [[ ${#PID[@]} -gt 0 ]] && say "stopped"
  exit "$rc"
}
trap on_exit EXIT
trap 'say "signal received"; exit 0' INT TERM

log_tail() {
  local file=$1
  printf -- '----- last lines of %s -----\n' "$file" >&2
  tail -n 30 "$file" >&2 || true
  printf -- '-----\n' >&2
}

port_busy() { pgc_port_busy "$1"; }

# A URI with its password hidden, for messages.
redact() { sed -E 's#^([a-z]+://[^:@/]*):[^@/]*@#\1:***@#' <<<"$1"; }

# ---------------------------------------------------------------- configuration
say "loading $ENV_FILE"
set -a
# shellcheck disable=SC1090 # the env file is chosen at run time
. "$ENV_FILE"
set +a
# The environment's database and NATS win over the env file's.
[[ -n $ENV_DB_URI ]] && PGWS_DB_URI=$ENV_DB_URI
[[ -n $ENV_NATS_URL ]] && PGWS_NATS_URL=$ENV_NATS_URL

if [[ $SPLIT -eq 1 ]]; then
  if [[ -n ${PGWS_ADMIN_PORT:-} ]]; then
    warn "PGWS_ADMIN_PORT=$PGWS_ADMIN_PORT is ignored: the three services share this host, each" \
      "uses its own admin port (gateway 9100, bridge 9101, recorder 9102)"
    unset PGWS_ADMIN_PORT
  fi
  USE_NATS=1
  export PGWS_NATS_URL=${PGWS_NATS_URL:-nats://127.0.0.1:4222}
else
  ADMIN_PORT[pgws]=${PGWS_ADMIN_PORT:-9100}
  if [[ -n $ENV_NATS_URL ]]; then
    USE_NATS=1
    say "PGWS_NATS_URL is set in the environment: pgws talks over NATS ($(redact "$PGWS_NATS_URL"))"
  else
    # The env file's NATS URL is for --split: one pgws needs no NATS (in-process bus).
    USE_NATS=0
    unset PGWS_NATS_URL
  fi
fi
ADMIN_HOST=${PGWS_ADMIN_HOST:-127.0.0.1}
case $ADMIN_HOST in
  0.0.0.0) ADMIN_HOST=127.0.0.1 ;;
  :: | "[::]") ADMIN_HOST="[::1]" ;;
  *:*) [[ $ADMIN_HOST == \[* ]] || ADMIN_HOST="[$ADMIN_HOST]" ;;
esac
WS_PORT=${PGWS_PORT:-3000}

for port in "$WS_PORT" "${ADMIN_PORT[@]}"; do
  if port_busy "$port"; then
    die "port $port is already in use on 127.0.0.1 (another stack still running? try" \
      "'ss -ltnp | grep :$port')"
  fi
done

# ---------------------------------------------------------------- the database
OWN_PG=0
if [[ -n ${PGWS_DB_URI:-} ]]; then
  # Yours: used as it is. Never started, reconfigured or restarted from here.
  ADMIN_DB_URI=$PGWS_DB_URI
  if [[ $ADMIN_DB_URI == @* ]]; then # PGWS_DB_URI=@path: the URI is in that file
    ADMIN_DB_URI=$(<"${ADMIN_DB_URI#@}") || die "cannot read PGWS_DB_URI's file ${PGWS_DB_URI#@}"
    ADMIN_DB_URI=${ADMIN_DB_URI//[$'\r\n']/}
  fi
  [[ $ADMIN_DB_URI == *://* ]] || die "PGWS_DB_URI is not a URI (postgres://...)"
  command -v psql >/dev/null 2>&1 ||
    die "psql is needed to check PGWS_DB_URI and set up the role pgws_bridge (package postgresql-client)"
  say "database: PGWS_DB_URI ($(redact "$ADMIN_DB_URI")), used as it is"
  WAL_LEVEL=$(psql -w -X -q -At -c 'show wal_level' "$ADMIN_DB_URI" 2>&1) ||
    die "cannot connect with PGWS_DB_URI ($(redact "$ADMIN_DB_URI")): $WAL_LEVEL" \
      "-- stack.sh does not start or configure a database it did not create: start it, fix" \
      "the URI, or unset PGWS_DB_URI to run the stack's own cluster (.stack/pg)"
  if [[ $WAL_LEVEL != logical ]]; then
    fix="ALTER SYSTEM SET wal_level = logical as a superuser, then restart that PostgreSQL (on a Debian cluster: pg_ctlcluster <version> main restart, or scripts/ensure-services.sh --reconfigure-postgres for the local 15/main); or unset PGWS_DB_URI to run the stack's own cluster, which has it"
    if [[ -n ${PGWS_TABLE_TOPICS:-} ]]; then
      die "wal_level is '$WAL_LEVEL' on PGWS_DB_URI's server, and PGWS_TABLE_TOPICS is set: /live" \
        "table topics need wal_level=logical. stack.sh leaves that server as it is; fix: $fix"
    fi
    warn "wal_level is '$WAL_LEVEL' on PGWS_DB_URI's server: /live table topics would need" \
      "wal_level=logical (going on: PGWS_TABLE_TOPICS is not set). Left as it is; to enable: $fix"
  fi
else
  OWN_PG=1
  if [[ -s $PGC_DATA/PG_VERSION ]]; then
    # Reused: run by the programs of the major version that made it.
    pgc_bin_of_data
  else
    pgc_bin_installed ||
      die "no PostgreSQL server programs to run the stack's own cluster (see above); or set" \
        "PGWS_DB_URI to a database of yours"
  fi
  if ! command -v psql >/dev/null 2>&1; then
    [[ -x $PGC_BIN/psql ]] || die "psql not found (package postgresql-client)"
    psql() { "$PGC_BIN/psql" "$@"; }
  fi
  pgc_check_user
  ADMIN_DB_URI=postgres://postgres@127.0.0.1:$PGC_PORT/postgres
  export PGWS_DB_URI=$ADMIN_DB_URI
  say "database: the stack's own PostgreSQL cluster (.stack/pg, 127.0.0.1:$PGC_PORT," \
    "$("$PGC_BIN/pg_ctl" --version | sed 's/^pg_ctl (PostgreSQL) /PostgreSQL /'))"

  pgc_make_dir ||
    die "the OS user postgres cannot reach $PGC_DIR (${PGC_BLOCKED:-a parent directory} is not" \
      "searchable by it, e.g. a clone under /root): clone the repository elsewhere, allow it" \
      "(chmod o+x ${PGC_BLOCKED:-<that directory>}), or set PGWS_DB_URI to a database of yours"
  if [[ -s $PGC_DATA/PG_VERSION ]]; then
    pgc_stop_leftover
    say "reusing the stack's PostgreSQL cluster in .stack/pg"
  else
    pgc_initdb "scripts/stack.sh: the pgws stack's own cluster"
  fi
  if port_busy "$PGC_PORT"; then
    die "port $PGC_PORT (for the stack's PostgreSQL cluster) is already in use on 127.0.0.1" \
      "(see 'ss -ltnp | grep :$PGC_PORT'); set STACK_PG_PORT to a free port"
  fi
fi

# ---------------------------------------------------------------- NATS
if [[ $USE_NATS -eq 1 ]]; then
  if [[ $PGWS_NATS_URL =~ ^(nats://)?(127\.0\.0\.1|localhost)(:4222)?/?$ ]]; then
    "$ROOT/scripts/ensure-services.sh" --nats || die "NATS is not available (see above)"
  else
    say "NATS: $(redact "$PGWS_NATS_URL"), used as it is (not started here)"
  fi
fi

# ---------------------------------------------------------------- build
if [[ $SPLIT -eq 1 ]]; then
  PACKAGES=(-p pg-bridge -p pg-recorder -p ws-gateway -p pgws-token)
else
  PACKAGES=(-p pgws -p pgws-token)
fi
say "building: cargo build --release ${PACKAGES[*]}"
cargo build --release "${PACKAGES[@]}" || die "cargo build failed"
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
BIN_DIR=$TARGET_DIR/release
for name in "${SERVICES[@]}" "${TOOLS[@]}"; do
  [[ -x $BIN_DIR/$name ]] || die "$BIN_DIR/$name was not built"
done

# ---------------------------------------------------------------- start the stack's cluster
mkdir -p "$STATE_DIR"
if [[ $OWN_PG -eq 1 ]]; then
  pgc_start
  psql -w -X -q -At -c 'select 1' "$ADMIN_DB_URI" >/dev/null ||
    die "cannot connect to the stack's cluster at $ADMIN_DB_URI"
fi

# ---------------------------------------------------------------- the bridges' database role
# pg-bridge connects as pgws_bridge, not as PGWS_DB_URI's user (a superuser on a local
# cluster): a token can then act only as the roles granted to pgws_bridge. PGWS_DB_URI's
# user runs deploy/bridge-role.sql (creates the role, or hands it the schemas the bridges
# keep) and the bridge gets PGWS_DB_URI with pgws_bridge's login (a password kept in
# .stack/bridge-db-password). PGWS_BRIDGE_DB_URI set: the bridge uses it as it is.
BRIDGE_AS_ROLE=0
if [[ -n ${PGWS_BRIDGE_DB_URI:-} ]]; then
  BRIDGE_DB_URI=$PGWS_BRIDGE_DB_URI
else
  PASSWORD_FILE=$STATE_DIR/bridge-db-password
  if [[ ! -s $PASSWORD_FILE ]]; then
    (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$PASSWORD_FILE")
  fi
  BRIDGE_PASSWORD=$(cat "$PASSWORD_FILE")
  # pgws (one process): its recorder writes the audit on the bridge's connection, so the
  # audit schema is handed to pgws_bridge too (a --split recorder may have made it).
  audit_to_bridge=()
  [[ $SPLIT -eq 0 ]] && audit_to_bridge=(-v audit_to_bridge=1)
  psql -X -q -w -d "$ADMIN_DB_URI" -v bridge_password="$BRIDGE_PASSWORD" \
    -v keys_table="${PGWS_PUBSUB_KEYS_TABLE:-apikeys}" "${audit_to_bridge[@]}" \
    -f "$ROOT/deploy/bridge-role.sql" >/dev/null ||
    die "cannot set up the database role pgws_bridge as the user of PGWS_DB_URI" \
      "(deploy/bridge-role.sql needs a superuser or CREATEROLE); or set PGWS_BRIDGE_DB_URI"
  scheme=${ADMIN_DB_URI%%://*}
  rest=${ADMIN_DB_URI#*://}
  [[ $rest == *@* ]] && rest=${rest#*@}
  BRIDGE_DB_URI=$scheme://pgws_bridge:$BRIDGE_PASSWORD@$rest
  BRIDGE_AS_ROLE=1
fi

# pgws reads one PGWS_DB_URI for its three roles, so its recorder works as the bridge's role
# too. pgws_bridge may create schemas in the database, and deploy/bridge-role.sql hands it
# pgws_audit (audit_to_bridge, above), so the recorder makes and keeps the audit as
# pgws_bridge; but a PGWS_RECORDER_DISPATCHER function is yours (pgws_bridge may not be
# allowed what it does), and something of pgws_audit may still be another user's: in those
# cases pgws connects as PGWS_DB_URI's user, and says so.
PGWS_AS=""
if [[ $SPLIT -eq 0 ]]; then
  PGWS_URI=$BRIDGE_DB_URI
  PGWS_AS="the bridge's role (pgws_bridge)"
  [[ $BRIDGE_AS_ROLE -eq 1 ]] || PGWS_AS="PGWS_BRIDGE_DB_URI's user"
  audit_on=1
  case $(tr '[:upper:]' '[:lower:]' <<<"${PGWS_AUDIT:-true}" | tr -d '[:space:]') in
    false | 0 | no | off) audit_on=0 ;;
  esac
  if [[ $BRIDGE_AS_ROLE -eq 1 && $audit_on -eq 1 ]]; then
    reason=""
    if [[ -n ${PGWS_RECORDER_DISPATCHER:-} ]]; then
      reason="PGWS_RECORDER_DISPATCHER is set (a function of yours, which pgws_bridge may not be allowed to run)"
    else
      others=$(psql -X -q -w -At -d "$ADMIN_DB_URI" -c "
        SELECT string_agg(DISTINCT owner, ', ') FROM (
          SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'pgws_audit'
          UNION ALL
          SELECT pg_get_userbyid(c.relowner) FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgws_audit'
          UNION ALL
          SELECT pg_get_userbyid(p.proowner) FROM pg_proc p
            JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgws_audit'
        ) AS o(owner) WHERE owner <> 'pgws_bridge'") ||
        die "cannot read who owns the schema pgws_audit"
      [[ -z $others ]] || reason="the audit schema pgws_audit is (in part) $others's, not" \
        "pgws_bridge's, after deploy/bridge-role.sql handed it over"
    fi
    if [[ -n $reason ]]; then
      PGWS_URI=$ADMIN_DB_URI
      PGWS_AS="PGWS_DB_URI's user, not pgws_bridge"
    fi
  fi
  if [[ -n ${reason:-} ]]; then
    warn "pgws connects as PGWS_DB_URI's user, not as pgws_bridge, since its recorder (same" \
      "connection) could not work as pgws_bridge: $reason"
  else
    say "pgws connects as $PGWS_AS"
  fi
else
  [[ $BRIDGE_AS_ROLE -eq 1 ]] &&
    say "pg-bridge connects as the database role pgws_bridge (deploy/bridge-role.sql)"
fi

# ---------------------------------------------------------------- start
for name in "${SERVICES[@]}"; do
  : >"$STATE_DIR/$name.log"
  extra=()
  case $name in
    pg-bridge) extra=("PGWS_DB_URI=$BRIDGE_DB_URI") ;;
    pgws) extra=("PGWS_DB_URI=$PGWS_URI") ;;
  esac
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
      log_tail "$STATE_DIR/$name.log"
      die "$name exited with status $rc before it was ready"
    fi
    sleep 0.25
  done
  log_tail "$STATE_DIR/$name.log"
  die "$name is not ready after ${READY_TIMEOUT}s (http://$ADMIN_HOST:${ADMIN_PORT[$name]}/readyz)"
}

for name in "${SERVICES[@]}"; do
  wait_ready "$name"
done

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
    # shellcheck disable=SC2086 # node_cmd is "node" plus an optional flag
    if [[ -z $TOKEN ]]; then
      warn "check: no sample token (JWK secret); browser test skipped"
      failed=1
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
if [[ $SPLIT -eq 1 ]]; then
  WHAT="ws-gateway, pg-bridge and pg-recorder over NATS ($(redact "$PGWS_NATS_URL"))"
  ADMIN_LINE="gateway http://$ADMIN_HOST:9100  bridge http://$ADMIN_HOST:9101  recorder http://$ADMIN_HOST:9102"
  LOGS=".stack/ws-gateway.log .stack/pg-bridge.log .stack/pg-recorder.log"
  DB_AS="pg-bridge as pgws_bridge"
  [[ $BRIDGE_AS_ROLE -eq 1 ]] || DB_AS="pg-bridge as PGWS_BRIDGE_DB_URI's user"
else
  if [[ $USE_NATS -eq 1 ]]; then
    WHAT="pgws (one process) over NATS ($(redact "$PGWS_NATS_URL"))"
  else
    WHAT="pgws (one process, in-process bus, no NATS)"
  fi
  ADMIN_LINE="pgws http://$ADMIN_HOST:${ADMIN_PORT[pgws]}"
  LOGS=".stack/pgws.log"
  DB_AS="pgws as $PGWS_AS"
fi
if [[ $OWN_PG -eq 1 ]]; then
  DB_LINE="$ADMIN_DB_URI  (the stack's own cluster in .stack/pg, stopped with the stack)"
  LOGS="$LOGS .stack/pg/postgresql.log"
else
  DB_LINE="$(redact "$ADMIN_DB_URI")  (PGWS_DB_URI, yours)"
fi
cat <<EOF

  pgws stack is running: $WHAT (env: ${ENV_FILE#"$ROOT"/})
    demo page:      $PAGE_URL$PAGE_HASH
    sample token:   ${TOKEN:-(none)}   {"mode":"rw","channels":["${TOKEN_CHANNELS//,/\",\"}"],"sub":"demo"}, 24 h
                    more: $BIN_DIR/pgws-token --help
    websocket:      ws://localhost:$WS_PORT/chat/$TOKEN
    admin:          $ADMIN_LINE
                    (/healthz /readyz /metrics)
    database:       $DB_LINE
                    $DB_AS
    logs:           $LOGS
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
    log_tail "$STATE_DIR/$name.log"
    if [[ $name == pg-recorder ]]; then
      warn "pg-recorder exited (status $rc); the rest of the stack keeps running"
    else
      die "$name exited unexpectedly (status $rc)"
    fi
  done
done
