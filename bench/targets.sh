#!/usr/bin/env bash
# The three decode numbers side by side on one GPU, in one command of under 10 minutes (docs/performance.md,
# "Current numbers"): GRPO 8 x 256 at the defaults, infer at batch 128 (forced length, then the FLARE length mix),
# the GREEN judge at batch ${JB:-96} (its decode attentions: ${JA:-grouped}, e.g. JA="grouped split_kv+shared").
# Usage, from the repo root: `bash bench/targets.sh OUT_DIR [BUDGET_S]`.
# An offline box without the project's pure-Python dependencies gets them from .whl/ (bench/gpu_setup.sh), e.g.
# `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl trl==1.16.0 datasets==4.8.5 dill==0.4.1
# multiprocess==0.70.19 hydra-core==1.3.8 omegaconf==2.3.0 nltk openpyxl et-xmlfile submitit==1.5.4
# hydra-submitit-launcher==1.2.0 liger-kernel==0.8.5 appdirs jsonpickle dotmap` and `pip wheel --no-deps -w .whl
# antlr4-python3-runtime==4.9.3 rouge-score==0.1.2 radgraph==0.1.18` (those three ship no wheel).
set -u
out=${1:-bench_out}; budget=${2:-560}; t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
mkdir -p "$out"
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
python3 -m bench.run build > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
G="grpo --backend hf --num-generations 8 --batch 8 --cache static --compile --set rl.decode_loop=graph --warmup 1"
timeout $(( $(left) > 360 ? $(left) - 300 : 60 )) python3 -m bench.run $G --steps 5 --out "$out" > "$out/grpo.log" 2>&1
echo "grpo: exit $?, $(left) s left"
I="infer --batch 128 --cache static --warm --set infer.decode_loop=graph --out $out"
timeout 120 python3 -m bench.run $I --samples 384 > "$out/infer.log" 2>&1; echo "infer: exit $?, $(left) s left"
timeout 70 python3 -m bench.run $I --samples 256 --length-mix flare > "$out/infer_mix.log" 2>&1
echo "infer, FLARE mix: exit $?, $(left) s left"
[ "$(left)" -gt 60 ] && timeout $(( $(left) - 10 )) python3 -m bench.green --out "$out" --prompts 192 \
  --package-prompts 0 --batch "${JB:-96}" --decode-attention ${JA:-grouped} > "$out/judge.log" 2>&1
echo "judge: exit $?; python -m bench.report $out makes the tables"
