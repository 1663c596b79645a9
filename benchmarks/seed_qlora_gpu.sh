#!/usr/bin/env bash
# The tutorial's QLoRA recipe on 2 GPUs through the Makefile, as a user runs it:
#   make train-ddp / make train-zero3 RECIPE=recipes/seed_qlora.yaml
# pointed at a random-weight Qwen2.5-1.5B-shaped model (no hub here) and the bundled data.
#   benchmarks/seed_qlora_gpu.sh OUT_DIR [STEPS]
set -uo pipefail
out="${1:?usage: $0 OUT_DIR [STEPS]}" steps="${2:-20}"
work=/tmp/dist_dpo_seed
mkdir -p "$out" "$work"
python3 -m dist_dpo build-model --shape qwen2.5-1.5b --out "$work/qwen2.5-1.5b" --device cuda --dtype bfloat16
for target in train-ddp train-zero3; do
  args="--model_name_or_path $work/qwen2.5-1.5b --dataset_name builtin:bad-boy --max_steps $steps \
--eval_steps 10 --logging_steps 5 --save_steps $steps --report_to none --output_dir $work/$target"
  echo "== make $target RECIPE=recipes/seed_qlora.yaml NGPUS=2 ARGS='$args'"
  timeout -k 10 "${STEP_TIMEOUT:-300}" make "$target" RECIPE=recipes/seed_qlora.yaml NGPUS=2 PYTHON=python3 ARGS="$args" \
    > "$out/$target.log" 2>&1; echo "make $target exit: $?" | tee -a "$out/$target.log"
  cp "$work/$target/dist_dpo_run.json" "$out/$target.run.json" 2>/dev/null || true
done
