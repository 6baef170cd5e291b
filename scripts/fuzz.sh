#!/usr/bin/env bash
# fuzz.sh: runs the fuzz targets of fuzz/ (cargo-fuzz and libFuzzer, on the nightly toolchain)
# for FUZZ_SECONDS each, and fails when any target finds a crash: a panic (a failed property
# included), an input slower than 10 s, or one that takes more than 2 GiB. Installs what it
# needs when it is missing: the nightly toolchain (rustup), a C++ compiler for libFuzzer (g++,
# with apt-get, as root or through sudo) and cargo-fuzz (cargo install, into ~/.cargo/bin).
# The targets and what each checks: docs/security.md, "Fuzzing".
#
# Usage: scripts/fuzz.sh [target...]        (default: every target; from any directory)
# Env:   FUZZ_SECONDS     seconds per target (default 20)
#        FUZZ_TARGET_DIR  cargo's target dir for the fuzz build (default: $CARGO_TARGET_DIR/fuzz,
#                         else /var/tmp/pgws-target/fuzz): outside the clone, so that the
#                         nightly build is reused from run to run
#        FUZZ_CORPUS_DIR  where each target's corpus grows, <dir>/<target> (default:
#                         $FUZZ_TARGET_DIR/corpus); the seeds kept in the repository,
#                         fuzz/corpus/<target>/, are read and never written
# A crash leaves its input in fuzz/artifacts/<target>/ (not tracked); replay it with
#   cargo +nightly fuzz run --target-dir "$FUZZ_TARGET_DIR" <target> <file>
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
FUZZ_TARGET_DIR="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-/var/tmp/pgws-target}/fuzz}"
FUZZ_CORPUS_DIR="${FUZZ_CORPUS_DIR:-$FUZZ_TARGET_DIR/corpus}"
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf 'fuzz: %s\n' "$*" >&2; }
die() { printf 'fuzz: ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$FUZZ_SECONDS" =~ ^[1-9][0-9]*$ ]] || die "FUZZ_SECONDS must be a positive number of seconds"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  say "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal || die "rustup could not install nightly"
fi
if ! command -v c++ >/dev/null 2>&1; then
  say "installing g++ (libFuzzer is C++)"
  as_root=()
  [[ $(id -u) -eq 0 ]] || as_root=(sudo)
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++ ||
    die "could not install g++"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" ||
    die "cargo install cargo-fuzz failed"
fi

if [[ $# -gt 0 ]]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
[[ ${#targets[@]} -gt 0 ]] || die "no fuzz targets found"

say "building ${#targets[@]} targets (nightly, address sanitizer) in $FUZZ_TARGET_DIR"
cargo +nightly fuzz build --target-dir "$FUZZ_TARGET_DIR"

failed=()
for target in "${targets[@]}"; do
  corpus="$FUZZ_CORPUS_DIR/$target"
  seeds="fuzz/corpus/$target"
  mkdir -p "$corpus" "$seeds"
  say "$target: ${FUZZ_SECONDS} s"
  # New inputs go to the first corpus directory only.
  if ! cargo +nightly fuzz run --target-dir "$FUZZ_TARGET_DIR" "$target" "$corpus" "$seeds" -- \
    -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -dict=fuzz/dict/json.dict \
    -print_final_stats=1; then
    failed+=("$target")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  die "crashes in: ${failed[*]} (inputs in fuzz/artifacts/)"
fi
say "no crash in ${#targets[@]} targets, ${FUZZ_SECONDS} s each"
