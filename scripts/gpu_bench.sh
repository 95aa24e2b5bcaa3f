#!/usr/bin/env bash
# The GPU benchmark (see docs/gpu.md): GPT-2 medium, seq 1024, bf16 mixed, AdamW, global batch
# 8 on N GPUs: autopar's plans against PyTorch DDP / FSDP2 / tensor parallel, in one run.
set -uo pipefail
SP=${TORCH_SITE:-/opt/torch/.venv/lib/python3.12/site-packages}
NCL=${TMPDIR:-/tmp}/ncl
mkdir -p "$NCL" && ln -sf "$SP/nvidia/nccl/lib/libnccl.so.2" "$NCL/libnccl.so"
LIBS="$NCL:$SP/torch/lib:$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib:$SP/nvidia/cudnn/lib:$PWD/gpulibs"
export NCCL_NVLS_ENABLE=0
B=${AUTOPAR:-./target/release/autopar}
N=$(nvidia-smi -L | wc -l)
OUT=${OUT:-/tmp/bench}
mkdir -p "$OUT"
nvidia-smi -L
for s in auto dp fsdp tp; do
  LD_LIBRARY_PATH="$LIBS" $B run gpt2-medium --batch 8 --seq 1024 --set dropout=0 --dtype bf16 \
    --mesh "$N" --device cuda --steps 8 --strategy $s 2>&1 | tee "$OUT/autopar_$s.txt" | tail -3
done
for m in ddp fsdp2 tp; do
  torchrun --nproc-per-node "$N" benches/pytorch/gpt_baselines.py --mode $m --batch 8 --seq 1024 \
    2>"$OUT/pytorch_$m.err" | tee "$OUT/pytorch_$m.json"
  [ -s "$OUT/pytorch_$m.json" ] || tail -20 "$OUT/pytorch_$m.err"
done
torchrun --nproc-per-node "$N" benches/pytorch/gpt_baselines.py --mode ddp --compile --batch 8 \
  --seq 1024 2>/dev/null | tee "$OUT/pytorch_ddp_compile.json"
