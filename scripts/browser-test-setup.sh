#!/usr/bin/env bash
# browser-test-setup.sh: installs what tests/browser/chat.mjs needs, and nothing when it is
# already there: Debian's Chromium (/usr/bin/chromium, via apt-get) and the test's npm
# dependencies (playwright-core, from tests/browser/package-lock.json, into
# tests/browser/node_modules). Runs as root as is, otherwise uses sudo for apt-get.
#
# Usage: scripts/browser-test-setup.sh        (from any directory)
# Then:  node tests/browser/chat.mjs <gatewayBaseUrl> <tokenA> <tokenB>
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'browser-test-setup: %s\n' "$*" >&2; }
die() { printf 'browser-test-setup: ERROR: %s\n' "$*" >&2; exit 1; }

if [[ -x /usr/bin/chromium ]]; then
  say "chromium present: /usr/bin/chromium"
else
  if [[ $(id -u) -eq 0 ]]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    die "need root (or sudo) to install chromium"
  fi
  say "installing chromium: apt-get update && apt-get install -y chromium"
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || die "apt-get update failed"
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium ||
    die "apt-get install chromium failed"
  [[ -x /usr/bin/chromium ]] || die "chromium installed but /usr/bin/chromium is missing"
fi

command -v npm >/dev/null 2>&1 || die "npm not found (install Debian's nodejs and npm)"
if [[ -d tests/browser/node_modules/playwright-core ]]; then
  say "npm dependencies present: tests/browser/node_modules"
else
  cd tests/browser
  if [[ -f package-lock.json ]]; then
    say "installing npm dependencies: npm ci (tests/browser)"
    npm ci --no-audit --no-fund || die "npm ci failed in tests/browser"
  else
    say "installing npm dependencies: npm install (tests/browser)"
    npm install --no-audit --no-fund || die "npm install failed in tests/browser"
  fi
fi
say "ready"
