#!/usr/bin/env bash
# The whole benchmark on one GPU box, in pieces that each fit a 10-minute command. Usage (from the repo root,
# after `source bench/gpu_setup.sh` where wheels must be carried):
#   bash bench/gpu_all.sh sft-loop|sft-1|sft-2|infer|grpo-1|grpo-2  OUT_DIR
# Each piece rebuilds the random 4B model if missing (~25 s) and writes one JSON per measurement to OUT_DIR;
# `python -m bench.report OUT_DIR` makes the tables.
set -u
piece=$1; out=${2:-bench_out}
mkdir -p "$out"
python3 -m bench.run build > "$out/build.log" 2>&1
R="python3 -m bench.run"
case $piece in
  # the stage and the same model in a bare loop, both backends, one call: where the stage's time goes
  sft-loop)     timeout 100 $R loop --backend hf --batch 8 --steps 8 --warmup 2 --out "$out"
                timeout 240 $R loop --backend unsloth --batch 8 --steps 8 --warmup 2 --out "$out"
                timeout 110 $R sft --backend hf --batch 8 --steps 10 --out "$out"
                timeout 140 $R sft --backend unsloth --batch 8 --steps 10 --out "$out" ;;
  sft-1)        timeout 150 $R sft --backend hf --batch 8 --steps 12 --workers 0 --profile --out "$out"
                timeout 150 $R sft --backend unsloth --batch 8 --steps 12 --workers 0 --profile --out "$out"
                timeout 150 $R sft --backend unsloth --batch 8 --steps 12 --out "$out" ;;
  sft-2)        timeout 120 $R sft --backend hf --batch 8 --steps 12 --out "$out"
                timeout 220 $R sft --backend hf --batch 8 --steps 12 --compile --out "$out"
                timeout 150 $R sft --backend unsloth --batch 16 --steps 10 --out "$out" ;;
  infer)        timeout 100 $R infer --batch 8 --samples 64 --image-device cpu --out "$out"
                timeout 100 $R infer --batch 8 --samples 64 --out "$out"
                timeout 150 $R infer --batch 64 --samples 256 --cache static --warm --profile --out "$out"
                timeout 200 $R infer --batch 256 --samples 768 --cache static --warm --out "$out" ;;
  # GRPO, both backends on one machine in two consecutive calls (keep it warm: run grpo-2 right after grpo-1)
  grpo-1)       timeout 130 $R grpo --backend hf --num-generations 8 --batch 8 --steps 3 --warmup 1 --out "$out"
                timeout 400 $R grpo --backend unsloth --num-generations 8 --batch 8 --steps 3 --warmup 1 --out "$out" ;;
  grpo-2)       timeout 260 $R grpo --backend unsloth --num-generations 2 --batch 8 --steps 3 --warmup 1 --out "$out"
                timeout 130 $R grpo --backend hf --num-generations 2 --batch 8 --steps 3 --warmup 1 --out "$out" ;;
  grpo-compiled) timeout 170 $R grpo --backend hf --num-generations 8 --batch 8 --steps 4 --warmup 1 --cache static --compile --out "$out" ;;
  *) echo "unknown piece $piece" >&2; exit 2 ;;
esac
