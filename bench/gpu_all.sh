#!/usr/bin/env bash
# The whole benchmark on one GPU box, in pieces that each fit a 10-minute command. Usage (from the repo root,
# after `source bench/gpu_setup.sh` where wheels must be carried):
#   bash bench/gpu_all.sh PIECE OUT_DIR      (PIECE: one of `pieces` below; an unknown one lists them)
# Each piece rebuilds the random 4B model if missing (~25 s) and writes one JSON per measurement to OUT_DIR;
# `python -m bench.report OUT_DIR` makes the tables.
set -u
piece=$1; out=${2:-bench_out}
pieces=" sft-1 sft-vision sft-2 sft-facts sft-shape sft-loss sft-logits sft-compile-check sft-attention-kernel sft-long sft-loop sft-loop-facts sft-loop-shapes infer infer-2 infer-mixed attention reward grpo-1 grpo-2 grpo-4 grpo-compiled smoke smoke-cross "
[[ $pieces == *" $piece "* ]] || { echo "unknown piece $piece; one of:$pieces" >&2; exit 2; }
mkdir -p "$out"
exec > >(tee -a "$out/$piece.log") 2>&1  # the piece's whole output comes back with its results
python3 -m bench.run build > "$out/build.log" 2>&1
R="python3 -m bench.run"
# every stage through launch.py on the 4B-shaped model (smoke pieces): 512-px demo data, a few steps each
SMOKE=(experiment=flare data=demo data.demo.image_size=512 model.path=/tmp/flare_bench/qwen3vl-4b-random
       model.min_pixels=3136 model.max_pixels=262144 paths.cache_dir=/tmp/smoke/cache paths.output_root=/tmp/smoke/out
       sft.max_steps=4 sft.per_device_train_batch_size=4 sft.eval_steps=0 sft.save_steps=2 rl.max_steps=2
       rl.num_generations=2 rl.per_device_train_batch_size=4 rl.max_completion_length=32 infer.batch_size=8
       infer.num_samples=16 infer.max_new_tokens=32 reward.radgraph.model_dir=/tmp/smoke/radgraph
       reward.radgraph.build_tiny=true)
