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
ds_config="ds_configs/$stage.json"
[[ -f "$ds_config" ]] || die "unknown stage '$stage': use one of zero2 zero3 zero3_offload (files in ds_configs/)"
[[ -f "$recipe" ]] || die "recipe '$recipe' not found (see recipes/)"
require_gpus "deepspeed $stage"

if [[ -n "${HOSTFILE:-}" ]]; then
  where=(--hostfile "$(user_path "$HOSTFILE")" --num_nodes "$NNODES" --num_gpus "$NGPUS" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}")
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  # deepspeed's --num_gpus IGNORES CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1; name the visible ones instead.
  where=(--include "localhost:$(cut -d, -f1-"$NGPUS" <<<"$CUDA_VISIBLE_DEVICES")")
else
  where=(--num_gpus "$NGPUS")
fi
# deepspeed has no free-port fallback: on one node pick a free port unless MASTER_PORT is given.
port="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}"

# --module: run dist_dpo like `python -m`; the launcher appends --local_rank=N, which the trainer accepts.
PLANNED="$ds_config" preflight --config "$recipe" "$@"
run "${DEEPSPEED[@]}" "${where[@]}" --master_port "$port" --module dist_dpo train --config "$recipe" --deepspeed "$ds_config" "$@"
