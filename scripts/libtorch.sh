#!/usr/bin/env bash
# Puts libtorch 2.11.0 (the release tch 0.24 binds) in <repo>/.libtorch, from the PyPI wheels:
# the torch wheel's lib/ and include/, plus the two CUDA runtime libraries that libtorch_cpu.so
# names as dependencies (libcudart, libcupti; never called on the CPU path).
# .cargo/config.toml points LIBTORCH at that folder and gives the binaries an rpath to it.
# Idempotent: does nothing when the folder is complete. Needs python3 with pip and unzip.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="$PWD/.libtorch"
STAMP="$DEST/.autopar-libtorch-2.11.0"
if [ -f "$STAMP" ]; then
  exit 0
fi
if ! command -v unzip >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq unzip >/dev/null
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "fetching libtorch 2.11.0 from PyPI (about 540 MB) into $DEST" >&2
python3 -m pip download --quiet --no-deps -d "$TMP" \
  torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
rm -rf "$DEST"
mkdir -p "$DEST/lib"
(cd "$TMP" && unzip -q -o torch-2.11.0-*.whl 'torch/include/*' 'torch/lib/libtorch_cpu.so' \
  'torch/lib/libtorch.so' 'torch/lib/libc10.so' 'torch/lib/libgomp.so.1' 'torch/version.py')
mv "$TMP/torch/include" "$DEST/include"
mv "$TMP"/torch/lib/* "$DEST/lib/"
(cd "$TMP" && unzip -q -o nvidia_cuda_runtime-*.whl 'nvidia/cu13/lib/libcudart.so.13' \
  && unzip -q -o nvidia_cuda_cupti-*.whl 'nvidia/cu13/lib/libcupti.so.13')
mv "$TMP"/nvidia/cu13/lib/* "$DEST/lib/"
# torch-sys reads the version from build-version
sed -n "s/^__version__ = '\(.*\)'.*/\1/p" "$TMP/torch/version.py" > "$DEST/build-version"
touch "$STAMP"
echo "libtorch $(cat "$DEST/build-version") ready in $DEST" >&2
