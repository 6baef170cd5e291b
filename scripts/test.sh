#!/usr/bin/env bash
# The test command: format and lint checks, unit and property tests, and the end-to-end tests
# that start the real binaries against a real PostgreSQL and NATS, then a short run of every
# fuzz target (scripts/fuzz.sh, FUZZ_SECONDS each, 10 by default here). The JavaScript client's
# tests (clients/js, node's test runner) and the browser demo run against the same binaries.
#
# PostgreSQL: a cluster of the test command's own (scripts/lib/pg-cluster.sh, as scripts/stack.sh
# runs its own), made afresh by the installed PostgreSQL's initdb for each run (under a second;
# the server programs are installed by `scripts/ensure-services.sh --postgres-binaries` when
# missing), run as the OS user postgres when root, in PGWS_TEST_PG_DIR/<port>/data (outside the
# clone; its log beside it, kept until the next run on that port), listening on
# 127.0.0.1:<port> only, trust auth, wal_level=logical, room for the suite's parallel
# connections and replication slots, fsync off. It is started before the first phase and
# stopped when test.sh exits, also on failure or Ctrl-C. Every test uses it through
# PGWS_TEST_DB_URI (exported here; an outer value is replaced). The machine's own PostgreSQL
# (e.g. on 5432) is not touched. NATS: `scripts/ensure-services.sh --nats` (JetStream on
# 127.0.0.1:4222, started when absent and left running).
#
# Env:   CARGO_TARGET_DIR   default /var/tmp/pgws-target, outside the clone, so that repeated
#                           runs (and CI on a fresh clone) reuse the build
#        PGWS_TEST_PG_PORT  the cluster's port (default 54330; when unset and 54330 is taken,
#                           by another program or a test.sh running at the same time, the
#                           first free of 54331..54339)
#        PGWS_TEST_PG_DIR   where the clusters live (default /var/tmp/pgws-test-pg; the OS user
#                           postgres must reach it)
#        FUZZ_SECONDS       each fuzz target's run (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/pgws-target}"

say() { printf 'test.sh: %s\n' "$*" >&2; }
warn() { printf 'test.sh: WARNING: %s\n' "$*" >&2; }
die() { printf 'test.sh: ERROR: %s\n' "$*" >&2; exit 1; }
log_tail() {
  printf -- '----- last lines of %s -----\n' "$1" >&2
  tail -n 30 "$1" >&2 || true
  printf -- '-----\n' >&2
}

# shellcheck source=scripts/lib/pg-cluster.sh
. "$ROOT/scripts/lib/pg-cluster.sh"

