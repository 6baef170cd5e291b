# shellcheck shell=bash
# pg-cluster.sh: a private PostgreSQL cluster, made by the installed PostgreSQL's initdb and run
# by its pg_ctl (as the OS user postgres when run as root: PostgreSQL refuses to run as root),
# listening on 127.0.0.1 only (TCP, no Unix socket), trust auth, wal_level=logical. Shared by
# scripts/stack.sh (the stack's own cluster in .stack/pg, kept between runs) and scripts/test.sh
# (the tests' cluster, made afresh for each run). Sourced: it only defines functions.
#
# The caller sets:
#   PGC_DIR     the cluster's directory: data in $PGC_DIR/data, the server's log in
#               $PGC_DIR/postgresql.log, initdb's in $PGC_DIR/initdb.log
#   PGC_SHOWN   that directory as messages show it (e.g. .stack/pg)
#   PGC_WHOSE   whose cluster it is, in messages (e.g. "the stack's")
#   PGC_PORT    its port on 127.0.0.1, given at each start
#   PGC_ROOT    the repository root (for scripts/ensure-services.sh)
#   PGC_NO_SYNC (optional) 1: initdb does not wait for its files to reach the disk (a
#               throwaway cluster: seconds saved)
# and defines say, warn, die and log_tail (FILE: its last lines on stderr).
# It sets PGC_BIN (the server programs' directory), PGC_DATA and PGC_LOG, and PGC_STARTED=1
# while a server it started runs.
#
# Functions:
#   pgc_bin_of_data      PGC_BIN: the programs of the major version that made $PGC_DATA (dies
#                        when they are not installed)
#   pgc_bin_installed    PGC_BIN: the newest installed programs, installed by
#                        `scripts/ensure-services.sh --postgres-binaries` when missing (fails,
#                        for the caller to say what else to do)
#   pgc_check_user       as root: the OS user postgres and runuser exist (dies otherwise)
#   pgc_make_dir         makes $PGC_DIR, the OS user postgres's when root; fails when that user
#                        cannot write there, PGC_BLOCKED then naming the directory it cannot
#                        search (or empty)
#   pgc_stop_leftover    stops a server left running in $PGC_DATA by an earlier run
#   pgc_initdb HEADER [SETTING...]   initdb, then appends to postgresql.conf "# ---- HEADER",
#                        the common settings and each SETTING line
#   pgc_start / pgc_stop starts the server on PGC_PORT (waits until it answers) / stops the
#                        server pgc_start started (fast mode)
#   pgc_port_busy PORT   something listens on 127.0.0.1:PORT

PGC_STARTED=0

pgc_paths() {
  PGC_DATA=$PGC_DIR/data
  PGC_LOG=$PGC_DIR/postgresql.log
}

