#!/usr/bin/env bash
# ensure-services.sh: makes sure what the pgws tests and tools depend on answers locally:
#   - PostgreSQL on 127.0.0.1:5432, user postgres, trust auth (database postgres), with
#     wal_level=logical (the change capture of /live table topics reads the WAL through a
#     logical replication slot);
#   - NATS with JetStream on 127.0.0.1:4222.
# Idempotent and quick when both already answer (two probes, no changes). Otherwise it installs
# the missing Debian package(s) with apt-get and starts the server, then waits up to 15 s for
# it. Runs as root as is; as another user it needs sudo for the install/start steps.
# It never reconfigures or restarts a PostgreSQL cluster it did not create in this run unless
# asked to (--reconfigure-postgres): without that, a cluster whose wal_level is not logical is
# reported with the fix, and the run goes on.
# Exit status: 0 when what was asked for answers, non-zero (with the reason on stderr) otherwise.
#
# Usage: scripts/ensure-services.sh [--reconfigure-postgres] [MODE]     (from any directory)
#   (no MODE)             PostgreSQL and NATS, as above (the benchmarks' mode)
#   --postgres            only PostgreSQL
#   --nats                only NATS with JetStream (the test command's mode: it runs a
#                         PostgreSQL cluster of its own)
#   --postgres-binaries   only the PostgreSQL server programs (initdb, pg_ctl, postgres): installs
#                         the Debian package when they are missing (Debian's package then
#                         creates and starts its own cluster 'main' on 5432, which this mode
#                         does not touch further), and prints their directory on stdout.
#                         scripts/stack.sh and scripts/test.sh use it for the clusters they
#                         run (scripts/lib/pg-cluster.sh).
#   --reconfigure-postgres  allow setting wal_level=logical and max_slot_wal_keep_size=2GB on
#                         the local cluster (ALTER SYSTEM) and restarting it to apply them.
#                         A cluster this run created (package just installed) is configured
#                         without it.
# Env:   PGWS_DB_URI  if set, the connection check uses it instead of
#                     postgres://postgres@127.0.0.1:5432/postgres
#        ENSURE_RECONFIGURE_POSTGRES=1  the same as --reconfigure-postgres
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

MODE=all
RECONFIGURE=0
[[ ${ENSURE_RECONFIGURE_POSTGRES:-0} == 1 ]] && RECONFIGURE=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --reconfigure-postgres) RECONFIGURE=1 ;;
    --postgres) MODE=postgres ;;
    --nats) MODE=nats ;;
    --postgres-binaries) MODE=postgres-binaries ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; printf 'ensure-services: ERROR: unknown argument: %s\n' "$1" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."

PG_HOST=127.0.0.1
PG_PORT=5432
NATS_HOST=127.0.0.1
NATS_PORT=4222
NATS_BIN=/usr/sbin/nats-server
NATS_STORE=/var/lib/nats-server
NATS_LOG=/var/log/nats-server.log
# start-stop-daemon matches our instance by this pidfile, so a nats-server running elsewhere
# (another port, another user) does not make it skip the start.
NATS_PIDFILE=/run/pgws-nats-server.pid
WAIT_SECONDS=15
DEFAULT_DB_URI="postgres://postgres@${PG_HOST}:${PG_PORT}/postgres"

say() { printf 'ensure-services: %s\n' "$*" >&2; }
die() { printf 'ensure-services: ERROR: %s\n' "$*" >&2; exit 1; }

# Privileged commands: directly as root, through sudo otherwise.
if [[ $(id -u) -eq 0 ]]; then
  as_root() { "$@"; }
elif command -v sudo >/dev/null 2>&1; then
  as_root() { sudo "$@"; }
else
  as_root() { die "need root (or sudo) to run: $*"; }
fi

apt_updated=0
# Set when this run installed PostgreSQL or created its cluster: such a cluster may be
# configured (trust auth, wal_level) without --reconfigure-postgres.
PG_CREATED_NOW=0
apt_install() {
  if [[ $apt_updated -eq 0 ]]; then
    say "running apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q ||
      die "apt-get update failed"
    apt_updated=1
  fi
  say "installing Debian package(s): $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" ||
    die "apt-get install $* failed"
}

# ---------------------------------------------------------------- PostgreSQL
pg_ready() {
  command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2
}

# Can we log in (no password prompt) with the URI the stack will use?
pg_login_ok() {
  command -v psql >/dev/null 2>&1 || return 0 # no client to check with: assume yes
  psql -w -X -q -At -c 'select 1' "${PGWS_DB_URI:-$DEFAULT_DB_URI}" >/dev/null 2>&1
}

