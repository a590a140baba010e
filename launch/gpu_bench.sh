#!/usr/bin/env bash
# One prepared GPU benchmark: celebahq256 at batch 8, 16 and 32, fp32 and bf16, in one call.
# Writes one JSON per setting into OUT (default: bench_out/) and prints a summary table.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_bench.sh [--out DIR] [--batches "8 16 32"] [--dtypes "float32 bfloat16"]
                           [--runs N] [--dry-run]
Run from the repository root on a machine with a GPU (jax[cuda] installed).
USAGE
}

out=bench_out batches="8 16 32" dtypes="float32 bfloat16" runs=10 dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out=$2; shift 2;;
    --batches) batches=$2; shift 2;;
    --dtypes) dtypes=$2; shift 2;;
    --runs) runs=$2; shift 2;;
    --dry-run) dry=1; shift;;
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

[[ $dry == 1 ]] || mkdir -p "$out"
for d in $dtypes; do
  for b in $batches; do
    cmd=(python3 -m diffusion_jax.bench --config=configs/celebahq256.py
         "--config.data.batch_size=$b" "--config.train.compute_dtype=$d" "--runs=$runs"
         "--json=$out/celebahq256_${d}_b${b}.json")
    if [[ $dry == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
  done
done
[[ $dry == 1 ]] && exit 0
python3 - "$out" <<'PY'
import glob, json, sys
rows = [json.load(open(p)) for p in sorted(glob.glob(f"{sys.argv[1]}/*.json"))]
print("device | dtype | batch | compile s | train img/s | sample img-steps/s | TFLOP/s | MFU | peak GB")
for r in rows:
    print(f"{r['device']} | {r['compute_dtype']} | {r['batch_size']} | {r['compile_s']:.1f} | "
          f"{r['train_images_per_s']:.2f} | {r['sample_image_steps_per_s']:.1f} | "
          f"{r['train_tflops_per_s']:.1f} | {r.get('mfu', float('nan')):.3f} | "
          f"{r['peak_device_memory_gb'] or float('nan'):.1f}")
PY
