#!/usr/bin/env bash
# The test command: format and lint checks, unit and property tests, and the end-to-end tests
# that start the real binaries against real PostgreSQL and NATS (started, or installed and
# started, by scripts/ensure-services.sh when absent), then a short run of every fuzz target
# (scripts/fuzz.sh, FUZZ_SECONDS each, 10 by default here). The JavaScript client's tests
# (clients/js, node's test runner) run against the same binaries.
#
# CARGO_TARGET_DIR defaults to /var/tmp/pgws-target, outside the clone, so that repeated runs
# (and CI on a fresh clone) reuse the build.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/pgws-target}"

# Each phase's time, printed as it ends and summed up at the end (where the time goes).
phases=()
phase_start=$SECONDS
phase() {
    local took=$((SECONDS - phase_start))
    phases+=("$(printf '%5d s  %s' "$took" "$1")")
    echo "test.sh: phase '$1' took ${took} s"
    phase_start=$SECONDS
}
trap 'echo "test.sh: time by phase:"; printf "  %s\n" "${phases[@]}"' EXIT

bash scripts/ensure-services.sh
phase 'services'
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
