#!/usr/bin/env bash
# Runs every check of the project on a fresh machine: formatting, clippy, and all tests.
# This is the README's test command; .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install the Rust toolchain (rustup) first" >&2
  exit 1
fi
# CBC, the default ILP solver of the sharding solver (linked through coin_cbc_sys / pkg-config)
if ! pkg-config --exists cbc 2>/dev/null; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq coinor-libcbc-dev pkg-config >/dev/null
  else
    echo "CBC not found: install coinor-libcbc-dev (Debian/Ubuntu) or the coin-or Cbc package" >&2
    exit 1
  fi
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# doctests first (nextest does not run them), so that nextest's summary closes the log
cargo test --workspace --doc
cargo nextest run --workspace --no-fail-fast