# Each phase's time, printed as it ends and summed up at the end (where the time goes).
phases=()
phase_start=$SECONDS
phase() {
    local took=$((SECONDS - phase_start))
    phases+=("$(printf '%5d s  %s' "$took" "$1")")
    echo "test.sh: phase '$1' took ${took} s"
    phase_start=$SECONDS
}
on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  pgc_stop
  [[ -n ${PGC_PORT:-} ]] && rm -f "$PGC_DIR/owner.pid"
  if [[ ${#phases[@]} -gt 0 ]]; then
    echo "test.sh: time by phase:"
    printf "  %s\n" "${phases[@]}"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

# ---------------------------------------------------------------- the tests' PostgreSQL cluster
PGC_ROOT=$ROOT
PGC_WHOSE="the tests'"
PGC_NO_SYNC=1
PG_BASE=${PGWS_TEST_PG_DIR:-/var/tmp/pgws-test-pg}
[[ $PG_BASE == /* ]] || PG_BASE=$ROOT/$PG_BASE
if [[ -n ${PGWS_TEST_PG_PORT:-} ]]; then
  if ! [[ $PGWS_TEST_PG_PORT =~ ^[0-9]{1,5}$ ]] ||
    ((PGWS_TEST_PG_PORT < 1 || PGWS_TEST_PG_PORT > 65535)); then
    die "PGWS_TEST_PG_PORT must be a port number, not '$PGWS_TEST_PG_PORT'"
  fi
  PG_PORTS=("$PGWS_TEST_PG_PORT")
else
  PG_PORTS=(54330 54331 54332 54333 54334 54335 54336 54337 54338 54339)
fi
pgc_bin_installed || die "no PostgreSQL server programs to run the tests' cluster (see above)"
pgc_check_user
mkdir -p "$PG_BASE"

# "pid start-time" of a process (its start in clock ticks since boot: a pid taken again by
# another process does not match).
process_id() {
  local stat fields
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }                     # the fields after the command name
  read -r -a fields <<<"$stat"
  printf '%s %s\n' "$1" "${fields[19]}" # field 22 of stat: starttime
}
# Is the test.sh named in FILE (its process_id) still running? Its cluster is then in use.
owner_alive() {
  local owner pid
  owner=$(cat "$1" 2>/dev/null) || return 1
  pid=${owner%% *}
  [[ $pid =~ ^[0-9]+$ && $pid != "$$" ]] || return 1
  [[ $(process_id "$pid") == "$owner" ]]
}

PGC_PORT=""
for port in "${PG_PORTS[@]}"; do
  PGC_DIR=$PG_BASE/$port
  PGC_SHOWN=$PGC_DIR
  pgc_paths
  if owner_alive "$PGC_DIR/owner.pid"; then
    say "port $port: its cluster ($PGC_DIR) is in use by a test.sh running now (pid" \
      "$(cut -d' ' -f1 "$PGC_DIR/owner.pid"))"
    continue
  fi
  pgc_make_dir ||
    die "the OS user postgres cannot reach $PGC_DIR (${PGC_BLOCKED:-a parent directory} is not" \
      "searchable by it): allow it (chmod o+x ${PGC_BLOCKED:-<that directory>}), or set" \
      "PGWS_TEST_PG_DIR to a directory it can reach"
  process_id "$$" >"$PGC_DIR/owner.pid"
  # A cluster left running by a test.sh that was killed: it is ours, stop it.
  pgc_stop_leftover
  if pgc_port_busy "$port"; then
    say "port $port is in use on 127.0.0.1 by another program (see 'ss -ltnp | grep :$port')"
    rm -f "$PGC_DIR/owner.pid"
    continue
  fi
  PGC_PORT=$port
  break
done
[[ -n $PGC_PORT ]] || die "no port free for the tests' PostgreSQL cluster among ${PG_PORTS[*]};" \
  "set PGWS_TEST_PG_PORT to a free port"
# Afresh for each run: no database, slot or role of an earlier run is left.
rm -rf "$PGC_DATA" "$PGC_DIR/initdb.log" "$PGC_LOG"
pgc_initdb "scripts/test.sh: the tests' own cluster, made afresh for each run" \
  "# The suite runs tests in parallel: at least what a default cluster allows." \
  "max_connections = 200" \
  "max_replication_slots = 20" \
  "max_wal_senders = 20" \
  "# A throwaway cluster: no need to survive a crash." \
  "fsync = off" \
  "synchronous_commit = off" \
  "full_page_writes = off"
pgc_start
export PGWS_TEST_DB_URI=postgres://postgres@127.0.0.1:$PGC_PORT/postgres
# psql for the tests that run it (and this check): the server programs' own when none is on PATH.
command -v psql >/dev/null 2>&1 || export PATH=$PATH:$PGC_BIN
psql -w -X -q -At -c 'select 1' "$PGWS_TEST_DB_URI" >/dev/null ||
  die "cannot connect to the tests' cluster at $PGWS_TEST_DB_URI"
say "PostgreSQL: the tests' own cluster, PGWS_TEST_DB_URI=$PGWS_TEST_DB_URI" \
  "($("$PGC_BIN/pg_ctl" --version | sed 's/^pg_ctl (PostgreSQL) /PostgreSQL /'), $PGC_DIR)"
phase 'PostgreSQL cluster'

bash scripts/ensure-services.sh --nats
phase 'NATS'
# Chromium and playwright-core for the real-browser test.
bash scripts/browser-test-setup.sh
phase 'browser setup'
# docker-compose, to validate docker-compose.yml (tests/deploy/main.rs).
bash scripts/deploy-test-setup.sh
phase 'docker-compose setup'
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
phase 'fmt and clippy'
# The fuzz crate is outside the workspace; it is checked on stable too.
cargo fmt --manifest-path fuzz/Cargo.toml --check
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets --locked -- -D warnings
phase 'fuzz crate fmt and clippy'
# The end-to-end tests run the binaries of this build.
cargo build --workspace --all-targets --locked
phase 'build'
cargo test --workspace --locked
phase 'cargo test'
# The JavaScript client's tests, against the binaries just built.
(cd clients/js && npm test)
phase 'JavaScript client tests'
# The demo page, built on that client, in headless Chromium through a gateway restart.
node --experimental-websocket tests/browser/demo.mjs
phase 'browser demo'
cargo test --manifest-path fuzz/Cargo.toml --lib --locked
phase 'fuzz crate tests'
FUZZ_SECONDS="${FUZZ_SECONDS:-10}" bash scripts/fuzz.sh
phase 'fuzzing'
