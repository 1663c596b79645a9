#!/usr/bin/env bash
# The CPU demo: the tiny built-in model, DPO with LoRA, 2 processes in one gloo group, no GPU needed.
#   launch/demo_cpu.sh [--key value ...]        (e.g. --output_dir outputs/demo --max_steps 4)
# accelerate_configs/cpu.yaml says why it is typed MULTI_GPU.
set -euo pipefail
NGPUS="" # the demo's 2 CPU processes, whatever NGPUS says
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
launch cpu recipes/demo.yaml accelerate "$@"
