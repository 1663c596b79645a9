# shellcheck shell=bash
# Sourced by every launch/*.sh: the interpreter, the GPU count and the process environment, decided once.
# Inputs, all optional: PYTHON, NGPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS,
# LOCAL_PROCS (processes per node when they are not one per GPU: the CPU demo), DRY_RUN=1 (print, don't run).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_PWD="$PWD"

die() { echo "error: $*" >&2; exit 2; }

# A path the user typed, made absolute from where they typed it (we cd to the repo root below).
user_path() { if [[ "$1" = /* ]]; then echo "$1"; else echo "$CALLER_PWD/$1"; fi; }

# Configs name each other from the repo root (accelerate yamls say ds_configs/*.json), so run from there.
cd "$ROOT" || die "cannot enter the repo root $ROOT"

# One Python environment for the launcher AND its workers: `$PYTHON -m <launcher>` spawns workers with that same
# sys.executable, so a stray `accelerate`/`deepspeed` on PATH from another env can never be picked up.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
elif [[ "$PYTHON" == */* ]]; then
  PYTHON="$(user_path "$PYTHON")"
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "python '$PYTHON' not found: run 'make install' or set PYTHON=/path/to/python"
# shellcheck disable=SC2034 # used by the scripts that source this file
ACCELERATE=("$PYTHON" -m accelerate.commands.accelerate_cli)
# shellcheck disable=SC2034
DEEPSPEED=("$PYTHON" -m deepspeed.launcher.runner)
# shellcheck disable=SC2034
TORCHRUN=("$PYTHON" -m torch.distributed.run)

# Visible GPUs. torch's count honours CUDA_VISIBLE_DEVICES and MIG; nvidia-smi -L would list every GPU of the host.
# No nvidia-smi means no NVIDIA driver: answer 0 without paying for a torch import.
count_gpus() {
  command -v nvidia-smi >/dev/null 2>&1 || { echo 0; return; }
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null && return
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c '^[^-]' || true
  else
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  fi
}
NGPUS="${NGPUS:-$(count_gpus)}"
[[ "$NGPUS" =~ ^[0-9]+$ ]] || die "NGPUS='$NGPUS' is not a number of GPUs per node"
export NGPUS

# GPU launchers call this first: one clear line instead of a CUDA traceback from every rank.
require_gpus() {
  ((NGPUS > 0)) || die "$1 needs GPUs but none is visible (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-<unset>}'); \
'make demo' runs 2 processes on CPU, or set NGPUS=N to force N processes per node"
}

# Multi-node: the same command on every node with NNODES, NODE_RANK (0..NNODES-1) and MASTER_ADDR (node 0).
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
((NNODES == 1)) || [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$NNODES needs MASTER_ADDR (node 0's address) on every node"

# CPU threads per process: the node's cores split between its processes (torchrun would otherwise force 1).
LOCAL_PROCS="${LOCAL_PROCS:-$NGPUS}"
cores="$(nproc 2>/dev/null || echo 1)"
threads=$((cores / (LOCAL_PROCS > 0 ? LOCAL_PROCS : 1)))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}"

export TOKENIZERS_PARALLELISM=false # the Rust tokenizer's thread pool does not survive the dataloader's fork
export PYTHONUNBUFFERED=1           # logs appear as they happen, in order, through the launcher's pipes
# A rank that hits the NCCL timeout (or sees a peer die) tears the job down instead of hanging forever.
# (TORCH_NCCL_BLOCKING_WAIT is left unset: it would make every collective block the CPU thread, which kills the
# compute/communication overlap that DeepSpeed and FSDP rely on.)
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# NVLink SHARP (multicast) off: on shared or virtualised hosts its multicast objects may fail to allocate and
# NCCL aborts at init; LoRA's small all-reduces gain nothing from it.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"

# Print the command, then become it (signals such as Ctrl-C reach the launcher directly).
# One process checks the recipe, data, tokenizer and model config before the launcher starts N of them: a mistake
# is then one line and exit 2, instead of that line followed by the launcher's own failure report (torchrun adds a
# traceback and exit 1). What only the real job can see (its strategy, world size) is checked again inside it.
# The strategy and world size are those of the job about to start (PLANNED: the accelerate yaml, the DeepSpeed JSON of
# the `deepspeed` launcher, or torchrun), so a recipe that cannot run under that strategy is refused here, before launch.
# PREFLIGHT=0 skips this (it costs one Python start-up, ~10 s).
preflight() {
  [[ "${PREFLIGHT:-1}" == 0 || -n "${DRY_RUN:-}" ]] && return 0
  DIST_DPO_PLANNED_LAUNCH="${PLANNED:-}" "$PYTHON" -m dist_dpo train --dry_run "$@" || exit $?
}

run() {
  echo "+ $*" >&2
  [[ -z "${DRY_RUN:-}" ]] || exit 0
  exec "$@"
}