pg_version() {
  # The first installed major version, as the cluster tools name it (e.g. 15).
  local d
  for d in /etc/postgresql/*/; do
    [[ -d $d ]] && { basename "$d"; return 0; }
  done
  return 0
}

pg_trust_loopback() {
  local ver=$1 hba
  hba="/etc/postgresql/${ver}/main/pg_hba.conf"
  [[ -f $hba ]] || die "cannot configure trust auth: $hba not found"
  if as_root grep -qE '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
    return 0
  fi
  say "allowing trust auth for 127.0.0.1 and ::1 in $hba (local development only)"
  # First matching line wins in pg_hba.conf: put ours on top.
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload ||
    die "pg_ctlcluster $ver main reload failed"
}

ensure_postgres() {
  if pg_ready; then
    say "PostgreSQL answers on ${PG_HOST}:${PG_PORT}"
    pg_login_ok || die "PostgreSQL answers but login failed for ${PGWS_DB_URI:-$DEFAULT_DB_URI};" \
      "allow trust auth for 127.0.0.1 in pg_hba.conf or set PGWS_DB_URI (with a password)"
    return 0
  fi

  local ver
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [[ -z $(pg_version) ]]; then
    say "PostgreSQL is not installed"
    apt_install postgresql
    PG_CREATED_NOW=1
  fi
  ver=$(pg_version)
  [[ -n $ver ]] || die "PostgreSQL installed but /etc/postgresql has no version directory"
  if [[ ! -d /etc/postgresql/${ver}/main ]]; then
    say "creating cluster ${ver}/main"
    as_root pg_createcluster "$ver" main || die "pg_createcluster $ver main failed"
    PG_CREATED_NOW=1
  fi

  say "starting PostgreSQL cluster ${ver}/main"
  # Exit 2 means "already running" (e.g. the package's postinst started it): fine.
  local rc=0
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || rc=$?
  [[ $rc -eq 0 || $rc -eq 2 ]] || die "pg_ctlcluster $ver main start failed (exit $rc);" \
    "see /var/log/postgresql/postgresql-${ver}-main.log"

  local i
  for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
    pg_ready && break
    sleep 0.5
  done
  pg_ready || die "PostgreSQL did not answer on ${PG_HOST}:${PG_PORT} within ${WAIT_SECONDS}s;" \
    "see /var/log/postgresql/postgresql-${ver}-main.log"
  say "PostgreSQL answers on ${PG_HOST}:${PG_PORT}"

  if ! pg_login_ok; then
    if [[ $PG_CREATED_NOW -eq 1 && ${PGWS_DB_URI:-$DEFAULT_DB_URI} == "$DEFAULT_DB_URI" ]]; then
      pg_trust_loopback "$ver"
      sleep 0.5
      pg_login_ok || die "login as postgres on ${PG_HOST} still fails after enabling trust auth"
    else
      die "PostgreSQL answers but login failed for ${PGWS_DB_URI:-$DEFAULT_DB_URI};" \
        "allow trust auth for 127.0.0.1 in pg_hba.conf or set PGWS_DB_URI (with a password)"
    fi
  fi
}

# Table topics (/live) read committed changes through a logical replication slot: the server
# needs wal_level=logical, which only a restart applies. Only with --reconfigure-postgres (or
# on a cluster this run created) is the local cluster changed and restarted; otherwise a
# wal_level other than logical is reported with the fix.
ensure_logical_wal() {
  command -v psql >/dev/null 2>&1 || return 0
  local uri=${PGWS_DB_URI:-$DEFAULT_DB_URI} level ver keep may_change=0
  level=$(psql -w -X -q -At -c 'show wal_level' "$uri" 2>/dev/null) || return 0
  [[ $RECONFIGURE -eq 1 || $PG_CREATED_NOW -eq 1 ]] && may_change=1
  if [[ $uri == "$DEFAULT_DB_URI" && $may_change -eq 1 ]]; then
    # A slot nobody reads (no bridge running) keeps WAL: bound it, as the compose stack does.
    keep=$(psql -w -X -q -At -c 'show max_slot_wal_keep_size' "$uri" 2>/dev/null) || true
    if [[ $keep == -1 ]]; then
      say "setting max_slot_wal_keep_size=2GB (a replication slot holds at most that much WAL)"
      psql -w -X -q -c "ALTER SYSTEM SET max_slot_wal_keep_size = '2GB'" -c 'SELECT pg_reload_conf()' \
        "$uri" >/dev/null || die "cannot set max_slot_wal_keep_size"
    fi
  fi
  [[ $level == logical ]] && return 0
  ver=$(pg_version)
  if [[ $uri != "$DEFAULT_DB_URI" || -z $ver || ! -d /etc/postgresql/${ver}/main ]]; then
    say "WARNING: wal_level is '$level' on $uri; /live table topics need wal_level=logical" \
      "(ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)"
    return 0
  fi
  if [[ $may_change -eq 0 ]]; then
    say "WARNING: wal_level is '$level' on PostgreSQL cluster ${ver}/main; /live table topics" \
      "(and their tests) need wal_level=logical. Left as it is: to set it and restart the" \
      "cluster, run scripts/ensure-services.sh --reconfigure-postgres (or by hand:" \
      "psql -c 'ALTER SYSTEM SET wal_level = logical' $uri, then" \
      "pg_ctlcluster $ver main restart)"
    return 0
  fi
  say "setting wal_level=logical (was '$level') and restarting PostgreSQL cluster ${ver}/main"
  psql -w -X -q -c 'ALTER SYSTEM SET wal_level = logical' "$uri" ||
    die "cannot set wal_level=logical (ALTER SYSTEM needs a superuser)"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main restart ||
    die "pg_ctlcluster $ver main restart failed"
  local i
  for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
    pg_ready && break
    sleep 0.5
  done
  level=$(psql -w -X -q -At -c 'show wal_level' "$uri" 2>/dev/null) || true
  [[ $level == logical ]] || die "wal_level is still '$level' after the restart"
}

# The directory of the PostgreSQL server programs (the newest installed major version), or
# nothing.
pg_bindir() {
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]] || continue
    if [[ -z $best ]] || [[ $(printf '%s\n%s\n' "$best" "$d" | sort -V | tail -n 1) == "$d" ]]; then
      best=$d
    fi
  done
  if [[ -z $best ]] && command -v initdb >/dev/null 2>&1; then
    d=$(dirname "$(command -v initdb)")
    [[ -x $d/pg_ctl && -x $d/postgres ]] && best=$d
  fi
  [[ -n $best ]] && printf '%s\n' "$best"
  return 0
}

ensure_postgres_binaries() {
  local bin
  bin=$(pg_bindir)
  if [[ -z $bin ]]; then
    say "the PostgreSQL server programs (initdb, pg_ctl) are not installed"
    apt_install postgresql
    bin=$(pg_bindir)
    [[ -n $bin ]] || die "PostgreSQL installed but no initdb found under /usr/lib/postgresql/*/bin"
  fi
  printf '%s\n' "$bin"
}

