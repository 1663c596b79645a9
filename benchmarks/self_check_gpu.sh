#!/usr/bin/env bash
# The speed path's first-batch self-check on one GPU, and the console a user sees at start-up:
#   1. plain trl (--fast_path false) on the tiny Llama, 3 steps of SGD: the reference losses;
#   2. the same with the speed path and its torch RMSNorm broken on purpose (DIST_DPO_TEST_BREAK=torch_norm): the
#      self-check must say one line naming torch_norm and train on trl's path, so its losses are trl's;
#   3. the default run (speed path, liger where installed): its whole console is kept as the start-up log.
# Usage (GPU machine): bash benchmarks/self_check_gpu.sh OUT_DIR
set -uo pipefail
out=${1:?usage: self_check_gpu.sh OUT_DIR}
work=${WORK:-/tmp/dist_dpo_self_check}
mkdir -p "$out" "$work"
common=(--model_name_or_path builtin:tiny-llama --lora_target_modules all-linear --lora_dropout 0
        --group_by_length false --max_steps 3 --logging_steps 1 --eval_steps 0 --optim sgd --learning_rate 0.1
        --lr_scheduler_type constant --overwrite_output_dir true)
rm -rf "$work"/*
python3 -m dist_dpo train "${common[@]}" --fast_path false --output_dir "$work/trl" > "$work/trl.log" 2>&1
DIST_DPO_TEST_BREAK=torch_norm python3 -m dist_dpo train "${common[@]}" --output_dir "$work/broken" \
  > "$out/self_check_broken.log" 2>&1
python3 - "$work" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
def losses(run):
    f = work / run / "trainer_state.json"
    return [h["loss"] for h in json.loads(f.read_text())["log_history"] if "loss" in h] if f.is_file() else None
print("self-check GPU demo: trl", losses("trl"), "| broken torch_norm, after the self-check", losses("broken"))
PY
grep -h "self-check" "$out/self_check_broken.log"
python3 -m dist_dpo train --model_name_or_path builtin:tiny-qwen2 --max_steps 3 --output_dir "$work/start" \
  > "$out/startup_console.log" 2>&1
