#!/usr/bin/env bash
# The whole benchmark on one GPU box, in pieces that each fit a 10-minute command. Usage (from the repo root,
# after `source bench/gpu_setup.sh`):
#   bash bench/gpu_all.sh PIECE OUT_DIR      (PIECE: a name in bench/pieces.tsv; an unknown one lists them)
# Each piece rebuilds the random 4B model if missing (~25 s) and runs its rows of bench/pieces.tsv one after the
# other, writing one JSON per measurement to OUT_DIR; `python -m bench.report OUT_DIR` makes the tables.
set -u
piece=${1:-}; out=${2:-bench_out}
table=$(dirname "$0")/pieces.tsv
rows=$(grep -v '^#' "$table" | awk -F'\t' -v p="$piece" '$1 == p')
if [ -z "$rows" ]; then
  echo "unknown piece '$piece'; one of: $(grep -v '^#' "$table" | cut -f1 | uniq | tr '\n' ' ')" >&2; exit 2
fi
mkdir -p "$out"
exec > >(tee -a "$out/$piece.log") 2>&1  # the piece's whole output comes back with its results
python3 -m bench.run build > "$out/build.log" 2>&1
# launch rows: every stage through launch.py on the 4B-shaped model, 512-px demo data, a few steps each (the
# small-card SFT settings: the large-card preset's compilation would take longer than the 4 steps)
SMOKE=(experiment=flare sft.card_preset=none data=demo data.demo.image_size=512 model.path=/tmp/flare_bench/qwen3vl-4b-random
       model.min_pixels=3136 model.max_pixels=262144 paths.cache_dir=/tmp/smoke/cache paths.output_root=/tmp/smoke/out
       sft.max_steps=4 sft.per_device_train_batch_size=4 sft.eval_steps=0 sft.save_steps=2 rl.max_steps=2
       rl.num_generations=2 rl.per_device_train_batch_size=4 rl.max_completion_length=32 infer.batch_size=8
       infer.num_samples=16 infer.max_new_tokens=32 reward.radgraph.model_dir=/tmp/smoke/cache/radgraph
       reward.radgraph.build_tiny=true)
while IFS=$'\t' read -r _ seconds runner args; do
  read -r -a argv <<< "$args"
  if [ "$runner" = bench ]; then
    timeout "$seconds" python3 -m bench.run "${argv[@]}" --out "$out"
    echo "$args: exit $?"
  else
    name=$(printf '%s\n' "${argv[@]}" | sed -n 's/^run_name=//p')
    timeout "$seconds" python3 launch.py "${SMOKE[@]}" "${argv[@]}" >> "$out/$piece-runs.log" 2>&1
    echo "$piece $name: exit $?" | tee -a "$out/smoke.txt"
    cp "/tmp/smoke/out/runs/$name/eval/metrics.json" "$out/$name-metrics.json" 2>/dev/null
  fi
done <<< "$rows"
