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
# HiGHS, the second ILP backend (cargo feature `highs`), is compiled from source: cmake, libclang
if ! command -v cmake >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake libclang-dev >/dev/null
  else
    echo "cmake and libclang are needed to build HiGHS (feature highs)" >&2
    exit 1
  fi
fi
# libtorch 2.11 for tch 0.24 (the runtime's kernels), from the PyPI wheels into .libtorch/
bash scripts/libtorch.sh
# binaries carry an rpath to it (.cargo/config.toml); doctests and other runners need the path
export LD_LIBRARY_PATH="$PWD/.libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# doctests and the HiGHS backend's solver tests first, so that the workspace summary closes the log
cargo test --workspace --doc
cargo nextest run -p autopar-solver --features highs --no-fail-fast
cargo nextest run --workspace --no-fail-fast
