#!/usr/bin/env bash
# Train on every local GPU (one process; jit shards the batch across the GPUs).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_local.sh --config CONFIG --workdir DIR [--gpus 0,1,...] [--dry-run]
                           [-- extra main.py flags]
  --config CONFIG   e.g. configs/celebahq256.py:debias
  --workdir DIR     checkpoints, logs and samples; rerun the same command to resume
  --gpus LIST       CUDA device ids to use (default: all)
  --dry-run         print the command instead of running it
USAGE
}

config= workdir= gpus= dry=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config=$2; shift 2;;
    --workdir) workdir=$2; shift 2;;
    --gpus) gpus=$2; shift 2;;
    --dry-run) dry=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; extra=("$@"); break;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2;;
  esac
done
[[ -n "$config" ]] || { echo "error: --config is required" >&2; usage >&2; exit 2; }
[[ -n "$workdir" ]] || { echo "error: --workdir is required" >&2; usage >&2; exit 2; }
if [[ -n "$gpus" && ! "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  echo "error: --gpus must be a comma-separated list of integers, got '$gpus'" >&2; exit 2
fi

cmd=(env ${gpus:+CUDA_VISIBLE_DEVICES=$gpus} XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
     python3 -m diffusion_jax.main --mode=train "--config=$config" "--workdir=$workdir"
     "${extra[@]}")
if [[ $dry == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
