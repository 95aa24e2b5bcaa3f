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

# one process per GPU through torchrun: the same losses as the one-process run
$B run $T --mesh "$N" --device cuda --steps 3 | grep '^step' | awk '{print $2, $4}' > /tmp/one_losses.txt
torchrun --nproc-per-node "$N" --no-python $B run $T --mesh "$N" --device cuda --steps 3 \
  | tee /dev/stderr | grep '^step' | awk '{print $2, $4}' > /tmp/torchrun_losses.txt
if diff /tmp/one_losses.txt /tmp/torchrun_losses.txt; then echo "torchrun: same losses as one process"; else echo "torchrun: LOSSES DIFFER"; fi

# no hang: a rank of a two-process run dies (KILL) or stops (STOP); the other must exit with an
# error naming it, within AUTOPAR_TIMEOUT
if [ "$N" -ge 2 ]; then
  for sig in KILL STOP; do
    export MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29600 + RANDOM % 300)) WORLD_SIZE=2 AUTOPAR_TIMEOUT=20
    RANK=1 LOCAL_RANK=1 $B run $T --mesh 2 --device cuda --steps 100000 >/tmp/rank1.txt 2>&1 &
    P1=$!
    RANK=0 LOCAL_RANK=0 $B run $T --mesh 2 --device cuda --steps 100000 >/tmp/rank0.txt 2>&1 &
    P0=$!
    for _ in $(seq 100); do grep -q '^step   20 ' /tmp/rank0.txt && break; sleep 0.3; done
    T0=$(date +%s)
    kill -$sig $P1
    wait $P0
    echo "SIG$sig on rank 1: rank 0 exited with $? after $(( $(date +%s) - T0 )) s: $(grep error /tmp/rank0.txt)"
    kill -KILL $P1 2>/dev/null; wait $P1 2>/dev/null
    unset MASTER_ADDR MASTER_PORT WORLD_SIZE AUTOPAR_TIMEOUT
  done
fi
