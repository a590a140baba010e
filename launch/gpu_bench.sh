#!/usr/bin/env bash
# One prepared GPU benchmark, ours and the official code side by side, in one call:
#   * the paper's 256 px model (configs/celebahq256.py) at batch 8, 16 and 32, fp32 and bf16;
#   * a DiT-XL row at 256 tokens (configs/dit_imagenet256.py: 256 px, 16×16 patches), batch
#     32, fp32 and bf16 (no official counterpart: the paper's code is ADM only);
#   * small32 (configs/bench_cpu_small.py, batch 16, fp32), the CPU benchmark's case.
# --dry-run prints every row's command and, below it, the step's TFLOP count (XLA's cost
# analysis of the step lowered from shapes on this machine: nothing is allocated; about
# 10 s a row on a CPU; --no-flops skips it).
# Each of our rows runs `diffusion_jax.tools.bench` in its own process and is followed by the
# official PyTorch step on the same case, batch and dtype (launch/baseline_bench.py; bf16 is
# torch.autocast; $BASELINE_PYTHON is its interpreter, default python3). One JSON per row goes into --out; the table (with ratios) is printed last
# and written to OUT/table.md. Rows run in order of importance, so a cut-off run keeps the
# first ones.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_bench.sh [--out DIR] [--batches "8 16 32"] [--dtypes "float32 bfloat16"]
                           [--runs N] [--baseline-dir DIR | --no-baseline] [--device cuda|cpu]
                           [--dry-run [--no-flops]]
Run from the repository root on a machine with a GPU (jax with CUDA; torch for the baseline).
--device cpu runs the same rows on the CPU (a smoke test of the script itself).
--baseline-dir: the official code's checkout (default: $DIFFUSION_BASELINE, else
../shared/baseline/debias).
USAGE
}

here=$(cd "$(dirname "$0")" && pwd)
out=bench_out batches="8 16 32" dtypes="float32 bfloat16" runs=10 dry=0 baseline=1 device=cuda
flops=1
baseline_dir=${DIFFUSION_BASELINE:-$here/../../shared/baseline/debias}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out=$2; shift 2;;
    --batches) batches=$2; shift 2;;
    --dtypes) dtypes=$2; shift 2;;
    --runs) runs=$2; shift 2;;
    --baseline-dir) baseline_dir=$2; shift 2;;
    --no-baseline) baseline=0; shift;;
    --device) device=$2; shift 2;;
    --dry-run) dry=1; shift;;
    --no-flops) flops=0; shift;;
    -h|--help) usage; exit 0;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2;;
  esac
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "error: --runs must be a positive integer" >&2; exit 2; }
for b in $batches; do
  [[ "$b" =~ ^[1-9][0-9]*$ ]] || { echo "error: batch '$b' is not a positive integer" >&2; exit 2; }
done
for d in $dtypes; do
  [[ "$d" == float32 || "$d" == bfloat16 ]] || { echo "error: dtype '$d' must be float32 or bfloat16" >&2; exit 2; }
done
[[ $device == cuda || $device == cpu ]] || { echo "error: --device must be cuda or cpu" >&2; exit 2; }
if [[ $baseline == 1 && $dry == 0 && ! -d $baseline_dir/guided_diffusion ]]; then
  echo "error: no official code at $baseline_dir; pass --baseline-dir DIR or --no-baseline" >&2
  exit 2
fi

run() {  # prints the command in a dry run, else runs it; a failed row does not stop the others
  if [[ $dry == 1 ]]; then printf '%q ' "$@"; echo; else "$@" || echo "row failed: $*" >&2; fi
}
ours() {  # config dtype batch name
  run python3 -m diffusion_jax.tools.bench "--config=$1" "--config.train.compute_dtype=$2" \
    "--config.data.batch_size=$3" "--runs=$runs" "--json=$out/ours_$4_$2_b$3.json"
  if [[ $dry == 1 && $flops == 1 ]]; then
    tflop=$(python3 -m diffusion_jax.tools.bench "--config=$1" "--config.train.compute_dtype=$2" \
      "--config.data.batch_size=$3" --flops_only --cpu_devices=1 2>/dev/null \
      | awk '/^train_step_tflop/ {print $2}')
    echo "#   $4 $2 batch $3: ${tflop:-?} TFLOP per train step"
  fi
}
official() {  # case dtype batch name
  [[ $baseline == 1 ]] || return 0
  if [[ $dry == 1 ]]; then
    run python3 "$here/baseline_bench.py" --case "$1" --dtype "$2" --batch "$3" --device "$device" \
      --steps "$runs" --baseline_dir "$baseline_dir"
  else
    "${BASELINE_PYTHON:-python3}" "$here/baseline_bench.py" --case "$1" --dtype "$2" --batch "$3" --device "$device" \
      --steps "$runs" --baseline_dir "$baseline_dir" 2>"$out/official_$4_$2_b$3.err" \
      >"$out/official_$4_$2_b$3.json" || echo "row failed: official $1 $2 $3" >&2
  fi
}

[[ $dry == 1 ]] || mkdir -p "$out"
for b in $batches; do
  for d in $dtypes; do
    ours configs/celebahq256.py "$d" "$b" paper256
    official paper256 "$d" "$b" paper256
  done
done
for d in $dtypes; do
  ours configs/dit_imagenet256.py "$d" 32 ditxl256
done
ours configs/bench_cpu_small.py float32 16 small32
official small32 float32 16 small32
[[ $dry == 1 ]] && exit 0
python3 "$here/bench_table.py" "$out" | tee "$out/table.md"
