#!/usr/bin/env bash
# deploy-test-setup.sh: installs what tests/deploy/main.rs needs to validate docker-compose.yml,
# and nothing when it is already there: Debian's docker-compose (v1, which validates a compose
# file offline with `docker-compose config -q`, no Docker engine needed). A `docker compose`
# (v2 plugin) that already works is used as is. Without its recommended docker.io: the test
# needs no engine. Runs as root as is, otherwise uses sudo.
#
# Usage: scripts/deploy-test-setup.sh        (from any directory)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'deploy-test-setup: %s\n' "$*" >&2; }
die() { printf 'deploy-test-setup: ERROR: %s\n' "$*" >&2; exit 1; }

if command -v docker-compose >/dev/null 2>&1; then
  say "docker-compose present: $(command -v docker-compose)"
  exit 0
fi
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  say "docker compose (v2) present"
  exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  die "need root (or sudo) to install docker-compose"
fi
say "installing docker-compose: apt-get update && apt-get install -y --no-install-recommends docker-compose"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || die "apt-get update failed"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose ||
  die "apt-get install docker-compose failed"
command -v docker-compose >/dev/null 2>&1 || die "docker-compose installed but not on PATH"
say "ready"
