#!/usr/bin/env bash
# The whole benchmark on one GPU box, in pieces that each fit a 10-minute command. Usage (from the repo root,
# after `source bench/gpu_setup.sh` where wheels must be carried):
#   bash bench/gpu_all.sh sft|infer|grpo-hf|grpo-unsloth  OUT_DIR
# Each piece rebuilds the random 4B model if missing (~25 s) and writes one JSON per measurement to OUT_DIR;
# `python -m bench.report OUT_DIR` makes the tables.
set -u
piece=$1; out=${2:-bench_out}
mkdir -p "$out"
python3 -m bench.run build > "$out/build.log" 2>&1
R="python3 -m bench.run"
case $piece in
  sft)          for b in hf unsloth; do for bs in 4 8; do timeout 200 $R sft --backend $b --batch $bs --steps 12 --out "$out"; done; done ;;
  infer)        timeout 100 $R infer --batch 1 --samples 6 --out "$out"
                for bs in 8 32 64; do timeout 120 $R infer --batch $bs --samples 128 --out "$out"; done
                for bs in 64 128; do timeout 150 $R infer --batch $bs --samples 256 --cache static --warm --out "$out"; done ;;
  grpo-hf)      for g in 2 8; do timeout 200 $R grpo --backend hf --num-generations $g --batch 8 --steps 4 --warmup 1 --out "$out"; done ;;
  grpo-unsloth) for g in 2 8; do timeout 280 $R grpo --backend unsloth --num-generations $g --batch 8 --steps 4 --warmup 1 --out "$out"; done ;;
  *) echo "unknown piece $piece" >&2; exit 2 ;;
esac
