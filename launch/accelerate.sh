#!/usr/bin/env bash
# Train with `accelerate launch` and one of accelerate_configs/<STRATEGY>.yaml (= dist-dpo launch STRATEGY).
#   launch/accelerate.sh STRATEGY RECIPE [--key value ...]     STRATEGY: ddp | fsdp | zero2 | zero3 | zero3_offload
# Env: NGPUS (GPUs per node; default: all visible), and for multi-node NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
# What it runs (`dist-dpo launch` checks the job first, then prints and runs this; launch/env.sh has the options):
#   accelerate launch --config_file accelerate_configs/STRATEGY.yaml --num_processes N -m dist_dpo train --config RECIPE
# `-m dist_dpo train` is dist_dpo/train.py; what differs per strategy is the table in dist_dpo/strategies.py.
set -euo pipefail
(($# >= 2)) || { echo "usage: $0 STRATEGY RECIPE [--key value ...]" >&2; exit 2; }
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
[[ "$1" != cpu ]] || die "the CPU demo is launch/demo_cpu.sh (make demo)"
strategy="$1" recipe="$(user_path "$2")"
shift 2
launch "$strategy" "$recipe" accelerate "$@"
