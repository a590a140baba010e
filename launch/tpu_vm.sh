#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice; re-creates a preempted VM and resumes.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator TYPE --config CONFIG
                        --workdir gs://BUCKET/DIR [options] [-- extra main.py flags]
  --name NAME          TPU VM name
  --zone ZONE          e.g. us-central2-b
  --accelerator TYPE   e.g. v4-8 (one VM) or v4-32 (a pod slice: every worker runs)
  --config CONFIG      e.g. configs/celebahq256.py:debias
  --workdir DIR        a gs:// path, so checkpoints outlive the VM
  --project PROJECT    GCP project (default: gcloud's)
  --version VERSION    TPU software version (default: tpu-ubuntu2204-base)
  --repo URL           where workers clone diffusion_jax from (default: this repo's origin)
  --spot               use spot (preemptible) capacity
  --max-restarts N     re-create and resume after preemption at most N times (default 20)
  --dry-run            print the commands instead of running them
USAGE
}

name= zone= accel= config= workdir= project= version=tpu-ubuntu2204-base spot= dry=0
max_restarts=20 repo=$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo "")
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=$2; shift 2;;
    --zone) zone=$2; shift 2;;
    --accelerator) accel=$2; shift 2;;
    --config) config=$2; shift 2;;
    --workdir) workdir=$2; shift 2;;
    --project) project=$2; shift 2;;
    --version) version=$2; shift 2;;
    --repo) repo=$2; shift 2;;
    --spot) spot=--spot; shift;;
    --max-restarts) max_restarts=$2; shift 2;;
    --dry-run) dry=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; extra=("$@"); break;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2;;
  esac
done
for v in name zone accel config workdir; do
  if [[ -z "${!v}" ]]; then echo "error: --${v/accel/accelerator} is required" >&2; usage >&2; exit 2; fi
done
[[ "$workdir" == gs://* ]] || { echo "error: --workdir must be a gs:// path (a VM's disk dies with it)" >&2; exit 2; }
[[ -n "$repo" ]] || { echo "error: no --repo given and no git origin to default to" >&2; exit 2; }

proj=${project:+--project=$project}
run() { if [[ $dry == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

train_cmd="set -e; [ -d diffusion_jax ] || git clone $repo diffusion_jax; cd diffusion_jax; \
pip install -q -r requirements.txt 'jax[tpu]' && pip install -q --no-deps -e . && \
DIFFUSION_JAX_DISTRIBUTED=1 python3 -m diffusion_jax.main --mode=train \
--config=$config --workdir=$workdir ${extra[*]:-}"

create() { run gcloud compute tpus tpu-vm create "$name" $proj --zone="$zone" \
  --accelerator-type="$accel" --version="$version" $spot; }
train() { run gcloud compute tpus tpu-vm ssh "$name" $proj --zone="$zone" --worker=all \
  --command="$train_cmd"; }

create
for ((attempt = 0; attempt <= max_restarts; attempt++)); do
  if train; then exit 0; fi
  state=$(gcloud compute tpus tpu-vm describe "$name" $proj --zone="$zone" --format='value(state)' || true)
  echo "training stopped (VM state: ${state:-unknown}); attempt $((attempt + 1)) of $max_restarts" >&2
  if [[ "$state" == PREEMPTED || "$state" == TERMINATED ]]; then
    run gcloud compute tpus tpu-vm delete "$name" $proj --zone="$zone" --quiet
    create
  fi
  [[ $dry == 1 ]] && exit 0
done
echo "error: gave up after $max_restarts restarts" >&2
exit 1
