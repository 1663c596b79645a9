#!/usr/bin/env bash
# Train with plain torchrun: DDP by default, or ZeRO when you add --deepspeed ds_configs/<stage>.json.
#   launch/torchrun.sh RECIPE [--key value ...]
# Env: NGPUS (processes per node; default: all visible GPUs), and for multi-node NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT (run the same command on every node).
set -euo pipefail
(($# >= 1)) || { echo "usage: $0 RECIPE [--key value ...]" >&2; exit 2; }
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
recipe="$(user_path "$1")"
shift
[[ -f "$recipe" ]] || die "recipe '$recipe' not found (see recipes/)"
require_gpus torchrun

if ((NNODES == 1)); then
  # --standalone: a local rendezvous on a free port, so two jobs on one machine never collide.
  where=(--standalone)
else
  where=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
fi

PLANNED=torchrun preflight --config "$recipe" "$@"
run "${TORCHRUN[@]}" "${where[@]}" --nproc_per_node "$NGPUS" -m dist_dpo train --config "$recipe" "$@"
