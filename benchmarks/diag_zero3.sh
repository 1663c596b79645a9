#!/usr/bin/env bash
# Diagnose the ZeRO-3 hang seen in the matrix (device call of 2026-11-27): the `deepspeed` launcher with
# ds_configs/zero3.json on the tiny built-in model, every rank dumping its stack if still running after 60 s.
#   benchmarks/diag_zero3.sh OUT_DIR      (CUDA_VISIBLE_DEVICES picks the 2 GPUs)
set -uo pipefail
out="${1:?usage: $0 OUT_DIR}"
mkdir -p "$out"
export DIST_DPO_STACKS_AFTER_S=60 NCCL_DEBUG=WARN
NGPUS=2 timeout -k 10 170 bash launch/deepspeed.sh zero3 recipes/demo.yaml --output_dir /tmp/diag_z3 --max_steps 4 \
  --eval_steps 0 --save_steps 4 --collective_timeout_s 60 --report_to none > "$out/diag_ds_zero3.log" 2>&1
echo "deepspeed zero3 exit: $?" | tee -a "$out/diag_ds_zero3.log"
