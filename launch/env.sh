# shellcheck shell=bash
# Sourced by every launch/*.sh: the interpreter, and the environment turned into `dist-dpo launch` options. The
# launcher itself (GPU count, per-process threads, the accelerate/deepspeed/torchrun command) is dist_dpo/launch.py.
# Inputs, all optional: PYTHON, NGPUS (processes per node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, HOSTFILE,
# DRY_RUN=1 (print the command, run nothing), PREFLIGHT=0 (skip the one-process check of recipe and data, ~10 s).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_PWD="$PWD"

die() { echo "error: $*" >&2; exit 2; }

# A path the user typed, made absolute from where they typed it (we cd to the repo root below).
user_path() { if [[ "$1" = /* ]]; then echo "$1"; else echo "$CALLER_PWD/$1"; fi; }

# Recipes' relative output_dir (outputs/...) land in the repo, whichever directory the script is run from.
cd "$ROOT" || die "cannot enter the repo root $ROOT"

# One Python environment for the launcher AND its workers (they are started with its sys.executable).
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
elif [[ "$PYTHON" == */* ]]; then
  PYTHON="$(user_path "$PYTHON")"
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "python '$PYTHON' not found: run 'make install' or set PYTHON=/path/to/python"
[[ -z "${NGPUS:-}" || "$NGPUS" =~ ^[0-9]+$ ]] || die "NGPUS='$NGPUS' is not a number of GPUs per node"

# `dist-dpo launch STRATEGY --config RECIPE [launcher options] -- [trainer options]`, with the variables above.
launch() {
  local strategy="$1" recipe="$2" launcher="$3"
  shift 3
  local opts=(--launcher "$launcher")
  [[ -z "${NGPUS:-}" ]] || opts+=(--gpus "$NGPUS")
  [[ -z "${NNODES:-}" ]] || opts+=(--nnodes "$NNODES")
  [[ -z "${NODE_RANK:-}" ]] || opts+=(--node-rank "$NODE_RANK")
  [[ -z "${MASTER_ADDR:-}" ]] || opts+=(--master-addr "$MASTER_ADDR")
  [[ -z "${MASTER_PORT:-}" ]] || opts+=(--master-port "$MASTER_PORT")
  [[ -z "${HOSTFILE:-}" ]] || opts+=(--hostfile "$(user_path "$HOSTFILE")")
  [[ -z "${DRY_RUN:-}" ]] || opts+=(--dry-run)
  [[ "${PREFLIGHT:-1}" != 0 ]] || opts+=(--no-preflight)
  exec "$PYTHON" -m dist_dpo launch "$strategy" --config "$recipe" "${opts[@]}" -- "$@"
}
