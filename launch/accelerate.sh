#!/usr/bin/env bash
# Train with `accelerate launch` and one of accelerate_configs/<STRATEGY>.yaml.
#   launch/accelerate.sh STRATEGY RECIPE [--key value ...]     STRATEGY: ddp | fsdp | zero2 | zero3 | zero3_offload
# Env: NGPUS (GPUs per node; default: all visible), and for multi-node NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
set -euo pipefail
(($# >= 2)) || { echo "usage: $0 STRATEGY RECIPE [--key value ...]" >&2; exit 2; }
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
strategy="$1" recipe="$(user_path "$2")"
shift 2
config="accelerate_configs/$strategy.yaml"
[[ -f "$config" && "$strategy" != cpu ]] || die "unknown strategy '$strategy': use one of ddp fsdp zero2 zero3 zero3_offload (the CPU demo is launch/demo_cpu.sh)"
[[ -f "$recipe" ]] || die "recipe '$recipe' not found (see recipes/)"
require_gpus "$strategy"

# accelerate's --num_processes is the TOTAL over all nodes; it starts num_processes / num_machines per node.
args=(--config_file "$config" --num_processes "$((NGPUS * NNODES))")
# Multi-node values override the yaml only when set, so the yaml stays the single-node default.
if ((NNODES > 1)); then
  args+=(--num_machines "$NNODES" --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR")
fi
[[ -z "${MASTER_PORT:-}" ]] || args+=(--main_process_port "$MASTER_PORT")

PLANNED="$config" preflight --config "$recipe" "$@"
run "${ACCELERATE[@]}" launch "${args[@]}" -m dist_dpo train --config "$recipe" "$@"
