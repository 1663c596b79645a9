#!/usr/bin/env bash
# Train with plain torchrun: DDP by default, or ZeRO when you add --deepspeed ds_configs/<stage>.json
# (or run `dist-dpo launch zero3 --launcher torchrun`).
#   launch/torchrun.sh RECIPE [--key value ...]
# Env: NGPUS (processes per node; default: all visible GPUs), and for multi-node NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT (run the same command on every node).
set -euo pipefail
(($# >= 1)) || { echo "usage: $0 RECIPE [--key value ...]" >&2; exit 2; }
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
recipe="$(user_path "$1")"
shift
launch ddp "$recipe" torchrun "$@"