# The cluster's programs run as the OS user postgres when we are root, as ourselves otherwise.
pgc_as_owner() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pgc_port_busy() {
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

pgc_bin_of_data() {
  pgc_paths
  local ver
  ver=$(<"$PGC_DATA/PG_VERSION")
  PGC_BIN=/usr/lib/postgresql/$ver/bin
  if [[ ! -x $PGC_BIN/pg_ctl ]] && command -v pg_ctl >/dev/null 2>&1; then
    PGC_BIN=$(dirname "$(command -v pg_ctl)")
  fi
  [[ -x $PGC_BIN/pg_ctl && $("$PGC_BIN/pg_ctl" --version) == *" $ver"* ]] ||
    die "$PGC_WHOSE cluster in $PGC_SHOWN was made by PostgreSQL $ver, which is not" \
      "installed; install it, or remove $PGC_SHOWN to start afresh (its data is lost)"
}

pgc_bin_installed() {
  PGC_BIN=$("$PGC_ROOT/scripts/ensure-services.sh" --postgres-binaries)
}

pgc_check_user() {
  [[ $(id -u) -eq 0 ]] || return 0
  id postgres >/dev/null 2>&1 || die "running as root, $PGC_WHOSE cluster needs the OS user" \
    "postgres (made by the postgresql package) to run it"
  command -v runuser >/dev/null 2>&1 || die "runuser not found (package util-linux)"
}

# shellcheck disable=SC2034 # PGC_BLOCKED is the caller's to read
pgc_make_dir() {
  local d
  PGC_BLOCKED=""
  mkdir -p "$PGC_DIR"
  [[ $(id -u) -eq 0 ]] && chown postgres: "$PGC_DIR"
  pgc_as_owner test -w "$PGC_DIR" 2>/dev/null && return 0
  d=$PGC_DIR
  while [[ $d != / ]]; do
    d=$(dirname "$d")
    pgc_as_owner test -x "$d" 2>/dev/null || PGC_BLOCKED=$d
  done
  return 1
}

pgc_stop_leftover() {
  pgc_paths
  [[ -s $PGC_DATA/PG_VERSION ]] || return 0
  # Left running by a run that was killed? It is ours: stop it, to start it as configured.
  if pgc_as_owner "$PGC_BIN/pg_ctl" -D "$PGC_DATA" status >/dev/null 2>&1; then
    say "$PGC_WHOSE cluster ($PGC_SHOWN) is still running from an earlier run; stopping it first"
    pgc_as_owner "$PGC_BIN/pg_ctl" -D "$PGC_DATA" -m fast -w -t 60 stop >/dev/null ||
      die "cannot stop $PGC_WHOSE cluster left running ($PGC_SHOWN)"
  fi
}

pgc_initdb() {
  pgc_paths
  local header=$1 line
  shift
  say "creating $PGC_WHOSE PostgreSQL cluster in $PGC_SHOWN (initdb, log $PGC_SHOWN/initdb.log)"
  local no_sync=()
  [[ ${PGC_NO_SYNC:-0} == 1 ]] && no_sync=(--no-sync)
  pgc_as_owner "$PGC_BIN/initdb" -D "$PGC_DATA" -U postgres -A trust -E UTF8 --locale=C \
    "${no_sync[@]}" >"$PGC_DIR/initdb.log" 2>&1 || {
    log_tail "$PGC_DIR/initdb.log"
    rm -rf "$PGC_DATA"
    die "initdb failed for $PGC_SHOWN/data"
  }
  # The settings every such cluster needs; the port is given at each start (PGC_PORT).
  {
    cat <<CONF

# ---- $header
# Reachable on 127.0.0.1 only (TCP; no Unix socket): trust auth is fine there.
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
# /live table topics read the WAL through a logical replication slot.
wal_level = logical
# A slot nobody reads keeps WAL: at most this much.
max_slot_wal_keep_size = '1GB'
CONF
    for line in "$@"; do printf '%s\n' "$line"; done
  } | pgc_as_owner tee -a "$PGC_DATA/postgresql.conf" >/dev/null
}

pgc_start() {
  pgc_paths
  say "starting $PGC_WHOSE PostgreSQL cluster on 127.0.0.1:$PGC_PORT (log $PGC_SHOWN/postgresql.log)"
  PGC_STARTED=1
  pgc_as_owner "$PGC_BIN/pg_ctl" -D "$PGC_DATA" -l "$PGC_LOG" -o "-p $PGC_PORT" -w -t 60 start \
    >/dev/null || {
    log_tail "$PGC_LOG"
    die "$PGC_WHOSE PostgreSQL cluster did not start ($PGC_SHOWN)"
  }
}

pgc_stop() {
  [[ $PGC_STARTED -eq 1 ]] || return 0
  PGC_STARTED=0
  pgc_paths
  say "stopping $PGC_WHOSE PostgreSQL cluster ($PGC_SHOWN, port $PGC_PORT)"
  pgc_as_owner "$PGC_BIN/pg_ctl" -D "$PGC_DATA" -m fast -w -t 60 stop >/dev/null 2>&1 ||
    warn "pg_ctl stop failed for $PGC_SHOWN (see $PGC_SHOWN/postgresql.log)"
}
