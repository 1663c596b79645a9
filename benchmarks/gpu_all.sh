#!/usr/bin/env bash
# Every GPU proof as ONE background job on a 2- or 4-GPU machine: it outlives the shell that starts it, so a remote
# command with a time limit can start it, and later commands follow it and collect its results.
#
#   source .whl/install.sh; export PYTHONPATH=$PWD:$PYTHONPATH GIT_COMMIT=<sha>   # the commit you run, as your
#   checkout names it (a copied tree's .git can name another one)
#   bash benchmarks/gpu_all.sh start          # the phases below, in the background (setsid)
#   bash benchmarks/gpu_all.sh wait 570       # follows it (at most 570 s); with $OUT set, copies the results there
#
# Phases:
#   1. at once, sharing the GPUs (proofs, not timings):
#      benchmarks/gpu_matrix.py --share 4       every strategy x LoRA/QLoRA, 2 GPUs per cell; Llama / Qwen3 shapes
#                                                under DDP, FSDP2, ZeRO-3; paged 8-bit AdamW under every strategy
#      tests/gpu/test_fast_path_gpu.py          varlen kernel probe; packed / masked / trl rows: the same loss
#      with GPU_ALL_EXTRAS=1 also (~3 min more of shared GPUs):
#      benchmarks/seed_qlora_gpu.sh on GPUs 0,1  make train-ddp / train-zero3, seed_qlora, 1.5B shape
#      benchmarks/gpu_resume.py                  kill -9 a rank, resume: DDP and ZeRO-3 with QLoRA; DDP's checkpoint
#                                                resumed on 1 GPU and under ZeRO-3
#   2. alone: benchmarks/throughput.py           1-GPU rows on one lane per GPU, then the 2-GPU rows
# Knobs: SKIP_MATRIX=1 (phase 1 runs the GPU tests only), MATRIX_ARGS="--only ..." (passed to gpu_matrix.py: a
# subset of cells), THROUGHPUT_ARGS="--only ... --add ... --profile" (passed to throughput.py), THROUGHPUT_BUDGET_S
# (default 900).
set -uo pipefail
S=${GPU_ALL_DIR:-/tmp/dist_dpo_gpu_all}
LOGS=(gputests throughput seed resume matrix)

job_run() {
  note() { job_note "$@"; }
  commit=${GIT_COMMIT:-unknown}
  gpus=$(nvidia-smi -L | wc -l)
  # Proofs first, sharing the GPUs (each job's losses and peak memory are its own; none of them is a timing):
  note "matrix + gpu tests start ($gpus GPUs)"
  # shellcheck disable=SC2086 - MATRIX_ARGS is a list of arguments
  [ "${SKIP_MATRIX:-0}" = 1 ] || (python3 benchmarks/gpu_matrix.py --out "$S/results" --work /tmp/dd_matrix --share "${MATRIX_SHARE:-4}" \
     ${MATRIX_ARGS:-} > "$S/matrix.log" 2>&1; note "matrix exit $?") &
  (CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -m gpu tests/gpu/test_fast_path_gpu.py -p no:cacheprovider \
     > "$S/gputests.log" 2>&1; note "gpu tests exit $?") &
  if [ "${GPU_ALL_EXTRAS:-0}" = 1 ]; then
    (CUDA_VISIBLE_DEVICES=0,1 STEP_TIMEOUT=300 bash benchmarks/seed_qlora_gpu.sh "$S/results/seed" 10 \
       > "$S/seed.log" 2>&1; note "seed_qlora exit $?") &
    lanes=$([ "$gpus" -ge 4 ] && echo "0,1 2,3" || echo "0,1")
    (python3 benchmarks/gpu_resume.py --out "$S/results" --lanes "$lanes" > "$S/resume.log" 2>&1
     note "resume exit $?") &
  fi
  wait
  pkill -9 -f "dist_dpo train" 2>/dev/null  # a hung run's ranks must not share the timed GPUs
  # Then the timings, alone on the machine:
  note "throughput start"
  # shellcheck disable=SC2086 - THROUGHPUT_ARGS is a list of arguments
  python3 benchmarks/throughput.py --out "$S/results" --budget-s "${THROUGHPUT_BUDGET_S:-900}" --commit "$commit" \
    ${THROUGHPUT_ARGS:-} > "$S/throughput.log" 2>&1
  note "throughput exit $?"
}

job_collect() {
  mkdir -p /tmp/dd_pack
  cp -r /tmp/dd_matrix/logs /tmp/dd_matrix/checks /tmp/dd_pack/ 2>/dev/null
  tar czf "$OUT/gpu_all.tgz" -C "$S" . -C /tmp/dd_pack . 2>/dev/null
  cp "$S"/results/*.json "$OUT/" 2>/dev/null
}

# shellcheck source-path=SCRIPTDIR source=background_job.sh
source "$(dirname "${BASH_SOURCE[0]}")/background_job.sh"
job_main "$0" "$@"