case $piece in
  # SFT, side by side on one machine: hf (profiled: GPU kernel time vs wall time), Unsloth, hf with PEFT's own
  # LoRA input casts (model.lora.input_cast=always), hf with compiled blocks (DataLoader workers: the default)
  sft-1)        timeout 130 $R sft --backend hf --batch 8 --steps 10 --profile --out "$out"
                timeout 200 $R sft --backend unsloth --batch 8 --steps 10 --out "$out"
                timeout 100 $R sft --backend hf --batch 8 --steps 10 --set model.lora.input_cast=always --out "$out"
                timeout 150 $R sft --backend hf --batch 8 --steps 10 --compile --out "$out" ;;
  # Unsloth keeps the per-image vision attention (its own copy of the code): the stage with the batched vision
  # encoder forced over it (outputs checked first), beside plain Unsloth and hf, on one machine
  sft-vision)   timeout 130 $R sft --backend hf --batch 8 --steps 10 --out "$out"
                timeout 210 $R sft --backend unsloth --batch 8 --steps 10 --out "$out"
                timeout 210 $R sft --backend unsloth --batch 8 --steps 10 --force-vision-encoder --out "$out" ;;
  # without gradient checkpointing (no recomputation; fits an 80 GiB card), Unsloth's checkpointing without
  # offloading activations to the CPU, and Unsloth at batch 16
  sft-2)        timeout 100 $R sft --backend hf --batch 8 --steps 10 --grad-ckpt false --out "$out"
                timeout 160 $R sft --backend unsloth --batch 8 --steps 10 --grad-ckpt false --out "$out"
                timeout 160 $R sft --backend unsloth --batch 8 --steps 10 --set model.unsloth_offload_activations=false --out "$out"
                timeout 140 $R sft --backend unsloth --batch 16 --steps 8 --out "$out" ;;
  # the report sample shape (one 512-px view + a ~250-token report, ~530 tokens per sample): the stage against
  # that bare loop's 6.7k (peft) / 12.0k (Unsloth) tokens/s; and dental-like samples (one view + a letter)
  sft-facts)    timeout 110 $R sft --backend hf --batch 8 --steps 10 --views 1 --answer-words 150 --out "$out"
                timeout 200 $R sft --backend unsloth --batch 8 --steps 10 --views 1 --answer-words 150 --out "$out"
                timeout 90 $R sft --backend hf --batch 8 --steps 10 --dataset dental --out "$out"
                timeout 120 $R sft --backend unsloth --batch 8 --steps 10 --dataset dental --out "$out" ;;
  # why Unsloth's lead is gone on the report shape (1.00x, seventh run) but not on two views + a short answer
  # (1.35x): Unsloth on both shapes on one machine, profiled on the report shape (GPU busy vs wall, top kernels);
  # hf profiled there too
  sft-shape)    timeout 130 $R sft --backend unsloth --batch 8 --steps 10 --out "$out"
                timeout 200 $R sft --backend unsloth --batch 8 --steps 10 --views 1 --answer-words 150 --profile --out "$out"
                timeout 100 $R sft --backend hf --batch 8 --steps 10 --views 1 --answer-words 150 --profile --out "$out" ;;
  # Unsloth's own loss ops on the report shape (our answer-position loss is its default since the eighth run):
  # its chunked loss (UNSLOTH_FUSED_LINEAR=0; did not finish 10 steps in the eighth run) and its fused linear
  # cross-entropy op, beside the default
  sft-loss)     timeout 160 $R sft --backend unsloth --batch 8 --steps 10 --views 1 --answer-words 150 --env UNSLOTH_FUSED_LINEAR=0 --set sft.answer_logits_only=false --out "$out"
                timeout 150 $R sft --backend unsloth --batch 8 --steps 10 --views 1 --answer-words 150 --set sft.answer_logits_only=false --out "$out"
                timeout 150 $R sft --backend unsloth --batch 8 --steps 10 --views 1 --answer-words 150 --out "$out" ;;
  # hf's loss at the answer positions only (sft.answer_logits_only, the default) against the model's own loss
  # over every position: step time and peak memory, IU_XRay-like batches and the long case
  sft-logits)   for all in "" "--set sft.answer_logits_only=false"; do
                  timeout 90 $R sft --backend hf --batch 8 --steps 10 $all --out "$out"
                  timeout 120 $R sft --backend hf --batch 1 --steps 8 --warmup 2 --long-side 3424 $all --out "$out"
                done ;;
  # compiled blocks against eager: the first losses side by side (an H200 showed them apart from the second
  # step, 12.36 vs 12.62, eighth run; the CPU agrees, in float32 and bf16). inductor; aot_eager (dynamo + AOT
  # autograd, no inductor kernels); inductor without automatic dynamic shapes (one static graph per new length)
  sft-compile-check) timeout 80 $R sft --backend hf --batch 8 --steps 4 --warmup 1 --out "$out"
                for how in "" "--set sft.compile_backend=aot_eager" "--env TORCH_DYNAMO_AUTOMATIC_DYNAMIC_SHAPES=0"; do
                  timeout 110 $R sft --backend hf --batch 8 --steps 4 --warmup 1 --compile $how --out "$out"
                done ;;
  # SDPA without cuDNN's kernels (the H200's default; silent cuDNN SDPA bugs are known on sm90 with masks, and
  # its host cost was ~0.6 ms per call in the eighth run's hf profile): uncompiled (speed, losses) and compiled
  # (do the losses come back?); and compiled with PEFT's own LoRA input casts (ours read autocast's state on
  # every call, inside the graph)
  sft-attention-kernel) timeout 90 $R sft --backend hf --batch 8 --steps 10 --set model.cudnn_attention=false --out "$out"
                timeout 110 $R sft --backend hf --batch 8 --steps 4 --warmup 1 --compile --set model.cudnn_attention=false --out "$out"
                timeout 110 $R sft --backend hf --batch 8 --steps 4 --warmup 1 --compile --set model.lora.input_cast=always --out "$out" ;;
  # the long case: one 3424-px image per sample, ~11.4k tokens (near model.max_seq_length=12000), batch 1
  sft-long)     timeout 150 $R sft --backend hf --batch 1 --steps 8 --warmup 2 --long-side 3424 --out "$out"
                timeout 270 $R sft --backend unsloth --batch 1 --steps 8 --warmup 2 --long-side 3424 --out "$out" ;;
  # the same model and batches in a bare loop (what the stage adds), and the vision encoder's two settings; Unsloth
  # also with the batched vision encoder forced over its rewritten copy (outputs checked first)
  sft-loop)     timeout 100 $R loop --backend hf --batch 8 --steps 8 --warmup 2 --out "$out"
                timeout 100 $R loop --backend hf --batch 8 --steps 8 --warmup 2 --vision-encoder per_image --out "$out"
                timeout 240 $R loop --backend unsloth --batch 8 --steps 8 --warmup 2 --force-vision-encoder --out "$out" ;;
  # does a new shape every step cost the stage's extra 0.2 s? The bare loop on the report shape with a new batch
  # (and token count) every step, as the stage sees them, against its four cycled batches (sft-loop-facts)
  sft-loop-shapes) timeout 100 $R loop --backend hf --batch 8 --steps 8 --warmup 2 --views 1 --answer-words 150 --distinct-batches --out "$out"
                timeout 240 $R loop --backend unsloth --batch 8 --steps 8 --warmup 2 --views 1 --answer-words 150 --distinct-batches --out "$out" ;;
  # the report shape in the bare loop, both backends: an earlier bare loop gave Unsloth 1.66x there (12.0k tokens/s);
  # the stage gave 1.00x (seventh run). Fast here and slow in the stage = the stage's doing, else the model's
  sft-loop-facts) timeout 100 $R loop --backend hf --batch 8 --steps 8 --warmup 2 --views 1 --answer-words 150 --out "$out"
                timeout 240 $R loop --backend unsloth --batch 8 --steps 8 --warmup 2 --views 1 --answer-words 150 --out "$out" ;;
  # inference toward 30 reports/s: static cache, one untimed warm-up batch (compilation). The graph decode loop
  # (one compiled step per token, no per-token host waits) against transformers' generate (compiled decode
  # step), side by side; then the loop's batch-64 profile (GPU busy vs wall)
  infer)        timeout 170 $R infer --batch 128 --samples 512 --cache static --warm --set infer.decode_loop=graph --out "$out"
                timeout 170 $R infer --batch 128 --samples 512 --cache static --warm --set infer.decode_loop=generate --out "$out"
                timeout 150 $R infer --batch 64 --samples 256 --cache static --warm --profile --set infer.decode_loop=graph --out "$out" ;;
  # larger batches, both loops; transformers' decode attention (copies the cache per query head) with the loop
  infer-2)      timeout 220 $R infer --batch 256 --samples 1024 --cache static --warm --set infer.decode_loop=graph --out "$out"
                timeout 220 $R infer --batch 256 --samples 1024 --cache static --warm --set infer.decode_loop=generate --out "$out"
                timeout 150 $R infer --batch 128 --samples 512 --cache static --warm --set infer.decode_loop=graph --set model.decode_attention=transformers --out "$out" ;;
  # real FLARE splits mix image sizes: a first batch of large images (1536 px, ~2.3k tokens), then the usual
  # reports; the graph loop's cache shrinking after it (default) against keeping the long one (generate's way):
  # seconds per batch, the cache lengths and the peak memory (does an old cache stay held?)
  infer-mixed)  for keep in "" --keep-long-cache; do
                  timeout 280 $R infer --batch 64 --samples 256 --cache static --warm --long-side 1536 $keep --set infer.decode_loop=graph --out "$out"
                done ;;
  # the decode step's attention alone: each layout under each SDPA kernel, batches 64-256 (~1 min)
  attention)    for b in 64 128 256; do timeout 60 $R attention --batch $b --keys 700 --steps 200 --out "$out"; done ;;
  # reward completions/s, RadGraph (radgraph-xl's shapes) on CPU and GPU, ours vs F1RadGraph pair by pair
  reward)       timeout 300 $R reward --samples 64 --num-generations 8 --out "$out" ;;
  # GRPO, both backends on one machine in two consecutive calls (keep it warm: run grpo-2 right after grpo-1)
  grpo-1)       timeout 150 $R grpo --backend hf --num-generations 8 --batch 8 --steps 3 --warmup 1 --out "$out"
                timeout 380 $R grpo --backend unsloth --num-generations 8 --batch 8 --steps 3 --warmup 1 --out "$out" ;;
  grpo-2)       timeout 260 $R grpo --backend unsloth --num-generations 2 --batch 8 --steps 3 --warmup 1 --out "$out"
                timeout 130 $R grpo --backend hf --num-generations 2 --batch 8 --steps 3 --warmup 1 --out "$out" ;;
  # compiled rollouts: the graph decode loop (rl.decode_loop=graph) against transformers' generate, side by side
  # 4 generations, each backend as a user runs it (hf: static cache, compiled, graph loop = the defaults there)
  grpo-4)       timeout 230 $R grpo --backend hf --num-generations 4 --batch 8 --steps 3 --warmup 1 --cache static --compile --out "$out"
                timeout 300 $R grpo --backend unsloth --num-generations 4 --batch 8 --steps 3 --warmup 1 --out "$out" ;;
  # (the loop's first step compiles for ~130 s on an H200, generate's ~95 s)
  grpo-compiled) timeout 260 $R grpo --backend hf --num-generations 8 --batch 8 --steps 3 --warmup 1 --cache static --compile --set rl.decode_loop=graph --out "$out"
                 timeout 170 $R grpo --backend hf --num-generations 8 --batch 8 --steps 3 --warmup 1 --cache static --compile --set rl.decode_loop=generate --out "$out" ;;
  # every stage through launch.py on the 4B-shaped model, each backend: prepare (512-px demo data) -> sft ->
  # rl -> infer -> eval (RadGraph on the GPU); logs and metrics land in OUT_DIR
  smoke)        for b in hf unsloth; do  # hf: ~4 min (its GRPO rollouts compile the decode step)
                  timeout $([ $b = hf ] && echo 320 || echo 230) python3 launch.py "${SMOKE[@]}" model.backend=$b \
                    run_name=smoke-$b "stage.steps=[prepare,sft,rl,infer,eval]" > "$out/smoke-$b.log" 2>&1
                  echo "smoke $b: exit $?" | tee -a "$out/smoke.txt"
                  cp /tmp/smoke/out/runs/smoke-$b/eval/metrics.json "$out/smoke-$b-metrics.json" 2>/dev/null
                done ;;
  # the README's real-run recipe: SFT with Unsloth, then GRPO, inference and eval with hf from that adapter
  smoke-cross)  timeout 200 python3 launch.py "${SMOKE[@]}" model.backend=unsloth run_name=cross-sft \
                  "stage.steps=[prepare,sft]" > "$out/smoke-cross.log" 2>&1
                echo "smoke-cross sft (unsloth): exit $?" | tee -a "$out/smoke.txt"
                timeout 300 python3 launch.py "${SMOKE[@]}" model.backend=hf run_name=cross-rest \
                  rl.init_from=/tmp/smoke/out/runs/cross-sft/sft "stage.steps=[prepare,rl,infer,eval]" \
                  >> "$out/smoke-cross.log" 2>&1
                echo "smoke-cross rl, infer, eval (hf): exit $?" | tee -a "$out/smoke.txt"
                cp /tmp/smoke/out/runs/cross-rest/eval/metrics.json "$out/smoke-cross-metrics.json" 2>/dev/null ;;
  *) echo "unknown piece $piece" >&2; exit 2 ;;
esac
