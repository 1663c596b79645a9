#!/usr/bin/env bash
# The CPU demo: the tiny built-in model, DPO with LoRA, 2 processes in one gloo group, no GPU needed.
#   launch/demo_cpu.sh [--key value ...]        (e.g. --output_dir outputs/demo --max_steps 4)
# accelerate_configs/cpu.yaml says why it is typed MULTI_GPU.
set -euo pipefail
LOCAL_PROCS=2                # matches num_processes in cpu.yaml; splits the cores between the two ranks
export CUDA_VISIBLE_DEVICES="" # the same CPU run on a GPU machine too (for GPUs: launch/accelerate.sh ddp recipes/demo.yaml)
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

preflight --config recipes/demo.yaml "$@"
run "${ACCELERATE[@]}" launch --config_file accelerate_configs/cpu.yaml -m dist_dpo train --config recipes/demo.yaml "$@"
