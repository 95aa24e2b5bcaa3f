#!/usr/bin/env bash
# Single-rank CPU step time of autopar's runtime against PyTorch eager on the same GPT-2, in the
# same run, then the same model on simulated meshes (time in Loopback collectives).
# Needs a release build and a python with torch 2.11 (PYTHON=...; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CFG=(gpt2 --layers 4 --hidden 256 --heads 4 --ffn 1024 --vocab 8192 --batch 8 --seq 128
     --set max_positions=128 --set dropout=0)
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "pytorch eager (2 threads):"
"$PY" benches/pytorch/gpt2_cpu_step.py --layers 4 --hidden 256 --heads 4 --ffn 1024 \
  --vocab 8192 --batch 8 --seq 128 --steps 10 --threads 2
for mesh in "1" "2 --strategy dp" "2 --strategy tp" "2x2"; do
  out=$(./target/release/autopar run "${CFG[@]}" --mesh $mesh --steps 12 --optimizer adamw)
  steps=$(echo "$out" | grep '^step' | tail -n 10)
  t=$(echo "$steps" | sed 's/.*measured \([0-9.]*\) ms.*/\1/' | median)
  c=$(echo "$steps" | sed 's/.*collectives \([0-9.]*\) ms.*/\1/' | median)
  echo "autopar mesh $mesh: median step $t ms, collectives $c ms (steps 3-12)"
done
