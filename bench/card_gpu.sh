#!/usr/bin/env bash
# The card table in one GPU call (docs/performance.md "Settings sized by the card"): each stage's default of
# before (the fixed settings) against the settings sized by the card, with the process capped at 80 and 40 GiB
# (then 48 and 24 while time is left): the cap (torch.cuda.set_per_process_memory_fraction) emulates the smaller
# card. Then the memory coefficients. Usage, from the repo root after `source bench/gpu_setup.sh`:
#   bash bench/card_gpu.sh OUT_DIR [SECONDS]     (SECONDS: the whole call's budget, default 500)
# Cases run in priority order; one that no longer fits the budget is skipped and said so. The compile caches
# (/tmp/flare_bench/cache/torch_compile) are shared between the cases, as between a user's runs.
set -u
out=${1:-bench_out}; budget=${2:-500}
deadline=$(( $(date +%s) + budget ))
mkdir -p "$out"
exec > >(tee -a "$out/card.log") 2>&1
python3 -m bench.run build > "$out/build.log" 2>&1
# case SECONDS ARGS...: bench.run ARGS, cut at SECONDS or the budget's end, skipped under 45 s left
case_() {
  local seconds=$1; shift
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 45 ]; then echo "SKIPPED (budget): $*"; return; fi
  [ "$seconds" -gt "$left" ] && seconds=$left
  local t0=$(date +%s)
  timeout "$seconds" python3 -m bench.run "$@" --out "$out" > "$out/case-$(date +%s%N).log" 2>&1
  echo "$* -> exit $? in $(( $(date +%s) - t0 )) s"
}
SFT=(sft --backend hf --steps 6 --warmup 3 --set sft.per_device_train_batch_size=4 --set sft.gradient_accumulation_steps=4)
# infer without a warm-up run: the table takes its steady reports/s from the batches after the first
INFER=(infer --samples 384 --cache static --card-gib 80 --set infer.decode_loop=graph)
case_ 150 "${SFT[@]}" --card-gib 80                                 # before: 4 x 4, every batch recomputed (+ data prep)
case_ 160 "${SFT[@]}" --card-gib 80 --set sft.card_preset=auto      # sized for 80 GiB
case_ 150 "${SFT[@]}" --card-gib 40 --set sft.card_preset=auto      # sized for 40 GiB (before: as at 80)
case_ 100 "${INFER[@]}" --batch 32                                  # before: batch 32
case_ 100 "${INFER[@]}" --batch 128 --set infer.batch_size=auto     # sized for 80 GiB
liger=$(python3 -c "import importlib.util as u; print(str(u.find_spec('liger_kernel') is not None).lower())")
case_ 75 memory --set model.liger_kernel=$liger                     # the SFT coefficients, whole card
case_ 150 "${SFT[@]}" --card-gib 48 --set sft.card_preset=auto      # 40's settings again: the compile cache warm
case_ 150 "${SFT[@]}" --card-gib 24 --set sft.card_preset=auto
python3 -m bench.card "$out"