# ---------------------------------------------------------------- NATS
port_open() {
  # shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# Prints the server's INFO line (the first thing a NATS server sends) or fails.
nats_info() {
  # shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2" && IFS= read -r line <&3 && printf "%s\n" "$line"' \
    _ "$NATS_HOST" "$NATS_PORT" 2>/dev/null
}

check_jetstream() {
  local info=$1
  if [[ $info != *'"jetstream":true'* ]]; then
    die "a server answers on ${NATS_HOST}:${NATS_PORT} but JetStream is not enabled;" \
      "restart it with -js (e.g. nats-server -a ${NATS_HOST} -p ${NATS_PORT} -js -sd ${NATS_STORE})"
  fi
}

ensure_nats() {
  local info
  if port_open "$NATS_HOST" "$NATS_PORT"; then
    info=$(nats_info) || info=""
    [[ $info == INFO* ]] ||
      die "something listens on ${NATS_HOST}:${NATS_PORT} but it does not speak NATS"
    check_jetstream "$info"
    say "NATS (JetStream) answers on ${NATS_HOST}:${NATS_PORT}"
    return 0
  fi

  if [[ ! -x $NATS_BIN ]]; then
    say "nats-server is not installed"
    apt_install nats-server
    [[ -x $NATS_BIN ]] || die "nats-server package installed but $NATS_BIN is missing"
  fi
  command -v start-stop-daemon >/dev/null 2>&1 || die "start-stop-daemon not found (package dpkg)"

  say "starting $NATS_BIN on ${NATS_HOST}:${NATS_PORT} with JetStream (store $NATS_STORE, log $NATS_LOG)"
  as_root mkdir -p "$NATS_STORE"
  as_root start-stop-daemon --start --oknodo --background \
    --pidfile "$NATS_PIDFILE" --make-pidfile --exec "$NATS_BIN" -- \
    -a "$NATS_HOST" -p "$NATS_PORT" -js -sd "$NATS_STORE" -l "$NATS_LOG" ||
    die "start-stop-daemon could not start $NATS_BIN"

  local i
  for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
    info=$(nats_info) && break
    sleep 0.5
  done
  [[ -n ${info:-} ]] || die "NATS did not answer on ${NATS_HOST}:${NATS_PORT} within ${WAIT_SECONDS}s;" \
    "see $NATS_LOG"
  check_jetstream "$info"
  say "NATS (JetStream) answers on ${NATS_HOST}:${NATS_PORT}"
}

case $MODE in
  all)
    ensure_postgres
    ensure_logical_wal
    ensure_nats
    ;;
  postgres)
    ensure_postgres
    ensure_logical_wal
    ;;
  nats) ensure_nats ;;
  postgres-binaries) ensure_postgres_binaries ;;
esac
