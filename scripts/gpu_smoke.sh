#!/usr/bin/env bash
# On the GPU machine (see docs/gpu.md): the CUDA runtime against one CPU device, then a
# medium-size model, with a binary built here by `cargo build --release --features cuda`.
set -uo pipefail
SP=${TORCH_SITE:-/opt/torch/.venv/lib/python3.12/site-packages}
NCL=${TMPDIR:-/tmp}/ncl
mkdir -p "$NCL" && ln -sf "$SP/nvidia/nccl/lib/libnccl.so.2" "$NCL/libnccl.so"
# gpulibs/: the CBC libraries the binary links (copied from the build machine, see docs/gpu.md)
export LD_LIBRARY_PATH="$NCL:$SP/torch/lib:$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib:$SP/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:$PWD/gpulibs"
export NCCL_NVLS_ENABLE=0
B=${AUTOPAR:-./target/release/autopar}
nvidia-smi -L
T="gpt2 --batch 4 --seq 32 --layers 2 --hidden 64 --heads 4 --vocab 128"
N=$(nvidia-smi -L | wc -l)
$B run $T --mesh 1 --device cuda --steps 3 --verify
for s in dp tp fsdp sp auto; do
  $B run $T --mesh "$N" --device cuda --steps 3 --verify --strategy $s
done
$B run gpt2-medium --batch 8 --seq 1024 --set dropout=0 --mesh "$N" --device cuda --steps 5 --strategy dp
$B run gpt2-medium --batch 8 --seq 1024 --set dropout=0 --mesh "$N" --device cuda --steps 5
