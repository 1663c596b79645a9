#!/usr/bin/env bash
# Every one-GPU proof as ONE background job: it outlives the shell that starts it, so a remote command with a time
# limit can start it, and later commands follow it and collect its results.
#
#   source .whl/install.sh; export PYTHONPATH=$PWD:$PYTHONPATH GIT_COMMIT=<sha>   # the commit you run, as your
#   checkout names it (a copied tree's .git can name another one)
#   bash benchmarks/gpu_one_card.sh start         # the phases below, in the background (setsid)
#   bash benchmarks/gpu_one_card.sh wait 570      # follows it (at most 570 s); with $OUT set, copies the results there
#
# Phases, most wanted first (a job cut short keeps what it finished: every script writes its JSON as it goes):
#   1. proofs, sharing the card (no timings; about 10 minutes on an H100):
#      tests/gpu and the GPU test of tests/test_ref_cache.py        packed rows, kernels, the reference cache in bf16
#      benchmarks/gpu_portable_resume.py                          QLoRA resumed across ZeRO-3 / one process
#      benchmarks/combinations.py --share 3                       every recipe x make path, 2 steps each
#      benchmarks/fsdp_untied_head.py                             an untied LM head under FSDP2, speed path vs trl
#      benchmarks/arch_matrix.py                                  every family x LoRA/QLoRA, speed path vs trl
#      benchmarks/self_check_gpu.sh                               a broken piece caught; the start-up console
#   2. alone (timings): throughput.py, the 8B family rows against the best plain trl, and the self-check's cost
#   3. alone (timings): throughput.py, var / fixed2048, the tutorial's 3 epochs with and without the reference cache,
#      and the compiled-layer rows (DIST_DPO_AB_COMPILE=layers) beside the default ones
#   4. only with BEFORE_TREE=<dir> (an older commit's files: `mkdir .before; git archive <commit> | tar -x -C .before`,
#      git-ignored; carried to a remote GPU machine with the tree):
#      the architecture matrix and the var / fixed2048 rows of that tree and of this one, back to back, then
#      benchmarks/before_after.py's table of the two (before_after.json)
# Knobs: SKIP_PROOFS=1, SKIP_FAMILIES=1, SKIP_DEFAULT=1 leave a phase out; BEFORE_COMMIT names BEFORE_TREE's commit.
set -uo pipefail
S=${GPU_ONE_CARD_DIR:-/tmp/dist_dpo_gpu_one_card}
R="$S/results"
LOGS=(gputests portable combinations fsdp_head arch self_check throughput_families throughput_default
      before_throughput after_throughput before_arch after_arch)

job_run() {
  note() { job_note "$@"; }
  commit=${GIT_COMMIT:-unknown}
  if [ "${SKIP_PROOFS:-0}" != 1 ]; then
    note "proofs start"
    (python3 -m pytest -q -s -m gpu tests/gpu tests/test_ref_cache.py -p no:cacheprovider > "$S/gputests.log" 2>&1
     note "gpu tests exit $?") &
    (python3 benchmarks/gpu_portable_resume.py --out "$R" --work /tmp/dd1_portable > "$S/portable.log" 2>&1
     note "portable resume exit $?") &
    (python3 benchmarks/combinations.py --out "$R" --work /tmp/dd1_combinations --share 3 --commit "$commit" \
       > "$S/combinations.log" 2>&1; note "combinations exit $?") &
    (python3 benchmarks/fsdp_untied_head.py --out "$R" --work /tmp/dd1_fsdp_head --commit "$commit" \
       > "$S/fsdp_head.log" 2>&1; note "fsdp untied head exit $?"
     python3 benchmarks/arch_matrix.py --out "$R" --work /tmp/dd1_arch --commit "$commit" > "$S/arch.log" 2>&1
     note "arch matrix exit $?"
     bash benchmarks/self_check_gpu.sh "$R/self_check" > "$S/self_check.log" 2>&1; note "self-check demo exit $?") &
    wait
    pkill -9 -f "dist_dpo train" 2>/dev/null  # a hung run's ranks must not share the timed card
  fi
  if [ "${SKIP_FAMILIES:-0}" != 1 ]; then
    note "throughput 8B families start"
    python3 benchmarks/throughput.py --add @ --only dist-dpo/var/lora/1gpu@llama-3-8b,trl-best/var/lora/1gpu@llama-3-8b,dist-dpo/var/lora/1gpu@qwen3-8b,trl-best/var/lora/1gpu@qwen3-8b,dist-dpo-nocheck/var/lora/1gpu@llama-3-8b \
      --pairs var=192 --no-warm-up --budget-s 560 --out "$R/families" --work /tmp/dd1_tp_families \
      --commit "$commit" > "$S/throughput_families.log" 2>&1
    note "throughput 8B families exit $?"
  fi
  if [ "${SKIP_DEFAULT:-0}" != 1 ]; then
    note "throughput default start"
    python3 benchmarks/throughput.py --add 3epochs,compiled --only dist-dpo/var/lora/1gpu,trl-best/var/lora/1gpu,dist-dpo/fixed2048,dist-dpo-3epochs,dist-dpo-compiled \
      --budget-s 600 --out "$R/default" --work /tmp/dd1_tp_default --commit "$commit" > "$S/throughput_default.log" 2>&1
    note "throughput default exit $?"
  fi
  if [ -n "${BEFORE_TREE:-}" ]; then
    before_and_after
  fi
}

# The same rows from an older tree and from this one, in one job on one card: each tree runs its own scripts (their
# options are the same; the package under them is what changed).
before_and_after() {
  local here=$PWD side tree commit
  for side in before after; do
    if [ "$side" = before ]; then tree=$(cd "$BEFORE_TREE" && pwd); commit=${BEFORE_COMMIT:-unknown}; else
      tree=$here; commit=${GIT_COMMIT:-unknown}; fi
    note "$side throughput start"
    (cd "$tree" && PYTHONPATH="$tree:${PYTHONPATH:-}" python3 benchmarks/throughput.py \
       --only dist-dpo/var/lora/1gpu,dist-dpo/fixed2048/lora/1gpu --budget-s 400 --out "$R/$side" \
       --work "/tmp/dd1_tp_$side" --commit "$commit" > "$S/${side}_throughput.log" 2>&1)
    note "$side throughput exit $?"
  done
  for side in before after; do
    if [ "$side" = before ]; then tree=$(cd "$BEFORE_TREE" && pwd); commit=${BEFORE_COMMIT:-unknown}; else
      tree=$here; commit=${GIT_COMMIT:-unknown}; fi
    note "$side arch matrix start"
    (cd "$tree" && PYTHONPATH="$tree:${PYTHONPATH:-}" python3 benchmarks/arch_matrix.py --out "$R/$side" \
       --work "/tmp/dd1_arch_$side" --commit "$commit" > "$S/${side}_arch.log" 2>&1)
    note "$side arch matrix exit $?"
  done
  python3 benchmarks/before_after.py "$R/before" "$R/after" --out "$R/before_after.json"
  note "before/after table exit $?"
}

job_collect() {
  find "$R" -name "*.json" -not -path "*/work/*" | while read -r f; do
    rel=${f#"$R"/}; cp "$f" "$OUT/${rel//\//_}"
  done
}

# shellcheck source-path=SCRIPTDIR source=background_job.sh
source "$(dirname "${BASH_SOURCE[0]}")/background_job.sh"
job_main "$0" "$@"
