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

bash scripts/ensure-services.sh
# Chromium and playwright-core for the real-browser test.
bash scripts/browser-test-setup.sh
# docker-compose, to validate docker-compose.yml (tests/it/deploy.rs).
bash scripts/deploy-test-setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz crate is outside the workspace; it is checked on stable too.
cargo fmt --manifest-path fuzz/Cargo.toml --check
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets --locked -- -D warnings
# The end-to-end tests run the binaries of this build.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
# The JavaScript client's tests, against the binaries just built.
(cd clients/js && npm test)
# The demo page, built on that client, in headless Chromium through a gateway restart.
node --experimental-websocket tests/browser/demo.mjs
cargo test --manifest-path fuzz/Cargo.toml --lib --locked
FUZZ_SECONDS="${FUZZ_SECONDS:-10}" bash scripts/fuzz.sh
