#!/usr/bin/env bash
# Train with the `deepspeed` launcher (no accelerate launch): the trainer gets --deepspeed ds_configs/<STAGE>.json.
#   launch/deepspeed.sh STAGE RECIPE [--key value ...]     STAGE: zero2 | zero3 | zero3_offload
# Env: NGPUS (GPUs to use; default: all visible), MASTER_PORT; multi-node: HOSTFILE (+ NNODES, MASTER_ADDR),
# run on node 0 only - deepspeed reaches the other hosts of the hostfile over ssh (pdsh).
set -euo pipefail
(($# >= 2)) || { echo "usage: $0 STAGE RECIPE [--key value ...]" >&2; exit 2; }
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
stage="$1" recipe="$(user_path "$2")"
shift 2
launch "$stage" "$recipe" deepspeed "$@"
